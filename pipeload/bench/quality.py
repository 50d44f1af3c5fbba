"""`pipeload bench quality`: what quantization costs, measured on held-out text.

The model (default: the built-in one, F16) is quantized with each method (round to nearest:
q8_0, q4_0, q4_k_m, rtn4; calibrated: gptq4, gptq4_0 — see pipeload.quantize), and every file
is scored on the same sliding windows of the held-out text (default: the built-in corpus's
held-out split, rebuilt from this Python's stdlib) in one pass: perplexity, bits per byte, and
the KL divergence of its next-token distributions from the unquantized model's (more sensitive
than perplexity, which quantization noise can move either way). Two ways to run each file:
"exact" (weights dequantized to float32: the format's own cost) and "runtime" (pipeload's
default: bf16 activations on the packed 4/8-bit kernels, which requantize 5/6/8-bit formats to
per-row int8).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .harness import default_cache, markdown_table, save

METHODS = ["f16", "q8_0", "q4_k_m", "q4_0", "rtn4", "gptq4", "gptq4_0"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="source model (default: the built-in pipeload-main.gguf)")
    p.add_argument("--text", default=None, help="held-out text, .txt or .jsonl (default: the built-in held-out split)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default {','.join(METHODS)})")
    p.add_argument("--calibration", default=None, help="calibration text for gptq (default: built-in corpus, train split)")
    p.add_argument("--ctx", type=int, default=512, help="window (default 512)")
    p.add_argument("--stride", type=int, default=256, help="window advance (default 256)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    p.add_argument("--runtime", choices=["both", "exact", "default"], default="both",
                   help="exact: float32 dequantized weights; default: the stored blocks, bf16 activations (default both)")


def _held_out(args) -> str:
    if args.text:
        from ..perplexity import read_text

        return read_text(args.text)
    from ..quant.calibration import builtin_heldout_text

    return builtin_heldout_text()


def run(args: argparse.Namespace) -> int:
    from ..api import builtin_model_path
    from ..perplexity import compare
    from ..quantize import quantize_model
    from ..runtime.engine import load_engine
    from ..runtime.spec import open_model

    src = Path(args.model) if args.model else builtin_model_path()
    methods = [m for m in args.methods.split(",") if m]
    folder = default_cache() / "quality" / src.stem
    folder.mkdir(parents=True, exist_ok=True)
    src_spec = open_model(src)
    tokenizer = src_spec.load_tokenizer()
    files, reports = {}, {}
    for method in methods:
        if method == "f16":
            files[method] = src
            continue
        t0 = time.perf_counter()
        report = quantize_model(src, folder / f"{method}.gguf", method=method, calibration_data=args.calibration,
                                tokenizer=tokenizer)
        files[method] = report.path
        reports[method] = {"seconds": time.perf_counter() - t0, "bytes": report.bytes_written,
                           "gptq_matrices": len(report.layers),
                           "gptq_error": _mean(report.layers, "gptq_error"), "rtn_error": _mean(report.layers, "rtn_error")}
        print(f"[quality] {method}: {report.bytes_written / 1e6:.2f} MB in {reports[method]['seconds']:.1f} s", flush=True)

    ids = tokenizer.encode(_held_out(args))[:args.max_tokens]
    text_bytes = sum(len(tokenizer.token_bytes(t)) for t in ids[1:] if t not in
                     {tokenizer.bos_token_id, *tokenizer.eos_token_ids})
    runtimes = {"both": ["exact", "default"], "exact": ["exact"], "default": ["default"]}[args.runtime]
    results: dict[str, dict] = {m: {"file": str(files[m]), "bytes": files[m].stat().st_size, **reports.get(m, {})}
                                for m in methods}
    base = load_engine(src, exact=True)
    for runtime in runtimes:
        engines = {m: load_engine(files[m], exact=runtime == "exact") for m in methods}
        t0 = time.perf_counter()
        scores = compare(engines, base, ids, args.ctx, args.stride)
        print(f"[quality] {runtime}: {len(methods)} models on {len(ids)} tokens in {time.perf_counter() - t0:.0f} s",
              flush=True)
        for m, s in scores.items():
            s["bits_per_byte"] = s["nll_sum"] / math.log(2) / text_bytes
            results[m][runtime] = s
    n_params = sum(_numel(t.shape) for t in src_spec.checkpoint.tensors.values())
    headers = ["method", "MB", "bits/weight"]
    for runtime in runtimes:
        headers += [f"ppl ({runtime})", f"bits/byte ({runtime})", f"KL vs f16 ({runtime})", f"same top ({runtime})"]
    rows = []
    for m in methods:
        r = results[m]
        row = [m, round(r["bytes"] / 1e6, 2), round(8 * r["bytes"] / n_params, 2)]
        for runtime in runtimes:
            s = r[runtime]
            row += [f"{s['perplexity']:.4f}", f"{s['bits_per_byte']:.4f}", f"{s['kl_divergence']:.5f}",
                    f"{100 * s['same_top_token']:.2f}%"]
        rows.append(row)
    table = markdown_table(headers, rows)
    meta = {"model": str(src), "tokens": len(ids), "bytes": text_bytes, "ctx": args.ctx, "stride": args.stride,
            "text": args.text or "built-in held-out split (stdlib)", "calibration": args.calibration or "built-in corpus"}
    print(table)
    save(Path(args.out), "quality", {"meta": meta, "results": results}, table)
    return 0


def _mean(layers: list[dict], key: str) -> float | None:
    return sum(l[key] for l in layers) / len(layers) if layers else None


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
