"""`pipeload bench compute`: the race with llama.cpp on the same GGUF files, llama-bench style.

A 1.1B Llama shape (TinyLlama's) with random weights (bench/synth.py) at Q4_K_M, Q8_0, Q6_K,
Q5_K_M, Q4_0 and F16, and the real models of REAL_MODELS where present (`--models`). For each file,
pipeload and llama.cpp (llama-cpp-python) run in fresh processes, alternating, with the same thread
count: prompt processing of 128 and 512 tokens (one pass from an empty cache) and generation of
128 tokens one at a time. pipeload is measured as users run it, through `PipelineModel.generate`
(greedy; the prompt figure is its prompt pass, the generation figure its decode passes, from
`model.stats`); llama.cpp through `eval` (llama_decode), as llama-bench does (no sampling cost).
Medians of the runs, ratios to llama.cpp, the bytes each engine reads per generated token (pipeload:
every weight its linears compute on, counted from the loaded model; llama.cpp: every tensor but the
embedding table) and the memory-bandwidth bound of generation: memory bandwidth (measured in this
run) / those bytes. The kernels that ran are printed per run. The load average is recorded before
and after every run: timings on a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from .harness import default_cache, markdown_table, median, run_child, save
from .synth import SHAPES, write_synthetic_gguf

FORMATS = ["q4_k_m", "q8_0", "q6_k", "q5_k_m", "q4_0", "f16"]
REAL_MODELS = ["qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"]  # in ~/.cache/pipeload/models (shared/models/fetch.sh)

_PIPELOAD = r"""
import json, os, sys, time
import pipeload, torch
from pipeload import PipelineModel
from pipeload.models.common import Embedding
from pipeload.quant import ops
from pipeload.quant.ops import GGMLWeight
from pipeload.runtime.memory import peak_rss
path, threads, prompts, gen = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], int(sys.argv[4])
torch.set_num_threads(threads)
t0 = time.perf_counter()
model = PipelineModel.from_pretrained(path, dtype=os.environ.get("PIPELOAD_BENCH_DTYPE", "auto"))
load_s = time.perf_counter() - t0
eng = model.engine
g = torch.Generator().manual_seed(0)
ids = torch.randint(100, eng.args.vocab_size - 1, (max(prompts) + gen + 1,), generator=g).tolist()

def pp(n):  # the prompt pass of generate() (one token sampled from it)
    model.generate(ids[:n], max_tokens=1, ignore_eos=True)
    return model.stats["prompt_tokens"] / model.stats["prompt_seconds"]

def tg(n):  # generate()'s decode passes (greedy), after a one-token prompt
    model.generate(ids[:1], max_tokens=n + 1, ignore_eos=True)
    return model.stats["generation_tps"]

pp(32); tg(4)  # warm up (and build the kernels once)
calls = ops.kernel_calls()
out = {f"pp{n}": pp(n) for n in prompts}
out[f"tg{gen}"] = tg(gen)
# bytes one decode step reads: every weight a linear computes on (the blocks as stored, once each)
# and the norms; the embedding table only where it is also the output head (tied)
ex = eng.executor
mods = [eng.model] + [ex.layers.acquire(i) for i in range(ex.n_layers)]
seen, read = set(), 0
for root in mods:
    for m in root.modules():
        for name in ("weight", "bias"):
            w = getattr(m, name, None)
            if isinstance(m, Embedding) and name == "weight":
                continue
            t = w.blocks if isinstance(w, GGMLWeight) else w
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                read += t.numel() * t.element_size()
for i in range(ex.n_layers):
    ex.layers.release(i)
out.update(load_s=load_s, peak_rss=peak_rss(), read_bytes_per_token=read, kernels=ops.describe_kernels(calls))
print(json.dumps(out))
"""

_LLAMA_CPP = r"""
import json, sys, time
import llama_cpp
from pipeload.runtime.memory import peak_rss
import random
path, threads, prompts, gen = sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], int(sys.argv[4])
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=max(prompts) + gen + 8, n_batch=512, n_ubatch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
load_s = time.perf_counter() - t0
rng = random.Random(0)
ids = [rng.randrange(100, llm.n_vocab() - 1) for _ in range(max(prompts) + gen + 1)]

def pp(n):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[:n])
    return n / (time.perf_counter() - t)

def tg(n):
    llm.reset()
    llm.eval(ids[:1])
    t = time.perf_counter()
    for i in range(1, n + 1):
        llm.eval(ids[i:i + 1])
    return n / (time.perf_counter() - t)

pp(32); tg(4)
out = {f"pp{n}": pp(n) for n in prompts}
out[f"tg{gen}"] = tg(gen)
out.update(load_s=load_s, peak_rss=peak_rss())
print(json.dumps(out))
"""

_BANDWIDTH = r"""
import json, pipeload, torch
from pipeload.runtime.probe import memory_bandwidth
torch.set_num_threads(int(__import__("sys").argv[1]))
print(json.dumps({"memory_bandwidth": memory_bandwidth(512 << 20, repeats=7)}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated mixes (default {','.join(FORMATS)})")
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="model shape (default 1b: TinyLlama 1.1B)")
    p.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    p.add_argument("--prompts", default="128,512", help="prompt lengths (default 128,512)")
    p.add_argument("--gen", type=int, default=128, help="tokens generated (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine and file, alternating (default 3)")
    p.add_argument("--engines", default="pipeload,llama.cpp",
                   help="which engines (default both; pipeload-bf16: pipeload with bfloat16 activations)")
    p.add_argument("--models", default=None,
                   help="comma-separated GGUF files to race as well (default: the real models of REAL_MODELS "
                        "found in ~/.cache/pipeload/models; '' for none)")
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the pipeload runs (repeatable)")


def load_average() -> float:
    return os.getloadavg()[0]


def model_file(shape: str, mix: str) -> Path:
    """The synthetic GGUF for (shape, mix) in the bench cache, written if absent."""
    path = default_cache() / f"{shape}-{mix}.gguf"
    if path.exists():
        from ..runtime.spec import open_model

        if "llama.vocab_size" not in open_model(path).checkpoint.config:  # written before llama.cpp could read it
            path.unlink()
    if not path.exists():
        print(f"[compute] writing {path} ...", flush=True)
        write_synthetic_gguf(path, SHAPES[shape], mix)
    return path


def gguf_read_bytes(path: Path) -> int:
    """Bytes llama.cpp reads per generated token: every tensor except the embedding table (which it
    does read where it is also the output head: no output.weight)."""
    from ..runtime.spec import open_model

    tensors = open_model(path).checkpoint.tensors
    tied = "output.weight" not in tensors
    return sum(t.nbytes for name, t in tensors.items() if name != "token_embd.weight" or tied)


def run(args: argparse.Namespace) -> int:
    formats = [f for f in args.formats.split(",") if f]
    engines = [e for e in args.engines.split(",") if e]
    gen_key = f"tg{args.gen}"
    tests = [f"pp{p}" for p in args.prompts.split(",")] + [gen_key]
    env = dict(kv.split("=", 1) for kv in args.env)
    files = {f: model_file(args.shape, f) for f in formats}
    labels = {f: f"llama {args.shape.upper()} {f.upper()}" for f in formats}
    if args.models is None:
        real = [Path.home() / ".cache" / "pipeload" / "models" / n for n in REAL_MODELS]
        real = [p for p in real if p.exists()]
    else:
        real = [Path(p) for p in args.models.split(",") if p]
    for p in real:
        if not p.exists():
            raise SystemExit(f"bench compute: no model file {p}")
        files[p.stem] = p
        labels[p.stem] = p.stem
        formats.append(p.stem)
    load_before = load_average()
    bandwidths = [run_child(_BANDWIDTH, args.threads)["memory_bandwidth"] for _ in range(3)]
    bandwidth = median(bandwidths)
    print(f"[compute] memory bandwidth {bandwidth / 1e9:.1f} GB/s ({args.threads} threads); load {load_before:.2f}",
          flush=True)
    code = {"pipeload": _PIPELOAD, "pipeload-bf16": _PIPELOAD, "llama.cpp": _LLAMA_CPP}
    envs = {"pipeload": env, "pipeload-bf16": {**env, "PIPELOAD_BENCH_DTYPE": "bfloat16"}}
    unknown = set(engines) - set(code)
    if unknown:
        raise SystemExit(f"bench compute: unknown engines {sorted(unknown)}; choose from {', '.join(code)}")
    results: dict[str, dict[str, list[dict]]] = {f: {e: [] for e in engines} for f in formats}
    for rep in range(args.repeats):
        for f in formats:
            for e in engines:
                before = load_average()
                t0 = time.perf_counter()
                r = run_child(code[e], files[f], args.threads, args.prompts, args.gen,
                              env=envs.get(e))
                r.update(load_before=before, load_after=load_average(), seconds=time.perf_counter() - t0)
                results[f][e].append(r)
                print(f"[compute] {f} {e} run {rep + 1}: " + ", ".join(f"{t} {r[t]:.1f}" for t in tests)
                      + f" tok/s (load {before:.2f} -> {r['load_after']:.2f})"
                      + (f" [{r['kernels']}]" if "kernels" in r else ""), flush=True)
    rows, summary = [], {}
    for f in formats:
        gguf_bytes = files[f].stat().st_size
        read_bytes = {"llama.cpp": gguf_read_bytes(files[f])}
        for e in engines:
            runs = results[f][e]
            if e in envs and runs:
                read_bytes[e] = runs[0]["read_bytes_per_token"]
            for t in tests:
                values = [r[t] for r in runs]
                med = median(values)
                ref = median([r[t] for r in results[f].get("llama.cpp", [])]) if e != "llama.cpp" else None
                bound = bandwidth / read_bytes[e] if t == gen_key and e in read_bytes else None
                summary.setdefault(f, {}).setdefault(e, {})[t] = {"median": med, "runs": values, "bound": bound}
                rows.append([labels[f], f"{gguf_bytes / 2**30:.2f} GiB", e, args.threads, t,
                             f"{med:.2f} ({min(values):.2f}-{max(values):.2f})",
                             f"{med / ref:.2f}x" if ref else "",
                             f"{read_bytes[e] / 1e6:.0f} MB" if t == gen_key and e in read_bytes else "",
                             f"{bound:.1f} ({100 * med / bound:.0f}%)" if bound else ""])
    headers = ["model", "size", "engine", "threads", "test", "t/s median (min-max)", "vs llama.cpp",
               "bytes read/token", "memory bound t/s (% reached)"]
    table = markdown_table(headers, rows)
    load_after = load_average()
    note = (f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (median of {len(bandwidths)}); load average "
            f"{load_before:.2f} before, {load_after:.2f} after; {args.repeats} alternating runs per engine and file")
    print(table + "\n\n" + note)
    save(Path(args.out), "compute", {"meta": {"shape": args.shape, "threads": args.threads, "bandwidth": bandwidth,
                                              "bandwidths": bandwidths, "load_before": load_before,
                                              "load_after": load_after, "env": env, "files": {f: str(p) for f, p in
                                                                                               files.items()}},
                                     "summary": summary, "runs": results}, table + "\n\n" + note)
    return 0
