"""`pipeload bench cluster --trace`: traced runs and where their tokens' time goes.

Four runs, each in fresh processes with $PIPELOAD_TRACE set (cluster/trace.py): one process
(one thread, pinned), tensor parallel over 2 pinned one-thread workers, and a 2-stage pipeline
with 1 and with 2 streams. Each writes one chrome-trace file per process under
OUT/cluster-trace/<run>/ and a merged one (`merged.json`: open it in https://ui.perfetto.dev);
`breakdown.png` shows the per-token breakdown of every process of every run, and the markdown
table the same in figures (bench/trace_report.py explains the categories).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import trace_report

RUNS = {  # name: (child, spec beyond the base)
    "1 process": ("child_single", {"streams": 1}),
    "tensor parallel, 2 ranks, 1 stream": ("child_cluster", {"mode": "tensor", "streams": 1, "nodes": 2}),
    "pipeline, 2 stages, 1 stream": ("child_cluster", {"mode": "pipeline", "streams": 1, "nodes": 2}),
    "pipeline, 2 stages, 2 streams": ("child_cluster", {"mode": "pipeline", "streams": 2, "nodes": 2}),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def traced_runs(a, model: Path, out: Path, runs: list[str] | None = None) -> tuple[dict, str]:
    """Run the traced configurations (all of RUNS, or `runs`); returns ({run: breakdown}, markdown)."""
    from .cluster import _run, free_port, pin

    base = {"model": str(model), "tokens": a.tokens, "prompt": a.prompt}
    root = Path(out) / "cluster-trace"
    results, tables = {}, []
    for name in runs or list(RUNS):
        child, extra = RUNS[name]
        d = root / slug(name)
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        spec = {**base, **extra}
        prefix = None
        if child == "child_cluster":
            spec["worker_prefixes"] = [pin(j) for j in range(extra["nodes"])]
            spec["address"] = f"127.0.0.1:{free_port()}"
        else:
            prefix = pin(0)
        r = _run(child, spec, env={"PIPELOAD_TRACE": str(d)}, prefix=prefix)
        b = trace_report.breakdown(d)
        b["reported_tokens_per_second"] = r["tokens_per_second"]
        trace_report.merge(d, d / "merged.json")
        results[name] = b
        tables.append(trace_report.table(name, b))
    png = trace_report.plot(results, root / "breakdown.png")
    text = "\n\n## Traced runs (ms per decoded token, per process)\n\n" + "\n\n".join(tables) + \
        f"\n\nchrome traces: {root}/*/merged.json (Perfetto); summary: {png}\n"
    return results, text
