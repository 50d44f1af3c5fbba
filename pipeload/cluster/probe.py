"""`pipeload probe`: what one node can do, measured — the figures placement uses.

Dense matmul FLOP/s (an HPL-style figure: an n x n matrix product, float32 and bfloat16), memory
bandwidth, the bandwidth the 4-bit decode kernel reaches on a one-token matrix-vector product
(what bounds tokens/s), disk bandwidth with O_DIRECT and buffered reads, free memory. With the
node's power draw and price: GFLOPS per watt and dollars per GFLOPS; with a model, the predicted
decode tokens/s of that model on this node alone, per watt and per dollar.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def decode_bandwidth(n: int = 8192, repeats: int = 7) -> float:
    """Bytes/s of Q4_0 weights (GGUF blocks as stored) through ops.linear for one token times an
    n x n matrix: what bounds decode tokens/s on this node."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    from ..quant import ops

    block, size = GGML_QUANT_SIZES[T.Q4_0]
    blocks = torch.randint(0, 256, (n, n // block * size), dtype=torch.uint8)
    blocks.view(n, -1, size)[:, :, 1] = 0x20  # each block's f16 scale small and finite (about 0.008)
    blocks.view(n, -1, size)[:, :, 0] = 0
    w = ops.GGMLWeight(T.Q4_0, (n, n), blocks)
    x = torch.randn(1, n).to(torch.bfloat16)
    ops.linear(x, w)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.linear(x, w)
        times.append(time.perf_counter() - t0)
    return w.nbytes / sorted(times)[repeats // 2]


def probe_node(model: str | None = None, watts: float | None = None, price: float | None = None,
               disk: bool = True) -> dict:
    """This node's figures (bytes/s, FLOP/s, bytes, and the derived per-watt / per-dollar ones)."""
    from ..runtime.probe import disk_bandwidth, free_memory, matmul_flops, memory_bandwidth

    out = {"threads": torch.get_num_threads(), "matmul_flops_f32": matmul_flops(torch.float32),
           "matmul_flops_bf16": matmul_flops(torch.bfloat16), "memory_bandwidth": memory_bandwidth(),
           "decode_bandwidth": decode_bandwidth(), "free_memory": free_memory()}
    if disk:
        d = disk_bandwidth(Path(model) if model else None)
        out.update({"disk_direct": d["direct"], "disk_buffered": d["buffered"],
                    "disk_bandwidth": max(d["direct"], d["buffered"])})
    gflops = max(out["matmul_flops_f32"], out["matmul_flops_bf16"]) / 1e9
    if watts:
        out["watts"], out["gflops_per_watt"] = watts, gflops / watts
    if price:
        out["price_usd"], out["usd_per_gflops"] = price, price / gflops
    if model:
        from .stage import StageModel

        stage = StageModel(model)
        cal = stage.calibrate()
        from ..runtime.planner import group_sizes

        _, spans, _, _ = group_sizes(stage.spec)
        weights = sum(spans.values())
        fits = weights < out["free_memory"]
        per_token = weights / cal["decode_bandwidth"]
        if not fits and disk:
            per_token = max(per_token, (weights - out["free_memory"] * 0.8) / out["disk_bandwidth"])
        tps = 1.0 / per_token
        out.update({"model": str(model), "model_bytes": weights, "layer_seconds": cal["layer_seconds"],
                    "model_decode_bandwidth": cal["decode_bandwidth"], "tokens_per_second": tps})
        if watts:
            out["tokens_per_second_per_watt"] = tps / watts
        if price:
            out["tokens_per_second_per_usd"] = tps / price
    return out


def table(fig: dict) -> str:
    """The figures as a readable two-column table."""
    rows = [("threads", f"{fig['threads']}"),
            ("dense matmul float32", f"{fig['matmul_flops_f32'] / 1e9:.1f} GFLOPS"),
            ("dense matmul bfloat16", f"{fig['matmul_flops_bf16'] / 1e9:.1f} GFLOPS"),
            ("memory bandwidth", f"{fig['memory_bandwidth'] / 1e9:.2f} GB/s"),
            ("int4 decode kernel", f"{fig['decode_bandwidth'] / 1e9:.2f} GB/s of weights"),
            ("free memory", f"{fig['free_memory'] / 2**30:.1f} GiB")]
    if "disk_direct" in fig:
        rows.append(("disk read", f"{fig['disk_direct'] / 1e9:.2f} GB/s O_DIRECT, {fig['disk_buffered'] / 1e9:.2f} GB/s "
                                  "buffered"))
    if "gflops_per_watt" in fig:
        rows.append(("per watt", f"{fig['gflops_per_watt']:.2f} GFLOPS/W ({fig['watts']:g} W)"))
    if "usd_per_gflops" in fig:
        rows.append(("per dollar", f"{fig['usd_per_gflops']:.2f} $/GFLOPS (${fig['price_usd']:g})"))
    if "tokens_per_second" in fig:
        rows.append(("model", f"{Path(fig['model']).name}: {fig['model_bytes'] / 1e9:.2f} GB, "
                              f"{fig['tokens_per_second']:.2f} tokens/s predicted on this node alone"))
        if "tokens_per_second_per_watt" in fig:
            rows.append(("model per watt", f"{fig['tokens_per_second_per_watt']:.3f} tokens/s/W"))
        if "tokens_per_second_per_usd" in fig:
            rows.append(("model per dollar", f"{fig['tokens_per_second_per_usd']:.4f} tokens/s/$"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def to_json(fig: dict) -> str:
    return json.dumps(fig, indent=2)
