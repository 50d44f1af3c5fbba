"""The cluster's command-line parts: `pipeload worker`, `pipeload probe`, `pipeload plan --cluster
nodes.yaml`, and the --cluster options of `run` and `serve` (registered by pipeload/cli.py).

nodes.yaml (each node as `pipeload probe --json` printed it, or by hand):

    link: {latency_us: 150, bandwidth_gbit: 1}
    nodes:
      - name: pi-1
        memory: 8GB               # for weights and KV cache (default: free_memory * 0.8)
        decode_bandwidth: 3.1e9   # bytes/s of int4 weights through the decode kernel (probe)
        disk_bandwidth: 0.45e9    # bytes/s (probe; default 1e9)
      - probe: pi-2.json          # a saved `pipeload probe --json`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """--cluster / --workers / --parallel for `run` and `serve`."""
    p.add_argument("--cluster", default=None, metavar="HOST:PORT",
                   help="run on a cluster: listen on HOST:PORT for `pipeload worker --join HOST:PORT` nodes")
    p.add_argument("--workers", type=int, default=1, help="workers to wait for with --cluster (default 1)")
    p.add_argument("--parallel", default="pipeline", choices=["pipeline", "tensor"],
                   help="split the model by layers (pipeline) or by heads and columns (tensor)")
    _add_token_option(p)


def _add_token_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="the cluster's join token (first line; default $PIPELOAD_CLUSTER_TOKEN): coordinator and "
                        "workers prove they know it without sending it; without one anyone reaching the port can join")


def cmd_worker(a: argparse.Namespace) -> int:
    import torch

    from ..api import DTYPES
    from ..errors import PipeloadError
    from ..runtime.memory import parse_size
    from .auth import load_token
    from .worker import run_worker

    try:
        code = run_worker(a.join, a.model, memory_limit=parse_size(a.memory_limit), dtype=DTYPES[a.dtype],
                          name=a.name, join_timeout=a.join_timeout, threads=a.threads or torch.get_num_threads(),
                          token=load_token(a.token_file))
    except (PipeloadError, ValueError, OSError) as e:
        print(f"pipeload: error: {e}", file=sys.stderr)
        code = 2
    # Leave without running C++ destructors: the store's and gloo's threads may still be running,
    # and tearing them down at exit can abort the process (SIGABRT) after the message was printed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_probe(a: argparse.Namespace) -> int:
    import torch

    from .probe import probe_node, table, to_json

    if a.threads:
        torch.set_num_threads(a.threads)
    fig = probe_node(a.model, a.watts, a.price, disk=not a.no_disk)
    print(to_json(fig) if a.json else table(fig))
    return 0


def load_nodes(path: str | Path):
    """(nodes, link) from a nodes.yaml; raises ValueError naming a bad entry."""
    import yaml

    from ..runtime.memory import parse_size
    from .placement import LinkSpec, NodeSpec

    spec = yaml.safe_load(Path(path).read_text()) or {}
    link_cfg = spec.get("link", {})
    link = LinkSpec(latency=float(link_cfg.get("latency_us", 100)) * 1e-6,
                    bandwidth=float(link_cfg.get("bandwidth_gbit", 1)) * 1e9 / 8)
    nodes = []
    for k, entry in enumerate(spec.get("nodes") or []):
        if "probe" in entry:
            entry = {**json.loads((Path(path).parent / entry["probe"]).read_text()), **entry}
        if "decode_bandwidth" not in entry:
            raise ValueError(f"{path}: node {k} ({entry.get('name', '?')}) has no decode_bandwidth: "
                             f"run `pipeload probe --json` on it")
        memory = parse_size(entry["memory"]) if "memory" in entry else int(entry.get("free_memory", 8 << 30) * 0.8)
        nodes.append(NodeSpec(str(entry.get("name", f"node{k}")), memory, float(entry["decode_bandwidth"]),
                              float(entry.get("disk_bandwidth", 1e9)), float(entry.get("layer_overhead", 0.0)),
                              str(entry.get("host", "")), int(entry.get("host_cores", 0))))
    if not nodes:
        raise ValueError(f"{path}: no nodes")
    return nodes, link


def cmd_plan_cluster(a: argparse.Namespace) -> int:
    import torch

    from ..runtime.memory import format_bytes
    from ..runtime.spec import open_model
    from .launch import model_cost
    from .placement import host_limits, place_pipeline, predict_tensor_parallel

    spec = open_model(a.model, None if a.dtype == "auto" else getattr(torch, a.dtype))
    ckpt, args = spec.checkpoint, spec.args
    context = min(a.ctx or args.context_length, args.context_length)
    nodes, link = load_nodes(a.cluster)
    cost = model_cost(spec)
    placement = place_pipeline(nodes, cost, link, context, a.batch, every_node=False)
    print(f"pipeline plan for {ckpt.path.name} ({args.n_layers} layers, {format_bytes(sum(cost.layer_bytes))} "
          f"+ head {format_bytes(cost.head_bytes)}) over {len(nodes)} nodes, link {link.latency * 1e6:.0f} us, "
          f"{link.bandwidth * 8 / 1e9:.2f} Gbit/s:")
    for k, s in enumerate(placement.stages):
        print(f"  {s.node:<12} layers {s.start:>3}-{s.stop - 1:<3}{' + head' if k == len(placement.stages) - 1 else '       '}"
              f"  resident {format_bytes(s.resident_bytes):>9}  streamed {format_bytes(s.streamed_bytes):>9}"
              f"  {s.seconds * 1e3:8.1f} ms/token")
    for note in placement.notes:
        print(f"  note: {note}")
    limits = host_limits(placement, nodes)
    streams = sorted({1, len(placement.stages), a.streams})
    print("\npredicted decode tokens/s:")
    print(f"  {'streams':>8}  {'pipeline':>9}  {'tensor parallel':>15}")
    for k in streams:
        pp = placement.tokens_per_second(k, limits)
        tp = predict_tensor_parallel(nodes, cost, link, k)
        print(f"  {k:>8}  {pp:>9.2f}  {tp:>15.2f}" + ("   <- tensor parallel wins" if tp > pp else ""))
    return 0


def add_parsers(sub) -> None:
    """Register `worker` and `probe`."""
    p = sub.add_parser("worker", help="join a cluster as a node (pipeline stage or tensor-parallel rank)")
    p.add_argument("--join", required=True, metavar="HOST:PORT", help="the coordinator (`pipeload run --cluster`)")
    p.add_argument("--model", required=True, help="this node's copy of the model file (same file as the coordinator's)")
    p.add_argument("--memory-limit", default=None, help="memory for this node's layers, e.g. 6GB; the rest streams")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--name", default=None, help="name in plans and errors (default: host:pid)")
    p.add_argument("--join-timeout", type=float, default=60.0, help="seconds to wait for the coordinator (default 60)")
    _add_token_option(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("probe", help="measure this node: GFLOPS, memory/decode/disk bandwidth, free memory")
    p.add_argument("--model", default=None, help="also predict this model's tokens/s on this node")
    p.add_argument("--watts", type=float, default=None, help="the node's power draw: adds GFLOPS/W, tokens/s/W")
    p.add_argument("--price", type=float, default=None, help="the node's price in USD: adds $/GFLOPS, tokens/s/$")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-disk", action="store_true", help="skip the disk read test")
    p.add_argument("--json", action="store_true", help="print JSON (for nodes.yaml) instead of a table")
    p.set_defaults(func=cmd_probe)


def print_cluster_summary(engine) -> None:
    """The plan and predictions of a cluster run, to stderr."""
    s = engine.summary
    print(f"[cluster] {s['mode']} over {len(s['workers'])} workers; link latency {s['link_latency'] * 1e6:.0f} us",
          file=sys.stderr)
    for line in s["plan"]:
        print(f"[cluster]   {line}", file=sys.stderr)
    pred = ", ".join(f"{k.replace('_', ' x')} {v:.2f}" for k, v in s["predicted"].items())
    print(f"[cluster] predicted tokens/s: {pred}", file=sys.stderr)
    for r in engine.recoveries:
        print(f"[cluster] recovered from the loss of {r['dead']} in {r['recovery_seconds']:.2f} s "
              f"(replayed {r['replayed_steps']} steps)", file=sys.stderr)
