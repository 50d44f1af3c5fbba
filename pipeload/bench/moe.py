"""`pipeload bench moe`: a mixture of experts larger than memory, pipeload's expert streaming
against llama.cpp's mmap, in the same memory cgroup, side by side in one run.

A Qwen3-30B-A3B-shaped (or Mixtral-shaped) GGUF with random weights (bench/synth_moe.py) is
written once into the bench cache. Each contender runs in a fresh process inside a cgroup-v1
memory group whose limit (page cache included) is smaller than the file; runs alternate, and
the model file's pages are dropped from the page cache before each (posix_fadvise), so neither
starts warm. Printed per run: decode tokens/s, bytes read from the disk per decoded token
(/proc/self/io: everything the process made the disk read, the page faults of llama.cpp's map
included), the bytes of the experts the tokens routed to (pipeload's counters), the expert cache's
hit rate and its guesses' recall, and two physical bounds, each measured in the run: from the
bytes pipeload actually read (disk bandwidth / expert bytes read per token) and from the bytes a
token computes with (memory read bandwidth / dense and routed weight bytes per token: each must
come from memory once). Decode cannot beat the tighter of the two.

Random routing is the worst case for an expert cache (no expert is more popular than another);
`--skew` adds runs with routers skewed as real ones are (bench/synth_moe.py).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from .harness import LLAMA_CPP_NO_REPACK, default_cache, markdown_table, median, save

GB = 1e9

_PIPELOAD = r"""
import json, os, sys, time
from pathlib import Path
import pipeload
from pipeload import PipelineModel
from pipeload.quant.kernels import read_bandwidth
from pipeload.runtime.memory import peak_rss
from pipeload.weights.io import probe_read_bandwidth

def disk_read():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

path, budget, tokens, policy, guess = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
temperature = float(sys.argv[6])
# both bandwidths before the model fills the cgroup; the disk's with as many reads in flight as the
# expert cache keeps (4)
mem_bw = read_bandwidth(min(256 << 20, budget // 4))
disk = max(probe_read_bandwidth(Path(path), nbytes=min(256 << 20, budget // 4), threads=4).values())
m = PipelineModel.from_pretrained(path, memory_limit=budget, ctx=256, expert_policy=policy)
cache = m.engine.expert_cache
if cache is None:
    sys.exit(f"{path}: the whole model fits in a budget of {budget} bytes, so no expert streams: "
             "give a smaller --limit/--budget or more --layers")
cache.guess = guess
prompt = [(13 * i) % 4000 + 3 for i in range(16)]
t_first = None
for r in m.stream(prompt, max_tokens=tokens + 1, ignore_eos=True, temperature=temperature, seed=1):
    if t_first is None:  # the prompt and the first token are done: decode starts here
        t_first, io0 = time.perf_counter(), disk_read()
        s0 = dict(cache.stats.as_dict())
t_end, io1 = time.perf_counter(), disk_read()
s1 = cache.stats.as_dict()
d = {k: s1[k] - s0[k] for k in ("hits", "guess_hits", "misses", "routed_bytes", "read_bytes", "guessed",
                                 "guessed_right", "routed_after_guess", "wait_seconds")}
uses = d["hits"] + d["guess_hits"] + d["misses"]
print(json.dumps({
    "tokens_per_s": tokens / (t_end - t_first), "disk_bytes_per_token": (io1 - io0) / tokens,
    "expert_read_per_token": d["read_bytes"] / tokens, "routed_per_token": d["routed_bytes"] / tokens,
    "hit_rate": (d["hits"] + d["guess_hits"]) / uses if uses else None,
    "cached_rate": d["hits"] / uses if uses else None,  # in the cache before this step's layer asked
    "guess_recall": d["guessed_right"] / d["routed_after_guess"] if d["routed_after_guess"] else None,
    "guess_precision": d["guessed_right"] / d["guessed"] if d["guessed"] else None,
    "wait_s_per_token": d["wait_seconds"] / tokens, "disk_bw": disk, "peak_rss": peak_rss(),
    "expert_slots": m.plan.expert_slots, "expert_total": m.plan.expert_total, "mem_bw": mem_bw,
    # every weight byte a token computes with: the dense part of each layer and the head, and its routed experts
    "computed_per_token": sum(m.plan.group_bytes.values()) - m.plan.resident_expert_bytes + d["routed_bytes"] / tokens,
    "plan_bound_read_per_token": m.plan.read_bytes_per_pass
}))
"""

_LLAMA_CPP = r"""
import json, sys, time
import llama_cpp
from pipeload.runtime.memory import peak_rss

def disk_read():
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])

""" + LLAMA_CPP_NO_REPACK + r"""
path, tokens, temperature = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, use_mmap=True, verbose=False, seed=1)
prompt = [(13 * i) % 4000 + 3 for i in range(16)]
llm.eval(prompt)
tok = llm.sample(temp=temperature)
llm.eval([tok])
t0, io0 = time.perf_counter(), disk_read()
for _ in range(tokens):
    tok = llm.sample(temp=temperature)
    llm.eval([tok])
t1, io1 = time.perf_counter(), disk_read()
print(json.dumps({"tokens_per_s": tokens / (t1 - t0), "disk_bytes_per_token": (io1 - io0) / tokens,
                  "peak_rss": peak_rss()}))
"""


def drop_file_pages(path: Path) -> None:
    """Evict the model file's clean pages from the page cache (no other file is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def model_path(args, skew: float) -> Path:
    """The benchmark's synthetic GGUF (written once into the bench cache, under a name of its own)."""
    from .synth_moe import MOE_SHAPES, file_bytes, write_moe_gguf

    shape = MOE_SHAPES[args.shape] if args.layers is None else replace(MOE_SHAPES[args.shape], n_layers=args.layers)
    # "moe2": the weights of synth_moe's token-led residual stream (files written before routed alike for every token)
    name = f"moe2-{args.shape}-{shape.n_layers}l-{args.mix}" + (f"-skew{skew:g}" if skew else "") + ".gguf"
    path = Path(args.cache) / name
    if not path.exists():
        print(f"writing {path} ({file_bytes(shape, args.mix) / GB:.2f} GB) ...", flush=True)
        write_moe_gguf(path, shape, args.mix, seed=0, router_skew=skew)
    return path


def _run(code: str, argv: list, limit: int, timeout: float) -> dict:
    from .cgroup import run_in_cgroup

    run = run_in_cgroup(code, argv, limit, timeout=timeout)
    if run.result is None:
        what = "killed by the OOM killer" if run.oom_killed else f"failed ({run.returncode})"
        return {"error": what, "stderr": run.stderr[-800:], "cgroup_peak": run.max_usage}
    return {**run.result, "cgroup_peak": run.max_usage, "limit_hits": run.limit_hits}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="qwen3-30b-a3b", help="qwen3-30b-a3b or mixtral-8x7b (bench/synth_moe.py)")
    p.add_argument("--layers", type=int, default=8, help="layers of the shape to write (sizes the file)")
    p.add_argument("--mix", default="q4_k_m")
    p.add_argument("--limit", default="2GB", help="the memory cgroup's limit (page cache included)")
    p.add_argument("--budget", default=None,
                   help="pipeload's memory_limit (default: the cgroup's limit itself, held page cache included)")
    p.add_argument("--skew", default="0", help="router skews, comma-separated (0: uniformly random routing)")
    p.add_argument("--policies", default="lru", help="expert cache policies for pipeload (lru,lfu)")
    p.add_argument("--no-guess", dest="guess", action="store_false", help="do not guess the next layer's experts")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens timed per run")
    p.add_argument("--llama-tokens", type=int, default=None,
                   help="decoded tokens timed per llama.cpp run (default: --tokens; its rate at a fraction of the time "
                        "when its mmap reads the whole file per token)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of both engines (greedy decoding of a random model repeats tokens, "
                        "and so its experts: sampling keeps routing as varied as the model makes it)")
    p.add_argument("--no-llama", dest="llama", action="store_false", help="skip llama.cpp")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--cache", default=str(default_cache()))


def run(args: argparse.Namespace) -> int:
    from ..runtime.memory import format_bytes, parse_size

    limit = parse_size(args.limit)
    budget = parse_size(args.budget) if args.budget else limit
    data, rows = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "runs": []}, []
    for skew in [float(s) for s in args.skew.split(",")]:
        path = model_path(args, skew)
        size = path.stat().st_size
        print(f"{path.name}: {format_bytes(size)}, cgroup limit {format_bytes(limit)}, pipeload budget "
              f"{format_bytes(budget)}", flush=True)
        contenders = {f"pipeload {p}": (_PIPELOAD, [path, budget, args.tokens, p, int(args.guess), args.temperature])
                      for p in args.policies.split(",")}
        if args.llama:
            contenders["llama.cpp mmap"] = (_LLAMA_CPP, [path, args.llama_tokens or args.tokens, args.temperature])
        results = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, (code, argv) in contenders.items():
                drop_file_pages(path)
                r = _run(code, argv, limit, args.timeout)
                results[name].append(r)
                print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in r.items() if k != "stderr"), flush=True)
                if "error" in r:
                    print("    " + r["stderr"].strip().replace("\n", "\n    "), flush=True)
        for name, runs in results.items():
            ok = [r for r in runs if "error" not in r]
            med = {k: median([r[k] for r in ok if r.get(k) is not None]) for k in (ok[0] if ok else {})
                   if isinstance(ok[0][k], (int, float))} if ok else {}
            bound = med["disk_bw"] / med["expert_read_per_token"] if med.get("expert_read_per_token") else None
            # the bytes a token computes with must come from memory once: the other physical bound
            memory = med["mem_bw"] / med["computed_per_token"] if med.get("computed_per_token") else None
            tighter = min(b for b in (bound, memory) if b) if (bound or memory) else None
            data["runs"].append({"skew": skew, "contender": name, "runs": runs, "median": med, "read_bound": bound,
                                 "memory_bound": memory})
            rows.append([f"{skew:g}", name, med.get("tokens_per_s", "failed"),
                         f"{med['disk_bytes_per_token'] / 1e6:.0f} MB" if "disk_bytes_per_token" in med else "",
                         f"{med['routed_per_token'] / 1e6:.0f} MB" if "routed_per_token" in med else "",
                         f"{med['cached_rate']:.2f} / {med['hit_rate']:.2f}" if "hit_rate" in med else "",
                         f"{med['guess_recall']:.2f}" if "guess_recall" in med else "",
                         f"{bound:.2f}" if bound else "", f"{memory:.2f}" if memory else "",
                         f"{med['tokens_per_s'] / tighter:.2f}x" if tighter and "tokens_per_s" in med else "",
                         f"{med['cgroup_peak'] / GB:.2f} GB" if med else ""])
    table = markdown_table(["skew", "contender", "decode tok/s (median)", "disk read / token", "experts routed / token",
                            "hit rate (cached / with guesses)", "guess recall", "bound from bytes read (tok/s)",
                            "bound from bytes computed (tok/s)", "of the tighter bound", "cgroup peak"], rows)
    print(table)
    save(Path(args.out) if getattr(args, "out", None) else Path("bench-results"), "moe", data, table)
    return 0
