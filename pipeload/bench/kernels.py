"""`pipeload bench kernels`: each kernel's speed in GB/s of weight bytes, beside the memory
bandwidth measured in the same process.

For each GGML type, the products of a 1.1B Llama's layers (TinyLlama's shape: fused q/k/v
2560x2048, output 2048x2048, fused gate/up 11264x2048, down 2048x5632) are run as a decode step
runs them (`quant.ops.linear_many` / `linear`), over enough layers that the weights do not fit in
the last-level cache, so every byte comes from memory as in a real decode pass. Random valid
blocks: speed does not depend on the values. Rows (M) 1 is decode; larger M shows what batching
or prompts cost. Prompt products (M > EXACT_ROWS) are timed over one layer.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .harness import markdown_table, run_child, save

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "f16", "bf16", "f32"]

_CHILD = r"""
import json, statistics, sys, time
import numpy as np
import pipeload, torch
from gguf import GGMLQuantizationType as T
from pipeload.quant import ops
from pipeload.runtime.probe import memory_bandwidth
qname, threads, rows, total_mb, repeats = sys.argv[1], int(sys.argv[2]), [int(r) for r in sys.argv[3].split(",")], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
from pipeload.bench.synth import random_tensor
qt = T[qname.upper()]
rng = np.random.default_rng(0)
def random_blocks(qt, n, k, seed):
    t = torch.from_numpy(np.ascontiguousarray(random_tensor(rng, qt, (n, k), 0.02)))
    return t.view(torch.uint8).view(n, -1)
dim, ffn, kv = 2048, 5632, 256
shapes = [("qkv", [(dim, dim), (kv, dim), (kv, dim)]), ("o", [(dim, dim)]), ("gate_up", [(ffn, dim), (ffn, dim)]),
          ("down", [(dim, ffn)])]
layer = [[ops.GGMLWeight(qt, s, random_blocks(qt, *s, seed=i)) for i, s in enumerate(group)] for _, group in shapes]
layer_bytes = sum(w.nbytes for g in layer for w in g)
n_layers = max(2, int(total_mb * 2**20 // layer_bytes))
layers = [[[ops.GGMLWeight(qt, w.shape, w.blocks.clone()) for w in g] for g in layer] for _ in range(n_layers)]
from pipeload.quant import kernels
bw = kernels.read_bandwidth(512 << 20, threads)
out = {"type": qname, "backend": ops.backend(), "layer_bytes": layer_bytes, "n_layers": n_layers, "bandwidth": bw,
       "torch_sum_bandwidth": memory_bandwidth(512 << 20, repeats=5)}
def one_pass(m):
    x = torch.randn(m, dim)
    xd = torch.randn(m, ffn)
    t0 = time.perf_counter()
    for lay in layers:
        for g in lay:
            if len(g) > 1:
                ops.linear_many(x, g)
            else:
                ops.linear(xd if g[0].shape[1] == ffn else x, g[0])
    return time.perf_counter() - t0
for m in rows:
    if m > ops.EXACT_ROWS:
        x = torch.randn(m, dim); xd = torch.randn(m, ffn)
        def prompt():
            t0 = time.perf_counter()
            for g in layers[0]:
                for w in g:
                    ops.linear(xd if w.shape[1] == ffn else x, w)
            return time.perf_counter() - t0
        prompt()
        t = statistics.median([prompt() for _ in range(repeats)])
        out[f"m{m}"] = {"s_per_layer": t, "gbps": layer_bytes / t / 1e9, "gops": 2 * m * layer_bytes / (layer_bytes / sum(w.shape[0] * w.shape[1] for g in layer for w in g)) / t / 1e9}
        continue
    one_pass(m)
    t = statistics.median([one_pass(m) for _ in range(repeats)])
    out[f"m{m}"] = {"s_per_pass": t, "gbps": n_layers * layer_bytes / t / 1e9}
print(json.dumps(out))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML types")
    p.add_argument("--threads", type=int, default=2, help="threads (default 2)")
    p.add_argument("--rows", default="1,4", help="activation rows per product (default 1,4; > 64 is a prompt)")
    p.add_argument("--total-mb", type=int, default=400, help="weight bytes cycled through (default 400, > the LLC)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per figure (median)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the runs (repeatable)")


def run(args: argparse.Namespace) -> int:
    env = dict(kv.split("=", 1) for kv in args.env)
    rows = [int(r) for r in args.rows.split(",")]
    table, results = [], []
    for t in [t for t in args.types.split(",") if t]:
        t0 = time.perf_counter()
        r = run_child(_CHILD, t, args.threads, args.rows, args.total_mb, args.repeats, env=env)
        results.append(r)
        bw = r["bandwidth"]
        for m in rows:
            f = r[f"m{m}"]
            if m > 64:
                table.append([t.upper(), r["backend"], m, f"{f['s_per_layer'] * 1e3:.1f} ms/layer",
                              f"{m / f['s_per_layer'] / 22:.0f} tok/s (22 layers)", f"{f['gops']:.0f} GOP/s"])
            else:
                table.append([t.upper(), r["backend"], m, f"{f['gbps']:.1f} GB/s", f"{bw / 1e9:.1f} GB/s",
                              f"{100 * f['gbps'] * 1e9 / bw:.0f}%"])
        print(f"[kernels] {t}: " + ", ".join(f"m{m} {r[f'm{m}'].get('gbps', 0):.1f} GB/s" for m in rows)
              + f" (memory read {bw / 1e9:.1f} GB/s, torch sum {r['torch_sum_bandwidth'] / 1e9:.1f} GB/s, "
              f"{time.perf_counter() - t0:.0f} s)", flush=True)
    headers = ["type", "kernels", "rows", "weight bytes/s", "memory read bandwidth (same process)", "% of memory"]
    md = markdown_table(headers, table)
    print(md)
    save(Path(args.out), "kernels", {"threads": args.threads, "results": results, "env": env}, md)
    return 0
