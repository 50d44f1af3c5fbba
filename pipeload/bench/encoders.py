"""`pipeload bench encoders`: seed 002's encoder table, measured here, side by side in one run.

For BERT-base-shaped (random weights, float32 as published), the real all-MiniLM-L6-v2 and
ViT-Base/16-shaped models: peak memory and samples/s of

- transformers, the model loaded whole ("standard PyTorch": AutoModel + its tokenizer / image
  processor, mean pooling for text as sentence-transformers does);
- pipeload resident (`PipelineModel.from_pretrained(path)`);
- pipeload under budgets leaving 50% and 25% of the weights' bytes for weights (planner.py
  budget_for_weights: the runtime, activations and margin come on top), the rest streamed;
- transformers inside the 25% budget's cgroup (what the seed calls standard PyTorch thrashing).

Each contender runs in a fresh process inside its own cgroup-v1 memory group (bench/cgroup.py):
the peak is the group's `memory.max_usage_in_bytes` (anonymous memory and page cache: model
files, libraries); budgeted runs have the budget as the group's hard limit. A call embeds exactly
`batch` inputs (one pass over the weights); samples/s = batch / median seconds per call, over up
to --repeats timed calls after one warm-up call (fewer when a call takes long: see "calls").
Two peaks are shown: the cgroup's, and the process's peak RSS (VmHWM). They differ because a
page of a shared file (torch's libraries) is charged to the cgroup that first read it into the
cache, which on a machine where pipeload already ran is not the child's; RSS counts those
mapped pages in every process. The larger of the two is the honest figure for a fresh machine.
Beside each figure, the bound of DESIGN.md for one pass: max(streamed bytes / disk bandwidth,
resident bytes / memory bandwidth, FLOPs / float32 matmul FLOP/s), all measured in this run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .harness import default_cache, markdown_table, run_child, save

GB = 1e9

_CHILD = r"""
import json, statistics, sys, time
mode, kind, path, budget, batches, ctx, threads, repeats, max_seconds = sys.argv[1:10]
import pipeload
import torch
torch.set_num_threads(int(threads))
batches = [int(b) for b in batches.split(",")]
repeats, max_seconds, ctx = int(repeats), float(max_seconds), int(ctx)
WORDS = ("memory stream layer weight budget pass disk cache token vector model small machine large "
         "encoder batch padding attention query key value sentence image patch class label").split()

def texts(n, seed):
    out = []
    for i in range(n):
        words = [WORDS[(seed * 7919 + i * 104729 + j * 31) % len(WORDS)] for j in range(ctx - 8)]
        out.append(" ".join(words))
    return out

def images(n, seed):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(n)]

make = texts if kind == "text" else images
t0 = time.perf_counter()
info = {}
if mode == "pipeload":
    import warnings
    from pipeload import PipelineModel
    warnings.simplefilter("ignore")  # truncation / pooling notes
    model = PipelineModel.from_pretrained(path, memory_limit=None if budget == "none" else int(budget),
                                          batch_size=max(batches), ctx=ctx if kind == "text" else None)
    run = lambda xs: model.embed(xs, batch_size=len(xs))
    plan = model.plan
    stream = model.engine.stream_stats
    info0 = {"bytes_read": stream.as_dict().get("bytes_read", 0)} if stream is not None else {}
    if plan is not None:
        info = {"streamed_bytes": plan.streamed_bytes, "resident_bytes": plan.resident_weight_bytes,
                "predicted_peak": plan.predicted_peak, "streamed_groups": len(plan.streamed),
                "token_rows_on_disk": plan.token_rows_on_disk}
    else:
        info = {"streamed_bytes": 0, "resident_bytes": model.engine.index.total_bytes}
else:
    import transformers as tf
    if kind == "text":
        tok = tf.AutoTokenizer.from_pretrained(path)
        net = tf.AutoModel.from_pretrained(path).eval()
        def run(xs):
            with torch.inference_mode():
                enc = tok(xs, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
                h = net(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    else:
        proc = tf.AutoImageProcessor.from_pretrained(path)
        net = tf.AutoModelForImageClassification.from_pretrained(path).eval()
        def run(xs):
            with torch.inference_mode():
                return net(**proc(xs, return_tensors="pt")).logits
    info = {"streamed_bytes": 0, "resident_bytes": sum(p.numel() * p.element_size() for p in net.parameters())}
load_s = time.perf_counter() - t0
if mode == "pipeload":
    info.update(info0)
run(make(1, 999))  # warm-up: first-touch of weights, kernel choice
results = {}
for b in batches:
    times, total = [], 0.0
    while len(times) < repeats and (not times or total < max_seconds):
        xs = make(b, len(times))
        t = time.perf_counter()
        run(xs)
        times.append(time.perf_counter() - t)
        total += times[-1]
    results[b] = {"seconds": times, "samples_per_s": b / statistics.median(times)}
from pipeload.runtime.memory import peak_rss
if mode == "pipeload" and model.engine.stream_stats is not None:
    info["bytes_read_total"] = model.engine.stream_stats.as_dict().get("bytes_read", 0)
print(json.dumps({"load_s": load_s, "results": results, "peak_rss": peak_rss(), **info}))
"""

_MACHINE = r"""
import json, sys
from pathlib import Path
import pipeload
import torch
torch.set_num_threads(int(sys.argv[2]))
from pipeload.runtime.memory import current_rss
from pipeload.runtime.probe import disk_bandwidth, matmul_flops, memory_bandwidth
disk = disk_bandwidth(Path(sys.argv[1]))
import transformers, tokenizers, PIL.Image  # what a child holds before its model
print(json.dumps({"memory_bw": memory_bandwidth(), "peak_flops": matmul_flops(torch.float32),
                  "disk_bw": max(disk["direct"], disk["buffered"]), "runtime_rss": current_rss()}))
"""


def _models(args) -> list[dict]:
    from .encoder_synth import write_bert_base_shape, write_vit_base_shape

    cache = Path(args.cache)
    minilm = Path(args.minilm)
    out = []
    for name in args.models.split(","):
        if name == "bert-base":
            out.append({"name": "BERT-base shape", "kind": "text", "ctx": args.tokens,
                        "path": write_bert_base_shape(cache / "encoders-bert-base-shape", minilm)})
        elif name == "minilm":
            out.append({"name": "all-MiniLM-L6-v2 (real)", "kind": "text", "ctx": args.tokens, "path": minilm})
        elif name == "vit-base":
            out.append({"name": "ViT-B/16 shape", "kind": "image", "ctx": 197,
                        "path": write_vit_base_shape(cache / "encoders-vit-base16-shape")})
        else:
            raise ValueError(f"unknown model {name!r}: choose from bert-base, minilm, vit-base")
    return out


def _shape(path: Path, kind: str) -> dict:
    """Parameters in the blocks and head (what each token multiplies), layers, width, weight bytes."""
    from ..runtime.spec import open_model

    spec = open_model(path)
    a = spec.args
    matrices = sum(r.shape[0] * r.shape[1] for g, group in spec.index.groups.items() if g != "embed"
                   for r in group.tensors if len(r.shape) == 2)
    return {"matrix_params": matrices, "n_layers": a.n_layers, "dim": a.dim,
            "weight_bytes": spec.index.total_bytes, "spec": spec}


def _flops(shape: dict, batch: int, tokens: int) -> float:
    """FLOPs of one pass over `batch` inputs of `tokens` tokens: the matrices, and attention's
    two (T x T x D) products per layer."""
    return batch * (2 * shape["matrix_params"] * tokens + 4 * shape["n_layers"] * tokens * tokens * shape["dim"])


def _bound(r: dict, m: dict, flops: float, batch: int) -> tuple[float, str]:
    floors = {"disk": r.get("streamed_bytes", 0) / m["disk_bw"], "memory": r["resident_bytes"] / m["memory_bw"],
              "compute": flops / m["peak_flops"]}
    which = max(floors, key=floors.get)
    return batch / floors[which], which


def _contenders(args, model: dict, shape: dict, machine: dict) -> list[tuple[str, str, int | None]]:
    """(label, mode, cgroup limit = pipeload's memory_limit or None) for each contender."""
    from ..runtime.planner import budget_for_weights

    batch = max(int(b) for b in args.batches.split(","))
    out = [("transformers (standard PyTorch)", "transformers", None), ("pipeload resident", "pipeload", None)]
    budgets = {}
    for fraction in (float(f) for f in args.fractions.split(",")):
        limit = budget_for_weights(shape["spec"], fraction, machine["runtime_rss"], model["ctx"], batch, 2)
        budgets[fraction] = limit
        out.append((f"pipeload, {fraction:.0%} of weights ({limit / GB:.2f} GB limit)", "pipeload", limit))
    if args.transformers_in_budget and budgets:
        f = min(budgets)
        out.append((f"transformers in the {f:.0%} cgroup ({budgets[f] / GB:.2f} GB)", "transformers", budgets[f]))
    return out


def _run_one(args, model: dict, mode: str, limit: int | None) -> dict:
    from .cgroup import available, run_in_cgroup

    child_args = [mode, model["kind"], model["path"], "none" if limit is None or mode == "transformers" else limit,
                  args.batches, model["ctx"], args.threads, args.repeats, args.max_seconds]
    if not available():
        raise RuntimeError("pipeload bench encoders measures peak memory in cgroup-v1 memory groups: run it as "
                           "root on a machine with /sys/fs/cgroup/memory")
    # a budgeted transformers run is the cgroup limit alone (it has no budget of its own)
    done = run_in_cgroup(_CHILD, child_args, limit, timeout=args.timeout)
    return {"result": done.result, "max_usage": done.max_usage, "limit": limit, "limit_hits": done.limit_hits,
            "oom_killed": done.oom_killed, "returncode": done.returncode,
            "stderr": done.stderr[-600:] if done.result is None else ""}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="bert-base,minilm,vit-base", help="bert-base, minilm, vit-base (comma-separated)")
    p.add_argument("--batches", default="1,8,64", help="inputs per call (one pass over the weights each)")
    p.add_argument("--fractions", default="0.5,0.25", help="budgets: fractions of the weights' bytes held")
    p.add_argument("--tokens", type=int, default=40, help="tokens per text input, special tokens included")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per batch (median)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a batch after this long")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every contender")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a contender is killed")
    p.add_argument("--no-transformers-in-budget", dest="transformers_in_budget", action="store_false",
                   help="skip transformers inside the smallest budget's cgroup")
    p.add_argument("--minilm", default=str(Path.home() / ".cache" / "pipeload" / "models" / "all-minilm-l6-v2"))
    p.add_argument("--cache", default=str(default_cache()), help="where the synthetic models are written")


def run(args: argparse.Namespace) -> int:
    models = _models(args)
    machine = run_child(_MACHINE, models[0]["path"] / "model.safetensors", args.threads)
    print(f"machine ({args.threads} threads): memory {machine['memory_bw'] / GB:.1f} GB/s, float32 matmul "
          f"{machine['peak_flops'] / 1e9:.0f} GFLOP/s, disk {machine['disk_bw'] / GB:.2f} GB/s, runtime "
          f"{machine['runtime_rss'] / GB:.2f} GB", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    data = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k != "func"}, "models": []}
    rows = []
    for model in models:
        shape = _shape(model["path"], model["kind"])
        entry = {"name": model["name"], "path": str(model["path"]), "weight_bytes": shape["weight_bytes"],
                 "contenders": []}
        for label, mode, limit in _contenders(args, model, shape, machine):
            t0 = time.perf_counter()
            r = _run_one(args, model, mode, limit)
            entry["contenders"].append({"label": label, **r})
            print(f"  {model['name']}: {label}: {time.perf_counter() - t0:.0f} s", flush=True)
            for b in batches:
                rows.append(_row(model, shape, machine, label, r, b))
        data["models"].append(entry)
    headers = ["model (weights)", "contender", "batch", "peak GB (cgroup)", "peak RSS GB", "samples/s",
               "bound samples/s", "of bound", "calls"]
    table = markdown_table(headers, rows) + "\n\n" + _summary(data, max(batches))
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    save(Path(args.out), f"encoders-{stamp}", data, table)
    print(f"\nresults: {Path(args.out) / f'encoders-{stamp}.json'} and .md")
    return 0


def _failure(r: dict) -> str:
    """What happened to a contender that returned no result: its cgroup OOM-killed it, or it failed."""
    return "OOM-killed" if r["oom_killed"] else f"failed (exit {r['returncode']})"


def _row(model: dict, shape: dict, machine: dict, label: str, r: dict, batch: int) -> list:
    name = f"{model['name']} ({shape['weight_bytes'] / GB:.2f} GB)"
    res = r["result"]
    if res is None:
        return [name, label, batch, f"{r['max_usage'] / GB:.2f}", "-", _failure(r), "-", "-", "-"]
    one = res["results"][str(batch)] if str(batch) in res["results"] else res["results"][batch]
    tokens = model["ctx"]
    bound, which = _bound(res, machine, _flops(shape, batch, tokens), batch)
    return [name, label, batch, f"{r['max_usage'] / GB:.2f}", f"{res['peak_rss'] / GB:.2f}",
            f"{one['samples_per_s']:.2f}", f"{bound:.1f} ({which})", f"{one['samples_per_s'] / bound:.0%}",
            len(one["seconds"])]


def _summary(data: dict, batch: int) -> str:
    """Per model at the largest batch: peaks and speeds against transformers and pipeload resident."""
    rows = []
    for entry in data["models"]:
        by = {c["label"]: c for c in entry["contenders"]}
        resident = next(c for label, c in by.items() if label == "pipeload resident")
        ref = next(c for label, c in by.items() if label.startswith("transformers (standard"))

        def speed(c):
            r = c["result"]
            return r["results"][str(batch)]["samples_per_s"] if r is not None else None

        def ratio(c, base):
            return "-" if speed(c) is None or speed(base) is None else f"{speed(c) / speed(base):.2f}x"

        for label, c in by.items():
            peak = max(c["max_usage"], c["result"]["peak_rss"]) if c["result"] is not None else c["max_usage"]
            rows.append([entry["name"], label, f"{peak / GB:.2f}",
                         _failure(c) if speed(c) is None else f"{speed(c):.2f}", ratio(c, ref), ratio(c, resident)])
    return (f"At batch {batch} (peak = the larger of cgroup peak and peak RSS):\n\n"
            + markdown_table(["model", "contender", "peak GB", "samples/s", "vs transformers", "vs pipeload resident"],
                             rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeload.bench.encoders", description=__doc__)
    p.add_argument("--out", default="bench-results")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
