"""The cluster benchmark over a shaped link, and llama.cpp's RPC backend beside it.

Two network namespaces (pipeload-a, pipeload-b) are joined by a veth pair whose both ends are
shaped to 1 Gbit/s with tc tbf (root needed; netem is not used). The coordinator and the first
worker live in pipeload-a, the second worker in pipeload-b, so the hidden state crosses the link
between the stages and the logits cross it back. Gloo is told which interface to use
(GLOO_SOCKET_IFNAME). Everything is torn down afterwards.

llama.cpp: `ggml-rpc-server` and `llama-bench` are built once (about 10 minutes on 2 cores) into
<bench cache>/llama-rpc/build from the llama-cpp-python 0.3.36 source package (downloaded with
`pip download --no-binary :all:`), with -DGGML_RPC=ON and explicit CPU flags: the default native
build crashes on this CPU (AMX). The same GGUF file runs with every layer on the RPC servers
(-ngl 99), one server per node, one thread each, on loopback and across the namespaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from .harness import default_cache, markdown_table

NAMESPACES = ("pipeload-a", "pipeload-b")
ADDRESSES = ("10.200.1.1", "10.200.1.2")
DEVICES = ("pl-veth-a", "pl-veth-b")
LLAMA_VERSION = "0.3.36"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_RPC=ON", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
               "-DGGML_F16C=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
               "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_OPENSSL=OFF"]


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


@contextmanager
def shaped_link(rate: str = "1gbit"):
    """Two namespaces joined by a veth pair shaped to `rate` both ways; removed on exit.
    Raises RuntimeError when namespaces cannot be made (not root)."""
    for ns in NAMESPACES:
        _sh("ip", "netns", "del", ns, check=False)
    try:
        for ns in NAMESPACES:
            _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", DEVICES[0], "type", "veth", "peer", "name", DEVICES[1])
        for ns, dev, addr in zip(NAMESPACES, DEVICES, ADDRESSES):
            _sh("ip", "link", "set", dev, "netns", ns)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "128kb",
                "latency", "20ms")
        yield
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"could not set up the shaped link ({' '.join(e.cmd)}): {e.stderr.strip()}") from None
    finally:
        for ns in NAMESPACES:
            _sh("ip", "netns", "del", ns, check=False)


def in_ns(k: int) -> list[str]:
    """Command prefix that runs a program in namespace k with gloo bound to its veth."""
    return ["ip", "netns", "exec", NAMESPACES[k], "env", f"GLOO_SOCKET_IFNAME={DEVICES[k]}"]


def shaped_runs(a, model: Path) -> list[dict]:
    """pipeload over the shaped link: 2 nodes (coordinator + worker 1 | worker 2), 1 and 2 streams."""
    from .cluster import _median_run, pin

    base = {"model": str(model), "tokens": a.tokens, "prompt": a.prompt, "address_host": ADDRESSES[0]}
    out = []
    for mode in a.modes.split(","):
        for streams in (1, 2):
            spec = {**base, "mode": mode, "streams": streams,
                    "worker_prefixes": [[*in_ns(0), *pin(0)], [*in_ns(1), *pin(1)]]}
            r = _median_run("child_cluster", spec, a.repeats, prefix=in_ns(0))
            out.append({"mode": mode, "nodes": 2, "streams": streams, "link": "1 Gbit/s veth", **r})
    return out


# ---------------------------------------------------------------------------------------------
# llama.cpp RPC


def llama_build(folder: Path | None = None) -> Path:
    """The build folder holding bin/ggml-rpc-server and bin/llama-bench (built if missing).
    Raises RuntimeError with the failing step's output."""
    root = folder or default_cache() / "llama-rpc"
    build = root / "build"
    if (build / "bin" / "ggml-rpc-server").exists() and (build / "bin" / "llama-bench").exists():
        return build
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{LLAMA_VERSION}" / "vendor" / "llama.cpp"
    steps = []
    if not src.exists():
        steps += [["pip", "download", "--no-binary", ":all:", "--no-deps", f"llama-cpp-python=={LLAMA_VERSION}",
                   "-d", str(root)],
                  ["tar", "xzf", str(root / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"), "-C", str(root)]]
    steps += [["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS],
              ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "ggml-rpc-server",
               "llama-bench"]]
    for cmd in steps:
        print(f"building llama.cpp RPC (once): {' '.join(cmd[:3])} ...", flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"llama.cpp build step failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return build


def llama_rpc_run(build: Path, model: Path, servers: list[tuple[list[str], str]], client_prefix: list[str],
                  tokens: int) -> dict:
    """Decode tokens/s of llama-bench with every layer on the RPC `servers` ((prefix, host:port));
    no servers: llama.cpp alone in one process."""
    procs = []
    try:
        for prefix, endpoint in servers:
            host, port = endpoint.rsplit(":", 1)
            procs.append(subprocess.Popen([*prefix, str(build / "bin" / "ggml-rpc-server"), "-H", host, "-p", port,
                                           "-t", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.5)
        cmd = [*client_prefix, str(build / "bin" / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens),
               "-t", "1", "-r", "3", "-o", "json"]
        if servers:
            cmd += ["-ngl", "99", "--rpc", ",".join(e for _, e in servers)]
        else:
            cmd += ["-ngl", "0"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"llama-bench failed: {done.stderr[-1500:]}")
        result = json.loads(done.stdout)
        return {"tokens_per_second": result[0]["avg_ts"], "stddev": result[0]["stddev_ts"], "load": os.getloadavg()[0]}
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def shaped_and_rpc(a, model: Path, loopback: list[dict]) -> tuple[dict, dict[str, str]]:
    """The shaped-link runs and the llama.cpp RPC comparison; (results, {title: markdown table})."""
    from .cluster import hop_table, pin

    results: dict = {}
    tables: dict[str, str] = {}
    single = loopback[0]["single"][1]["tokens_per_second"] if loopback else None
    shaped: list[dict] = []
    rpc: dict = {}
    build = None
    if a.llama_rpc:
        try:
            build = llama_build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            results["llama_rpc_error"] = str(e)
            tables["llama.cpp RPC"] = f"llama.cpp RPC could not run: {e}"
    if build is not None:
        rpc["1 process (no RPC)"] = llama_rpc_run(build, model, [], pin(0), a.tokens)
        for k in sorted({int(s) for s in a.stages.split(",")}):
            servers = [(pin(j), f"127.0.0.1:{50100 + j}") for j in range(k)]
            rpc[f"{k} RPC servers, loopback"] = llama_rpc_run(build, model, servers, [], a.tokens)
    if a.netns:
        with shaped_link():
            shaped = shaped_runs(a, model)
            if build is not None:
                servers = [(["ip", "netns", "exec", NAMESPACES[j], *pin(j)], f"{ADDRESSES[j]}:{50200 + j}")
                           for j in range(2)]
                rpc["2 RPC servers, 1 Gbit/s veth"] = llama_rpc_run(build, model, servers,
                                                                     ["ip", "netns", "exec", NAMESPACES[0]], a.tokens)
        rows = [[r["mode"], r["streams"], r["tokens_per_second"], r["predicted"],
                 f"{100 * (r['predicted'] - r['tokens_per_second']) / r['tokens_per_second']:+.0f}%",
                 f"{r['link_latency'] * 1e6:.0f}", f"{r['load']:.1f}"] for r in shaped]
        tables["Two namespaces, veth shaped to 1 Gbit/s (tc tbf)"] = markdown_table(
            ["mode", "streams", "tokens/s", "predicted", "error", "coordinator<->worker latency (us)", "load avg"], rows)
        tables["Bytes and messages per token per hop (1 Gbit/s veth)"] = hop_table(shaped)
        results["shaped"] = shaped
    if rpc:
        rows = [[name, r["tokens_per_second"], r["stddev"], f"{r['load']:.1f}"] for name, r in rpc.items()]
        ours = [[f"pipeload {r['mode']}, {r['nodes']} nodes, 1 stream", r["tokens_per_second"]] for r in loopback[1:]
                if r["streams"] == 1] + [[f"pipeload {r['mode']}, 2 nodes, 1 stream, 1 Gbit/s veth", r["tokens_per_second"]]
                                         for r in shaped if r["streams"] == 1]
        if single:
            ours.insert(0, ["pipeload, 1 process", single])
        tables["llama.cpp RPC beside pipeload (decode tokens/s, 1 thread per process)"] = (
            markdown_table(["llama.cpp", "tokens/s", "stddev", "load avg"], rows) + "\n\n"
            + markdown_table(["pipeload", "tokens/s"], ours))
        results["llama_rpc"] = rpc
    return results, tables
