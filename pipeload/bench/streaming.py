"""`pipeload bench streaming`: models larger than memory, under a budget, beside their disk bound.

Parts (all on synthetic Llama-shaped GGUF files with random weights, generated into the bench cache):
  budget   tokens/s against memory budget (table + PNG), 7B shape at Q4_K_M by default
  batch    tokens/s against batch size at one budget
  hf       the same file loaded whole by Hugging Face transformers (the memory column)
  big      a model larger than RAM: pipeload at several budgets against llama.cpp's default mmap
  soak     many prompts under the budget: no failure, peak RSS flat across the run
  --against-mmap  only: llama.cpp's mmap and pipeload in one memory cgroup of each limit (against_mmap.py)
Every figure is printed with its bound: batch / max(streamed bytes / disk, resident bytes / memory,
flops / peak flops), the disk bandwidth measured in the same process by a cold read of exactly the
streamed bytes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import against_mmap
from .harness import default_cache, markdown_table, median, run_child, save
from .synth import SHAPES, LlamaShape, write_synthetic_gguf

GB = 10**9

# One measurement in a fresh process: load under the budget, measure the disk floor, generate.
_RUN = r"""
import json, sys, time
import pipeload
from pipeload import PipelineModel
from pipeload.runtime.memory import peak_rss
from pipeload.inspect import parameter_count
path, budget, batch, tokens, ctx, prompt_len = sys.argv[1:7]
budget = None if budget == "none" else int(budget)
batch, tokens, ctx, prompt_len = int(batch), int(tokens), int(ctx), int(prompt_len)
t0 = time.perf_counter()
m = PipelineModel.from_pretrained(path, memory_limit=budget, batch_size=batch, ctx=ctx)
load_s = time.perf_counter() - t0
layers = m.engine.executor.layers
streamed = hasattr(layers, "measure_cold_read") and bool(layers.order)
disk = layers.measure_cold_read() if streamed else float("nan")
prompts = [[(7 * b + 13 * i) % 4000 + 3 for i in range(prompt_len)] for b in range(batch)]
for r in m.stream(prompts if batch > 1 else prompts[0], max_tokens=tokens, ignore_eos=True):
    pass
st = m.stats
if streamed:  # noise only slows a read down: the best of two cold reads estimates the disk's capability
    disk = max(disk, layers.measure_cold_read())
plan = m.plan
def tensor_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
resident_bytes = plan.resident_weight_bytes if plan else tensor_bytes(m.engine.model) + sum(
    tensor_bytes(b) for b in m.engine.executor.layers.blocks)
print(json.dumps({
    "budget": budget, "batch": batch, "tokens_per_s": st["generation_tps"], "prompt_tps": st["prompt_tps"],
    "decode_passes": st["decode_passes"] if "decode_passes" in st else None,
    "peak_rss": peak_rss(), "bytes_read": st.get("bytes_read", 0), "load_seconds": load_s,
    "streamed_bytes": plan.streamed_bytes if plan else 0, "resident_bytes": resident_bytes,
    "predicted_peak": plan.predicted_peak if plan else None, "io_mode": m.engine.io_mode,
    "disk_bw": disk, "params": parameter_count(m.engine.index),
}))
"""

_HF = r"""
import json, sys, time
import pipeload, torch, transformers
from pipeload.runtime.memory import peak_rss
path = sys.argv[1]
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(str(__import__("pathlib").Path(path).parent),
    gguf_file=__import__("pathlib").Path(path).name, dtype=torch.bfloat16)
load_s = time.perf_counter() - t0
ids = torch.arange(3, 35)[None]
t0 = time.perf_counter()
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, do_sample=False)
print(json.dumps({"peak_rss": peak_rss(), "load_seconds": load_s, "seconds_4_tokens": time.perf_counter() - t0}))
"""

_LLAMA_CPP = r"""
import json, sys, time
import llama_cpp
from pipeload.runtime.memory import peak_rss
path, tokens = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, use_mmap=True, verbose=False)
load_s = time.perf_counter() - t0
ids = list(range(3, 35))
t0 = time.perf_counter()
llm.eval(ids)
prompt_s = time.perf_counter() - t0
times = []
for _ in range(tokens):
    t0 = time.perf_counter()
    tok = llm.sample(temp=0.0)
    llm.eval([tok])
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"seconds_per_token": times[len(times) // 2], "prompt_seconds": prompt_s, "load_seconds": load_s,
                  "peak_rss": peak_rss()}))
"""


def bound(r: dict) -> tuple[float, str]:
    """(tokens/s bound, which floor) from one run's own measurements."""
    floors = {"disk": r["streamed_bytes"] / r["disk_bw"] if r["streamed_bytes"] else 0.0,
              "memory": r["resident_bytes"] / r["memory_bw"],
              "compute": 2 * r["params"] * r["batch"] / r["peak_flops"]}
    which = max(floors, key=floors.get)
    return r["batch"] / floors[which], which


def _model(args, shape: LlamaShape, mix: str, name: str) -> Path:
    path = Path(args.cache) / f"{name}-{mix}.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_synthetic_gguf(path, shape, mix)
    return path


_MACHINE = r"""
import json
import pipeload
from pipeload.runtime.probe import memory_bandwidth, matmul_flops
print(json.dumps({"memory_bw": memory_bandwidth(), "peak_flops": matmul_flops()}))
"""
_machine_cache: dict = {}


def machine() -> dict:
    """Memory bandwidth and matmul throughput, measured once per benchmark in their own process."""
    if not _machine_cache:
        _machine_cache.update(run_child(_MACHINE))
    return _machine_cache


def _measure(args, path: Path, budget, batch: int, tokens: int) -> dict:
    runs = []
    for _ in range(args.repeats):
        runs.append(run_child(_RUN, path, budget if budget is not None else "none", batch, tokens, args.ctx,
                              args.prompt))
    best = {**runs[0], **machine(), "_tokens": tokens}
    for key in ("tokens_per_s", "prompt_tps", "disk_bw", "peak_rss", "bytes_read"):
        best[key] = median([r[key] for r in runs])
    best["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return best


def _row(label, r: dict) -> list:
    b, which = bound(r)
    per_token = r["bytes_read"] / max(1, r["batch"] * r["_tokens"])
    return [label, r["batch"], f"{r['peak_rss'] / GB:.2f}", f"{r['tokens_per_s']:.3f}", f"{b:.3f} ({which})",
            f"{r['tokens_per_s'] / b:.0%}", f"{r['streamed_bytes'] / GB:.2f}", f"{per_token / GB:.2f}",
            f"{r['disk_bw'] / GB:.2f}" if r["streamed_bytes"] else "-", r["io_mode"] or "-"]


HEADERS = ["budget", "batch", "peak RSS GB", "tok/s", "bound tok/s", "of bound", "streamed GB/pass",
           "read GB/token", "disk GB/s (same run)", "io"]


def part_budget(args, path: Path) -> dict:
    rows, data = [], []
    for budget in args.budgets:
        r = _measure(args, path, budget, 1, args.tokens)
        data.append(r)
        rows.append(_row("none" if budget is None else f"{budget / GB:g} GB", r))
        print(markdown_table(HEADERS, rows[-1:]), flush=True)
    table = markdown_table(HEADERS, rows)
    save(Path(args.out), "streaming-budget", data, table)
    _plot_budget(Path(args.out) / "streaming-budget.png", data)
    return {"table": table, "data": data}


def _plot_budget(png: Path, data: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    xs = [(r["budget"] or r["peak_rss"]) / GB for r in data]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["tokens_per_s"] for r in data], "o-", label="pipeload (measured)")
    ax.plot(xs, [bound(r)[0] for r in data], "k--", label="bound (disk/memory, same run)")
    ax.set_xlabel("memory budget (GB); last point: unlimited, at its peak RSS")
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot: {png}")


def _does_not_fit(error: RuntimeError) -> str | None:
    """The planner's one-line refusal inside a failed child's message, if that is why it failed."""
    lines = [l for l in str(error).splitlines() if "MemoryBudgetError:" in l]
    return lines[-1].split("MemoryBudgetError:", 1)[1].strip() if lines else None


def part_batch(args, path: Path) -> dict:
    rows, data = [], []
    for batch in args.batches:
        try:
            r = _measure(args, path, args.batch_budget, batch, args.tokens)
        except RuntimeError as e:  # a batch whose KV cache and activations do not fit: say so, go on
            if (why := _does_not_fit(e)) is None:
                raise
            print(f"batch {batch}: {why}", flush=True)
            rows.append([f"{args.batch_budget / GB:g} GB", batch, "does not fit: " + why] + [""] * 7)
            continue
        data.append(r)
        rows.append(_row(f"{args.batch_budget / GB:g} GB", r))
        print(markdown_table(HEADERS, rows[-1:]), flush=True)
    table = markdown_table(HEADERS, rows)
    save(Path(args.out), "streaming-batch", data, table)
    return {"table": table, "data": data}


def part_hf(args, path: Path) -> dict:
    r = run_child(_HF, path, timeout=7200)
    table = markdown_table(["loader", "peak RSS GB", "load s", "s for 4 tokens"],
                           [["transformers (from_pretrained, bf16)", f"{r['peak_rss'] / GB:.2f}", f"{r['load_seconds']:.0f}",
                             f"{r['seconds_4_tokens']:.1f}"]])
    print(table)
    save(Path(args.out), "streaming-hf", r, table)
    return {"table": table, "data": r}


def part_big(args) -> dict:
    shape = SHAPES["70b"]
    shape = LlamaShape(shape.dim, args.big_layers, shape.n_heads, shape.n_kv_heads, shape.ffn_dim, shape.vocab, 4096)
    path = _model(args, shape, "q4_k_m", f"70b-{args.big_layers}l")
    from ..weights.io import drop_from_page_cache

    rows, data = [], {}
    if not args.skip_llama_cpp:
        drop_from_page_cache(path)
        r = run_child(_LLAMA_CPP, path, args.big_tokens, timeout=7200)
        data["llama.cpp mmap"] = r
        rows.append(["llama.cpp (default mmap)", "page cache decides", f"{r['seconds_per_token']:.1f}", "-", "-"])
        print(rows[-1], flush=True)
    for budget in args.big_budgets:
        drop_from_page_cache(path)
        r = _measure(argparse.Namespace(**{**vars(args), "repeats": 1}), path, budget, 1, args.big_tokens)
        b, which = bound(r)
        data[f"pipeload {budget / GB:g} GB"] = r
        rows.append([f"pipeload, budget {budget / GB:g} GB", f"{r['peak_rss'] / GB:.1f} GB peak",
                     f"{1 / r['tokens_per_s']:.1f}", f"{1 / b:.1f} ({which})", f"{r['tokens_per_s'] / b:.0%}"])
        print(rows[-1], flush=True)
    table = markdown_table(["runner", "memory", "s/token", "floor s/token", "of bound"], rows)
    table = f"model: {path.name}, {path.stat().st_size / GB:.1f} GB\n\n" + table
    save(Path(args.out), "streaming-larger-than-ram", data, table)
    return {"table": table, "data": data}


def part_soak(args, path: Path) -> dict:
    code = r"""
import json, sys
import pipeload
from pipeload import PipelineModel
from pipeload.runtime.memory import peak_rss, current_rss
path, budget, n_prompts, tokens, batch, ctx = sys.argv[1:7]
m = PipelineModel.from_pretrained(path, memory_limit=int(budget), batch_size=int(batch), ctx=int(ctx))
peaks, done = [], 0
prompts = [[(31 * p + 7 * i) % 3000 + 5 for i in range(8 + p % 13)] for p in range(int(n_prompts))]
for s in range(0, len(prompts), int(batch)):
    chunk = prompts[s:s + int(batch)]
    finished = {r.sequence for r in m.stream(chunk, max_tokens=int(tokens), ignore_eos=True, temperature=0.8, seed=s)
                if r.finish_reason}
    done += len(finished)
    peaks.append(peak_rss())
print(json.dumps({"completed": done, "peaks": peaks, "final_rss": current_rss()}))
"""
    r = run_child(code, path, args.batch_budget, args.soak_prompts, args.soak_tokens,
                  args.soak_batch, args.ctx, timeout=4 * 3600)
    peaks = r["peaks"]
    table = markdown_table(["prompts", "tokens each", "completed", "peak RSS after first batch GB", "peak RSS at end GB",
                            "budget GB"], [[args.soak_prompts, args.soak_tokens, r["completed"], f"{peaks[0] / GB:.3f}",
                                            f"{peaks[-1] / GB:.3f}", f"{args.batch_budget / GB:g}"]])
    print(table)
    save(Path(args.out), "streaming-soak", r, table)
    return {"table": table, "data": r}


def _sizes(text: str) -> list:
    return [None if x.strip() == "none" else int(float(x) * GB) for x in text.split(",")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parts", default="budget,batch,hf,soak", help="budget,batch,hf,big,soak")
    p.add_argument("--shape", default="7b", choices=sorted(SHAPES), help="model shape (default 7b)")
    p.add_argument("--mix", default="q4_k_m", help="quant mix (default q4_k_m)")
    p.add_argument("--budgets", type=_sizes, default=_sizes("1.5,2,3,4,6,none"), help="GB list; 'none' = unlimited")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--batch-budget", type=lambda s: int(float(s) * GB), default=2 * GB, help="GB for batch/soak parts")
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per measurement")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per point (median)")
    p.add_argument("--big-layers", type=int, default=56, help="layers of the 70B-shaped larger-than-RAM model")
    p.add_argument("--big-budgets", type=_sizes, default=_sizes("8,16,20"))
    p.add_argument("--big-tokens", type=int, default=3)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--soak-prompts", type=int, default=50)
    p.add_argument("--soak-tokens", type=int, default=100)
    p.add_argument("--soak-batch", type=int, default=8)
    p.add_argument("--cache", default=str(default_cache()), help="where generated models go")
    against_mmap.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    parts = ["against_mmap"] if args.against_mmap else args.parts.split(",")
    t0 = time.time()
    shape, name = SHAPES[args.shape], args.shape
    if args.shape == "70b":  # sized by its layer count
        shape, name = LlamaShape(shape.dim, args.big_layers, shape.n_heads, shape.n_kv_heads, shape.ffn_dim,
                                 shape.vocab, 4096), f"70b-{args.big_layers}l"
    path = _model(args, shape, args.mix, name) if set(parts) - {"big"} else None
    report = {}
    for part in parts:
        print(f"\n== {part} ==", flush=True)
        if part == "big":
            report[part] = part_big(args)
        else:
            report[part] = {"against_mmap": against_mmap.part_against_mmap, "budget": part_budget, "batch": part_batch, "hf": part_hf, "soak": part_soak}[part](args, path)
    summary = "\n\n".join(f"## {k}\n\n{v['table']}" for k, v in report.items())
    (Path(args.out) / "streaming.md").write_text(summary + "\n")
    print(f"\n{summary}\n\n(results in {args.out}, {time.time() - t0:.0f} s)")
    return 0
