"""Running measurements fairly: each in a fresh process, alternated, several times, medians.

A fresh process per measurement gives each its own peak RSS (VmHWM) and no warm state from the
previous one; alternating the contenders spreads the machine's drift over all of them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


# Child-code prologue for llama-cpp-python runs with repacking off (llama-cli's --no-repack): the
# weights stay in the file's mapping instead of being copied into anonymous memory, as a user
# under a memory limit would run it. Llama() takes its model params from the patched default.
LLAMA_CPP_NO_REPACK = r"""
import llama_cpp.llama_cpp as C
defaults = C.llama_model_default_params
def without_repack():
    params = defaults()
    params.use_extra_bufts = False
    return params
C.llama_model_default_params = without_repack
"""


def run_child(code: str, *args: Any, timeout: float = 3600, env: dict | None = None) -> dict:
    """Run `code` in a fresh Python; it must print one JSON object as its last line. Raises on failure."""
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def alternate(contenders: dict[str, callable], repeats: int) -> dict[str, list[dict]]:
    """Call each contender `repeats` times, round-robin; {name: [results]}."""
    results: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            results[name].append(fn())
    return results


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(out: Path, name: str, data: Any, table: str | None = None) -> None:
    """Write name.json (and name.md with the table) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str))
    if table is not None:
        (out / f"{name}.md").write_text(table + "\n")


def default_cache() -> Path:
    """Where generated benchmark models go (never into git)."""
    return Path(os.environ.get("PIPELOAD_BENCH_CACHE", Path.home() / ".cache" / "pipeload" / "bench"))
