"""`pipeload bench cluster`: pipeline and tensor parallel over K worker processes.

On one machine, K `pipeload worker` processes with one thread each stand in for K single-core
nodes. Each configuration runs in a fresh coordinator process that starts its workers, forms the
cluster, and decodes S streams at once (one thread per stream, S = 1 and S = K); one process with
one thread is the baseline (one stream, and a batch of K sequences, which reads the weights once
for all of them). Printed: tokens/s, the speedup against the baseline, the ideal speedup
(pipeline: min(S, K); tensor parallel: K), the efficiency, the planner's prediction (from the
workers' calibration and the measured link latency) and its error, and the bytes and messages
per token on every hop. K independent one-thread processes decoding at the same time give this
host's ceiling for K one-core nodes (they share its memory bandwidth): the "of host ceiling" column.

`--netns` repeats the two-node runs across two network namespaces joined by a veth pair shaped
to 1 Gbit/s with tc (needs root), and `--llama-rpc` runs llama.cpp's RPC backend on the same
model, processes and links (bench/cluster_net.py; llama.cpp is built once into the bench cache
from the llama-cpp-python source package).

    pipeload bench cluster                     # 1B-shaped Q4_0 model, stages 1-3, both modes
    pipeload bench cluster --netns --llama-rpc # plus the shaped link and llama.cpp RPC
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .harness import default_cache, markdown_table, run_child, save


def add_arguments(p) -> None:
    p.add_argument("--shape", default="1b", help="synthetic Llama shape from bench/synth.py SHAPES (default 1b)")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--mix", default="q4_0", help="quant mix of the synthetic model (default q4_0)")
    p.add_argument("--tokens", type=int, default=33, help="tokens generated per stream (default 33)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per stream (default 16)")
    p.add_argument("--stages", default="1,2,3", help="node counts to run (default 1,2,3)")
    p.add_argument("--modes", default="pipeline,tensor", help="pipeline, tensor or both (default both)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each configuration, median (default 1)")
    p.add_argument("--parts", default=None,
                   help="loopback parts to run: scaling, served, allreduce (default all three; none with --trace)")
    p.add_argument("--trace", action="store_true",
                   help="traced runs (1 process; tensor parallel 2 ranks; pipeline 2 stages, 1 and 2 streams): "
                        "chrome-trace JSON per run (Perfetto) under OUT/cluster-trace/, a PNG and a per-token "
                        "breakdown per rank and stage")
    p.add_argument("--model", default=None, help="an existing GGUF to run instead of the synthetic shape")
    p.add_argument("--netns", action="store_true", help="also over two namespaces with a 1 Gbit/s veth (root)")
    p.add_argument("--llama-rpc", action="store_true", help="also llama.cpp's RPC backend (built once if needed)")


def load_average() -> float:
    return os.getloadavg()[0]


def model_path(a) -> Path:
    """The benchmark's synthetic GGUF (written once into the bench cache), or --model."""
    from dataclasses import replace

    if getattr(a, "model", None):
        if not Path(a.model).is_file():
            raise FileNotFoundError(f"--model {a.model}: no such file")
        return Path(a.model)

    from .synth import SHAPES, write_synthetic_gguf

    shape = SHAPES[a.shape] if a.layers is None else replace(SHAPES[a.shape], n_layers=a.layers)
    path = default_cache() / f"cluster-{a.shape}{'-' + str(a.layers) if a.layers else ''}-{a.mix}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_gguf(path, shape, a.mix, seed=0)
    return path


# ---------------------------------------------------------------------------------------------
# children: each measurement in a fresh process


def child_single(spec: dict) -> dict:
    """One process, one thread: decode tokens/s of `streams` sequences batched together."""
    import pipeload  # noqa: F401  (before torch: passive OpenMP waits)
    import torch

    torch.set_num_threads(1)
    from pipeload import PipelineModel

    m = PipelineModel.from_pretrained(spec["model"], threads=1)
    prompts = [[(7 * s + k) % 1000 + 1 for k in range(spec["prompt"])] for s in range(spec["streams"])]
    list(m.stream(prompts[0], max_tokens=4, temperature=0))  # warm up
    from pipeload.cluster.trace import TRACE

    if TRACE.enabled:
        return _traced_single(m, prompts, spec["tokens"])
    list(m.stream(prompts, max_tokens=spec["tokens"], temperature=0, ignore_eos=True))
    st = m.stats
    return {"tokens_per_second": st["generation_tps"], "load": load_average()}


def _traced_single(m, prompts, tokens: int) -> dict:
    """The one-process baseline with its layers, head and steps traced (cluster/trace.py)."""
    from pipeload.cluster.trace import TRACE, trace_blocks

    ex = m.engine.executor
    TRACE.label = "single-process"
    trace_blocks(ex.layers.blocks, ex.model)
    ex.step_span = lambda: TRACE.span("step", "step")
    it = m.stream(prompts[0], max_tokens=tokens, temperature=0, ignore_eos=True)
    next(it)  # the prompt pass and the first token: the decode phase starts after them
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    t1 = time.perf_counter()
    TRACE.add("decode", "bench", t0, t1, tokens=n, streams=1)
    TRACE.dump()
    return {"tokens_per_second": n / (t1 - t0), "load": load_average()}


def child_cluster(spec: dict) -> dict:
    """A coordinator: start the workers (optionally inside network namespaces), form the cluster,
    decode `streams` streams at once (a thread each); figures of the decode phase."""
    import pipeload  # noqa: F401
    import threading

    import torch

    torch.set_num_threads(1)
    from pipeload import PipelineModel
    from pipeload.cluster.launch import connect_cluster

    procs = [start_worker(prefix, spec["address"], spec["model"], k)
             for k, prefix in enumerate(spec["worker_prefixes"])]
    try:
        engine = connect_cluster(spec["model"], spec["address"], len(procs), spec["mode"], join_timeout=180,
                                 step_timeout=120)
        m = PipelineModel(engine, None, {})
        S, N = spec["streams"], spec["tokens"]
        prompts = [[(7 * s + k) % 1000 + 1 for k in range(spec["prompt"])] for s in range(S)]
        list(m.stream(prompts[0], max_tokens=4, temperature=0))  # warm up
        barrier = threading.Barrier(S + 1)
        done = [0] * S

        def stream(s):
            for k, _ in enumerate(m.stream(prompts[s], max_tokens=N, temperature=0, ignore_eos=True)):
                if k == 0:
                    barrier.wait(120)  # every stream has its first token: the decode phase starts together
                done[s] = k + 1

        threads = [threading.Thread(target=stream, args=(s,), daemon=True) for s in range(S)]
        for t in threads:
            t.start()
        barrier.wait(300)
        t0 = time.perf_counter()
        for t in threads:
            t.join(600)
        seconds = time.perf_counter() - t0
        decoded = sum(done) - S
        from pipeload.cluster.trace import TRACE

        TRACE.add("decode", "bench", t0, t0 + seconds, tokens=decoded, streams=S)
        TRACE.label = "coordinator"
        hops = per_token_traffic(engine, m, prompts[0])
        predicted = engine_predictions(engine, S)
        out = {"tokens_per_second": decoded / seconds, "predicted": predicted, "load": load_average(),
               "link_latency": engine.summary["link_latency"], "plan": engine.summary["plan"], "hops": hops,
               "calibration": engine.summary["calibration"]}
        engine.close()
        return out
    finally:
        reap(procs, 10)
        from pipeload.cluster.trace import TRACE

        TRACE.dump()


CHILD_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def start_worker(prefix: list[str], address: str, model: str, k: int) -> subprocess.Popen:
    """`pipeload worker` number k (one thread) joining `address`, its command after `prefix`."""
    return subprocess.Popen([*prefix, sys.executable, "-m", "pipeload.cli", "worker", "--join", address, "--model",
                             model, "--threads", "1", "--name", f"w{k + 1}", "--join-timeout", "120"],
                            env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def reap(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait up to `timeout` s for each process to leave (the cluster told them to), else kill it."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def child_served(spec: dict) -> dict:
    """`pipeload serve` on the model (on a pipeline cluster of `nodes` workers when nodes > 0) with
    `lanes` batches in flight; `streams` concurrent completions of `tokens` tokens each (after a
    warm-up request). Returns the tokens/s of all of them together."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    procs, cluster_args = [], []
    if spec["nodes"]:
        address = f"127.0.0.1:{free_port()}"
        procs = [start_worker(pin(k), address, spec["model"], k) for k in range(spec["nodes"])]
        cluster_args = ["--cluster", address, "--workers", str(spec["nodes"])]
    port = free_port()
    server = subprocess.Popen([*([] if spec["nodes"] else pin(0)), sys.executable, "-m", "pipeload.cli", "serve",
                               f"m={spec['model']}", "--port", str(port), "--threads", "1", "--max-batch",
                               str(spec["streams"]), "--lanes", str(spec["lanes"]), "--preload", "--log-level",
                               "warning", *cluster_args], env=CHILD_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).json()["models"]["m"]["state"] == "loaded":
                    break
            except (httpx.TransportError, KeyError, ValueError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not load the model")
            time.sleep(0.2)

        def complete(s: int, n: int) -> int:
            body = {"model": "m", "prompt": [(7 * s + k) % 1000 + 1 for k in range(spec["prompt"])], "max_tokens": n,
                    "temperature": 0, "ignore_eos": True}
            r = httpx.post(url + "/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        complete(0, 4)  # warm up
        t0 = time.perf_counter()
        with ThreadPoolExecutor(spec["streams"]) as pool:
            made = sum(pool.map(lambda s: complete(s, spec["tokens"]), range(spec["streams"])))
        seconds = time.perf_counter() - t0
        return {"tokens_per_second": made / seconds, "tokens": made, "load": load_average()}
    finally:
        server.terminate()
        reap([server], 60)
        reap(procs, 20)


def served(a, model: Path) -> tuple[list[dict], str]:
    """Requests through `pipeload serve`: one process, and a 2-stage pipeline with 1 and 2 lanes
    (batches in flight). Tokens/s include prompt passes and HTTP."""
    streams = 4
    base = {"model": str(model), "tokens": a.tokens, "prompt": a.prompt, "streams": streams}
    rows, results = [], []
    for label, nodes, lanes in (("1 process", 0, 1), ("pipeline, 2 stages, 1 lane", 2, 1),
                                ("pipeline, 2 stages, 2 lanes (default)", 2, 2)):
        r = _median_run("child_served", {**base, "nodes": nodes, "lanes": lanes}, a.repeats)
        results.append({"configuration": label, "nodes": nodes, "lanes": lanes, **r})
        rows.append([label, streams, r["tokens_per_second"], r["tokens_per_second"] / results[0]["tokens_per_second"],
                     f"{r['load']:.1f}"])
    return results, markdown_table(["server", "concurrent requests", "tokens/s", "vs 1 process", "load avg"], rows)


def sent_counters(engine) -> dict[str, tuple[int, int]]:
    """(bytes, messages) each sender has put on the wire so far: the coordinator and every worker."""
    coord = engine.coordinator
    time.sleep(0.5)  # workers publish their counters with each heartbeat
    out = {"coordinator": (coord.channel.bytes_sent, coord.channel.messages_sent)}
    names = roles(engine)
    for wid, h in coord.workers.items():
        key = f"sent/{wid}"
        if coord.monitor_store.check([key]):
            b, n, ar_calls, ar_bytes = coord.monitor_store.get(key).decode().split()[:4]
            out[names.get(h["name"], h["name"])] = (int(b), int(n))
            if int(ar_calls):
                out[names.get(h["name"], h["name"]) + " all-reduce"] = (int(ar_bytes), int(ar_calls))
    return out


def per_token_traffic(engine, m, prompt: list[int], extra: int = 8) -> dict[str, tuple[float, float]]:
    """{sender: (bytes, messages) per decoded token}: the traffic of a run of 1 + extra tokens
    minus that of a run of 1 token (same prompt), over `extra`."""
    c0 = sent_counters(engine)
    list(m.stream(prompt, max_tokens=1, temperature=0, ignore_eos=True))
    c1 = sent_counters(engine)
    list(m.stream(prompt, max_tokens=1 + extra, temperature=0, ignore_eos=True))
    c2 = sent_counters(engine)
    return {k: (((c2[k][0] - c1[k][0]) - (c1[k][0] - c0[k][0])) / extra,
                ((c2[k][1] - c1[k][1]) - (c1[k][1] - c0[k][1])) / extra) for k in c2 if k in c0}


def engine_predictions(engine, streams: int) -> float:
    """The planner's decode tokens/s for `streams` streams on this cluster (measured link latency,
    coordinator overhead and, for tensor parallel, all-reduce time)."""
    from pipeload.cluster.placement import LinkSpec

    coord = engine.coordinator
    planner = coord.plan_maker
    link = LinkSpec(latency=max(coord.link_latency, 1e-6), bandwidth=planner.link.bandwidth)
    pred = planner.predictions(coord.plan["ranks"], link, [streams], coord.client_seconds, coord.allreduce_seconds,
                               coord.tp_layer_seconds)
    return pred[f"{coord.mode}_{streams}"]


def roles(engine) -> dict[str, str]:
    """{worker name: its place} — "stage k" in a pipeline, "rank k" in tensor parallel."""
    coord = engine.coordinator
    by_rank = {r: coord.workers[int(i)]["name"] for i, r in coord.plan["rank_of"].items()}
    if coord.mode == "pipeline":
        return {by_rank[r]: f"stage {k + 1}" for k, r in enumerate(coord.plan["order"])}
    return {by_rank[r]: f"rank {k + 1}" for k, r in enumerate(coord.plan["tp_ranks"])}


def _run(fn: str, spec: dict, env: dict | None = None, prefix: list[str] | None = None) -> dict:
    code = f"import json, sys; from pipeload.bench.cluster import {fn}; print(json.dumps({fn}(json.loads(sys.argv[1]))))"
    if prefix:
        done = subprocess.run([*prefix, sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                              timeout=1800, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
        if done.returncode != 0:
            raise RuntimeError(f"benchmark child failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    return run_child(code, json.dumps(spec), timeout=1800, env=env)


def pin(k: int) -> list[str]:
    """Command prefix that keeps process k on one core (core k mod the host's cores): K one-core
    "nodes" on one host are then one core each, as on K machines, instead of processes the
    kernel moves between cores (each move costs a cold cache; measured here: a 2-stage pipeline
    runs ~15% faster pinned). Empty where taskset is missing."""
    import shutil

    return ["taskset", "-c", str(k % (os.cpu_count() or 1))] if shutil.which("taskset") else []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_run(fn: str, spec: dict, repeats: int, prefix=None) -> dict:
    runs = [_run(fn, {**spec, "address": spec.get("address_host", "127.0.0.1") + f":{free_port()}"}, prefix=prefix)
            for _ in range(repeats)]
    runs.sort(key=lambda r: r["tokens_per_second"])
    return runs[len(runs) // 2]


def host_ceiling(base: dict, k: int, repeats: int) -> dict:
    """k independent one-thread processes decoding the whole model at the same time: what k
    one-core "nodes" on this host can do together at most (they share its memory bandwidth, and
    on a VM possibly its cores). Returns the median run's summed tokens/s."""
    from concurrent.futures import ThreadPoolExecutor

    runs = []
    for _ in range(repeats):
        with ThreadPoolExecutor(k) as pool:
            outs = list(pool.map(lambda j: _run("child_single", {**base, "streams": 1}, prefix=pin(j)), range(k)))
        runs.append({"tokens_per_second": sum(o["tokens_per_second"] for o in outs), "load": load_average(),
                     "each": [o["tokens_per_second"] for o in outs]})
    runs.sort(key=lambda r: r["tokens_per_second"])
    return runs[len(runs) // 2]


def scaling(a, model: Path) -> tuple[list[dict], str]:
    """The loopback runs and their table."""
    base = {"model": str(model), "tokens": a.tokens, "prompt": a.prompt}
    stages = [int(s) for s in a.stages.split(",")]
    one = _median_run("child_single", {**base, "streams": 1}, a.repeats, prefix=pin(0))
    rows, results = [], []
    singles, ceilings = {1: one}, {1: one}
    for k in sorted(set(stages) | {1}):
        if k > 1:
            singles[k] = _median_run("child_single", {**base, "streams": k}, a.repeats, prefix=pin(0))
            ceilings[k] = host_ceiling(base, k, a.repeats)
    rows.append(["1 process, 1 thread", 1, 1, one["tokens_per_second"], 1.0, 1, 1.0, "", "", "", "",
                 f"{one['load']:.1f}"])
    for k in sorted(singles):
        if k > 1:
            r, c = singles[k], ceilings[k]
            rows.append([f"1 process, batch of {k}", 1, k, r["tokens_per_second"], r["tokens_per_second"] /
                         one["tokens_per_second"], 1, "", "", "", "", "", f"{r['load']:.1f}"])
            rows.append([f"{k} independent processes at once (host ceiling)", k, k, c["tokens_per_second"],
                         c["tokens_per_second"] / one["tokens_per_second"], k, "", "", "", "", "",
                         f"{c['load']:.1f}"])
    for mode in a.modes.split(","):
        for k in stages:
            if mode == "tensor" and k == 1:
                continue
            # a pipeline of k stages with exactly k streams has no slack (any hop delay idles a
            # stage); 2k streams show how close it comes to k times one stage
            for streams in sorted({1, k} | ({2 * k} if mode == "pipeline" and k > 1 else set())):
                spec = {**base, "mode": mode, "streams": streams, "worker_prefixes": [pin(j) for j in range(k)]}
                r = _median_run("child_cluster", spec, a.repeats)
                speedup = r["tokens_per_second"] / one["tokens_per_second"]
                ideal = min(streams, k) if mode == "pipeline" else k
                err = (r["predicted"] - r["tokens_per_second"]) / r["tokens_per_second"]
                ceiling = ceilings[min(streams, k)]["tokens_per_second"] if mode == "pipeline" else \
                    ceilings[k]["tokens_per_second"]
                rows.append([mode, k, streams, r["tokens_per_second"], speedup, ideal, speedup / ideal,
                             f"{r['tokens_per_second'] / ceiling:.0%}", r["predicted"], f"{100 * err:+.0f}%",
                             f"{r['link_latency'] * 1e6:.0f}", f"{r['load']:.1f}"])
                results.append({"mode": mode, "nodes": k, "streams": streams, "host_ceiling": ceiling, **r})
    headers = ["configuration", "nodes", "streams", "tokens/s", "speedup", "ideal", "efficiency",
               "of host ceiling", "predicted tok/s", "prediction error", "hop latency (us)", "load avg"]
    return [{"single": singles, "host_ceiling": ceilings}] + results, markdown_table(headers, rows)


def hop_table(results: list[dict]) -> str:
    """Bytes and messages per token on each hop (the sender's counters over the decode phase)."""
    rows = []
    for r in results:
        if "hops" not in r:
            continue
        for sender, (b, n) in r["hops"].items():
            if n:
                rows.append([r["mode"], r["nodes"], r["streams"], r.get("link", "loopback"), sender, b, n])
    return markdown_table(["mode", "nodes", "streams", "link", "sender", "bytes/token", "messages/token"], rows)


ALLREDUCE_CHILD = """
import json, sys, time, torch, torch.distributed as dist
from datetime import timedelta
from pipeload.cluster.shard import AllReduce
rank, n, port, rounds = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(1)
store = dist.TCPStore("127.0.0.1", port, n, rank == 0, timeout=timedelta(seconds=60))
pg = dist.ProcessGroupGloo(dist.PrefixStore("a", store), rank, n, timedelta(seconds=60))
exchange, x = AllReduce(pg), torch.ones(1, 1, int(sys.argv[5]))
out = {}
for name, fn in (("exchange", lambda: exchange(x)), ("gloo ring", lambda: pg.allreduce([x.clone()]).wait())):
    for _ in range(30):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    out[name] = sorted(times)[rounds // 2]
print(json.dumps(out), flush=True)
import os
os._exit(0)  # gloo's C++ teardown can abort at interpreter exit; the figures are out
"""


def allreduce_micro(dim: int = 2048, rounds: int = 300) -> tuple[list[dict], str]:
    """Median seconds of one all-reduce of a decode step's hidden state (dim float32) between n
    one-thread processes on loopback: pipeload's exchange (AllReduce) against gloo's allreduce."""
    rows, results = [], []
    for n in (2, 3):
        port = free_port()
        procs = [subprocess.Popen([*pin(k), sys.executable, "-c", ALLREDUCE_CHILD, str(k), str(n), str(port),
                                   str(rounds), str(dim)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(n)]
        outs = []
        for p in procs:
            o, e = p.communicate(timeout=300)
            if p.returncode != 0:
                raise RuntimeError(f"all-reduce child failed: {e[-1500:]}")
            outs.append(json.loads(o.strip().splitlines()[-1]))
        r = {k: sorted(o[k] for o in outs)[len(outs) // 2] for k in outs[0]}
        results.append({"ranks": n, **r})
        rows.append([n, dim * 4, r["exchange"] * 1e6, r["gloo ring"] * 1e6, r["gloo ring"] / r["exchange"]])
    return results, markdown_table(["ranks", "bytes", "exchange (us)", "gloo allreduce (us)", "ratio"], rows)


def run(a) -> int:
    out = Path(a.out)
    print(f"load average before: {load_average():.2f} (2 cores shared with other work: ratios are side by side)")
    model = model_path(a)
    t0 = time.time()
    parts_arg = a.parts if a.parts is not None else ("" if a.trace else "scaling,served,allreduce")
    parts = set(parts_arg.split(",")) - {"", "none"}
    unknown = parts - {"scaling", "served", "allreduce"}
    if unknown:
        raise ValueError(f"unknown --parts {sorted(unknown)}: choose from scaling, served, allreduce")
    results, table, report = [], "", {"model": str(model)}
    if a.trace:
        from .cluster_trace import traced_runs

        report["trace"], trace_table = traced_runs(a, model, out)
        print(trace_table)
        table += trace_table
    if "scaling" in parts:
        results, table = scaling(a, model)
        print(f"\n## Scaling on loopback ({model.name}, {a.tokens} tokens per stream, 1 thread per process)\n")
        print(table)
        print("\n## Bytes and messages per token per hop (loopback)\n")
        print(hop_table(results[1:]))
        report.update(scaling=results, scaling_table=table)
    if "served" in parts:
        served_results, served_table = served(a, model)
        print("\n## Through `pipeload serve` (4 concurrent requests, 1 thread per process)\n")
        print(served_table)
        report["served"] = served_results
        table += "\n\n## Through `pipeload serve`\n\n" + served_table
    if "allreduce" in parts:
        ar_results, ar_table = allreduce_micro()
        print("\n## One all-reduce of a decode step's hidden state (2048 float32), median of 300\n")
        print(ar_table)
        report["allreduce"] = ar_results
        table += "\n\n## One all-reduce of a decode step's hidden state\n\n" + ar_table
    if a.netns or a.llama_rpc:
        from .cluster_net import shaped_and_rpc

        net_results, net_tables = shaped_and_rpc(a, model, results)
        report["net"] = net_results
        for title, t in net_tables.items():
            print(f"\n## {title}\n")
            print(t)
        table += "\n\n" + "\n\n".join(f"## {k}\n\n{v}" for k, v in net_tables.items())
    print(f"\nload average after: {load_average():.2f}; {time.time() - t0:.0f} s")
    save(out, "cluster", report, table)
    return 0
