"""`pipeload bench streaming --against-mmap`: pipeload against llama.cpp's mmap, both in one memory cgroup.

The same GGUF, the same cgroup-v1 memory limit (anonymous memory and page cache both charged, as a
small machine feels it), fresh processes alternating llama.cpp / pipeload, the page cache dropped
(`echo 1 > /proc/sys/vm/drop_caches`) before every run, medians over `--repeats`.

- llama.cpp: llama-cpp-python, `use_mmap=True`, repacking off (`use_extra_bufts=False` in its
  model params, llama-cli's `--no-repack`: with repacking on, its CPU backend copies every Q4_K
  weight into anonymous memory and is OOM-killed under any limit smaller than the file).
- pipeload: `PipelineModel.from_pretrained(memory_limit=<the cgroup limit>)`, `generate`.

`--profile pi5|pi4|pi4-sd` runs the same inside a cgroup with a Raspberry Pi's memory and its
storage's read rate (blkio throttle): a simulation of memory and disk only, not of the Pi's cores
(compute here is several times faster), so it shows what the disk and the budget allow.

Each row gives decode seconds per token, the cgroup's peak charge (`memory.max_usage_in_bytes`)
and whether the OOM killer fired (then the row says "OOM-killed", never a number). The bound of a
budget is (file bytes - weight bytes pipeload's plan keeps resident) / read rate, the read rate
measured in the same pipeload process by a cold read of exactly its streamed spans.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cgroup import CgroupRun, available, block_device, run_in_cgroup
from .harness import LLAMA_CPP_NO_REPACK, markdown_table, median, save

GB = 10**9

# name -> (memory, storage read rate, what it stands for); --mmap-limits overrides the memory
PROFILES = {
    "pi5": (4 * GB, 450e6, "Raspberry Pi 5, 4 GB, NVMe SSD on the PCIe HAT (~450 MB/s)"),
    "pi4": (4 * GB, 300e6, "Raspberry Pi 4, 4 GB, USB 3 SSD (~300 MB/s)"),
    "pi4-sd": (4 * GB, 90e6, "Raspberry Pi 4, 4 GB, SD card (~90 MB/s)"),
}

_LLAMA_CPP = r"""
import json, sys, time
import llama_cpp
""" + LLAMA_CPP_NO_REPACK + r"""
path, tokens, prompt_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t0 = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=256, n_threads=2, use_mmap=True, verbose=False)
load_s = time.perf_counter() - t0
prompt = [(7 * i + 13) % 4000 + 3 for i in range(prompt_len)]
t0 = time.perf_counter()
llm.eval(prompt)
tok = llm.sample(temp=0.0)
prompt_s = time.perf_counter() - t0
times = []
for _ in range(tokens):
    t0 = time.perf_counter()
    llm.eval([tok])
    tok = llm.sample(temp=0.0)
    times.append(time.perf_counter() - t0)
print(json.dumps({"decode_s_per_token": sum(times) / len(times), "prompt_seconds": prompt_s, "load_seconds": load_s}))
"""

_PIPELOAD = r"""
import json, sys, time
t0 = time.perf_counter()
from pipeload import PipelineModel
path, limit, tokens, prompt_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = PipelineModel.from_pretrained(path, memory_limit=limit, ctx=256, threads=2)
load_s = time.perf_counter() - t0
prompt = [(7 * i + 13) % 4000 + 3 for i in range(prompt_len)]
m.generate(prompt, max_tokens=tokens + 1, ignore_eos=True, temperature=0.0)
st = m.stats
layers = m.engine.executor.layers
streamed = hasattr(layers, "measure_cold_read") and bool(layers.order)
disk = layers.measure_cold_read() if streamed else None
plan = m.plan
print(json.dumps({"decode_s_per_token": 1 / st["generation_tps"], "prompt_seconds": st["prompt_tokens"] / st["prompt_tps"],
                  "load_seconds": load_s, "disk_bw": disk, "io_mode": m.engine.io_mode,
                  "resident_weight_bytes": plan.resident_weight_bytes, "streamed_bytes": plan.streamed_bytes,
                  "predicted_peak": plan.predicted_peak}))
"""


def drop_page_cache() -> None:
    """Empty the whole page cache (root; what a cold start after boot sees)."""
    import os

    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def _one(engine: str, path: Path, limit: int, in_cgroup: bool, args) -> CgroupRun:
    """One fresh process; `in_cgroup` False: its group has no limit (the machine's RAM is the
    limit, the charge still measured) and only pipeload is given `limit` as its budget."""
    drop_page_cache()
    throttle = (block_device(path), PROFILES[args.profile][1]) if args.profile else None
    group_limit = limit if in_cgroup else None
    if engine == "llama.cpp":
        return run_in_cgroup(_LLAMA_CPP, [path, args.tokens, args.prompt], group_limit, timeout=args.timeout,
                             read_bps=throttle)
    return run_in_cgroup(_PIPELOAD, [path, limit, args.tokens, args.prompt], group_limit, timeout=args.timeout,
                         read_bps=throttle)


def parse_limits(text: str) -> list[tuple[int, bool]]:
    """'2,3,20ram' -> [(2 GB, True), (3 GB, True), (20 GB, False)]: GB each; 'ram' = no cgroup,
    the budget given to pipeload alone (a file larger than this machine's memory)."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        in_cgroup = not item.endswith("ram")
        try:
            out.append((int(float(item.removesuffix("ram")) * GB), in_cgroup))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a limit in GB (e.g. 2, 3.5, or 20ram for no cgroup)") from None
    return out


def _summary(runs: list[CgroupRun]) -> dict:
    """Medians over the runs that finished; OOM kills and failures counted, never turned into numbers."""
    ok = [r for r in runs if r.result is not None]
    out = {"runs": len(runs), "ok": len(ok), "oom_killed": sum(r.oom_killed for r in runs),
           "failed": sum(r.result is None and not r.oom_killed for r in runs),
           "peak_max": max(r.max_usage for r in runs), "limit_hits": [r.limit_hits for r in runs],
           "all_s_per_token": [r.result["decode_s_per_token"] if r.result else None for r in runs],
           "errors": [r.stderr[-600:] for r in runs if r.result is None and not r.oom_killed]}
    if ok:
        for key in ok[0].result:
            if isinstance(ok[0].result[key], (int, float)) and all(r.result[key] is not None for r in ok):
                out[key] = median([r.result[key] for r in ok])
            else:
                out[key] = ok[0].result[key]
        out["peak_median"] = median([r.max_usage for r in ok])
    return out


def _cell(s: dict) -> list:
    if not s["ok"]:
        refused = [e for e in s["errors"] if "MemoryBudgetError" in e]
        why = (f"OOM-killed ({s['oom_killed']}/{s['runs']})" if s["oom_killed"] else
               "refused: " + refused[0].split("give at least", 1)[-1].split(",")[0].strip() + " needed" if refused else
               f"failed ({s['failed']}/{s['runs']})")
        return [why, f"{s['peak_max'] / GB:.2f}"]
    note = f" ({s['oom_killed']} of {s['runs']} OOM-killed)" if s["oom_killed"] else ""
    return [f"{s['decode_s_per_token']:.2f}{note}", f"{s['peak_max'] / GB:.2f}"]


HEADERS = ["limit", "llama.cpp s/token", "llama.cpp cgroup peak GB", "pipeload s/token", "pipeload cgroup peak GB",
           "speedup", "bound s/token", "pipeload of bound", "read GB/s (same run)", "io"]


def part_against_mmap(args, path: Path) -> dict:
    """The table: one row per limit, both engines alternating in fresh processes."""
    if not available():
        raise SystemExit("--against-mmap needs cgroup-v1 memory (/sys/fs/cgroup/memory writable: run as root)")
    size = path.stat().st_size
    rows, data = [], {}
    limits = args.mmap_limits or ([(PROFILES[args.profile][0], True)] if args.profile else [(2 * GB, True), (3 * GB, True)])
    for limit, in_cgroup in limits:
        label = f"{limit / GB:g} GB" + ("" if in_cgroup else " (no cgroup: this machine's RAM)")
        runs = {"llama.cpp": [], "pipeload": []}
        for k in range(args.repeats):
            for engine in (("llama.cpp", "pipeload") if k % 2 == 0 else ("pipeload", "llama.cpp")):
                r = _one(engine, path, limit, in_cgroup, args)
                runs[engine].append(r)
                shown = "OOM-killed" if r.oom_killed else (f"{r.result['decode_s_per_token']:.2f} s/token" if r.result
                                                           else f"failed rc={r.returncode}: {r.stderr[-300:]}")
                print(f"  {label} {engine} run {k + 1}: {shown}, cgroup peak {r.max_usage / GB:.2f} GB, "
                      f"limit hits {r.limit_hits}", flush=True)
        lc, pl = _summary(runs["llama.cpp"]), _summary(runs["pipeload"])
        data[label] = {"llama.cpp": lc, "pipeload": pl}
        speed = f"{lc['decode_s_per_token'] / pl['decode_s_per_token']:.2f}x" if lc["ok"] and pl["ok"] else "-"
        if pl["ok"] and pl.get("disk_bw"):
            b = (size - pl["resident_weight_bytes"]) / pl["disk_bw"]
            bound = [f"{b:.2f}", f"{b / pl['decode_s_per_token']:.0%}", f"{pl['disk_bw'] / GB:.2f}"]
        else:
            bound = ["-", "-", "-"]
        rows.append([label, *_cell(lc), *_cell(pl), speed, *bound, pl.get("io_mode") or "-"])
        print(markdown_table(HEADERS, rows[-1:]), flush=True)
    table = (f"model: {path.name} ({size / GB:.2f} GB), {args.tokens} decode tokens after a {args.prompt}-token "
             f"prompt, 2 threads, medians of {args.repeats} alternating fresh processes, page cache dropped before "
             "each; llama.cpp use_mmap=True, use_extra_bufts=False (no repack)\n"
             + (f"profile {args.profile}: {PROFILES[args.profile][2]}, reads throttled to "
                f"{PROFILES[args.profile][1] / 1e6:.0f} MB/s (blkio); memory and disk simulated, not the Pi's cores\n"
                if args.profile else "") + "\n" + markdown_table(HEADERS, rows))
    save(Path(args.out), "streaming-against-mmap" + (f"-{args.profile}" if args.profile else ""), data, table)
    return {"table": table, "data": data}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--against-mmap", action="store_true",
                   help="only the cgroup comparison with llama.cpp's mmap (see pipeload/bench/against_mmap.py)")
    p.add_argument("--mmap-limits", type=parse_limits, default=None,
                   help="cgroup memory limits in GB for --against-mmap (default 2,3, or the profile's memory); "
                        "'20ram': no cgroup, pipeload's budget 20 GB, llama.cpp the machine's RAM")
    p.add_argument("--profile", choices=sorted(PROFILES), default=None,
                   help="--against-mmap on a simulated Raspberry Pi: its memory as the cgroup limit and its storage's "
                        "read rate as a blkio throttle (" + "; ".join(f"{k}: {v[2]}" for k, v in PROFILES.items()) + ")")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child run")
