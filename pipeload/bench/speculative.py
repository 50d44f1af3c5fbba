"""`pipeload bench speculative`: greedy decoding of one target, plainly, with a draft model and with
prompt lookup, side by side: fresh processes alternated, medians of --repeats, per memory budget.
Every speculative run's tokens are checked against the plain run's (they must be identical).

    pipeload bench speculative --target T.gguf --draft D.gguf [--memory-limit none,1.2GB] [-n 128]
                               [--contenders plain,draft,lookup] [--ctx 1024]

Under a budget every contender gets the same one: a draft model's memory is counted in it (it is
loaded first), so more of the target streams than in the plain run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .harness import alternate, markdown_table, median, run_child, save

PROMPT = ('def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n'
          '    """Merge two sorted lists into one sorted list."""\n')
EDITED = '''def word_counts(path):
    counts = {}
    with open(path) as f:
        for line in f:
            for word in line.split():
                word = word.strip(".,;:!?").lower()
                if word:
                    counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: kv[1], reverse=True)
'''
# kind -> (through the chat template, text): completing a function, answering in prose, an edit
PROMPTS = {
    "code": (False, PROMPT),
    "prose": (True, "Explain how a hash table works, and when a sorted array is the better choice."),
    "edit": (True, "Rewrite this function so that it takes the file's encoding as a second argument "
                   "(default 'utf-8'). Reply with the whole function only.\n\n```python\n" + EDITED + "```"),
}

CHILD = r"""
import json, os, sys, time
import pipeload
from pipeload import PipelineModel
target, draft, limit, n, prompt, ctx = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
vocab = None if sys.argv[7] == "all" else sys.argv[7]
chat, text = json.loads(prompt)
m = PipelineModel.from_pretrained(target, draft=None if draft == "none" else draft,
                                  memory_limit=None if limit == "none" else limit, ctx=ctx, draft_vocab=vocab)
out = None
# a chat answer ends at its end token; a completion runs the n tokens
ids = m.tokenizer.encode_chat([{"role": "user", "content": text}]) if chat else text
for r in m.stream(ids, max_tokens=n, ignore_eos=not chat):
    out = r.token_ids
st = m.stats
print(json.dumps({"tokens": out, "tps": st["generation_tps"], "passes": st["decode_passes"],
                  "tokens_per_pass": st["tokens_per_pass"], "acceptance": st.get("acceptance_rate"),
                  "peak_rss": st["peak_rss"], "streamed_bytes": m.plan.streamed_bytes if m.plan else 0,
                  "resident_bytes": m.plan.resident_weight_bytes if m.plan else os.path.getsize(target)}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="target GGUF file")
    p.add_argument("--draft", required=True, help="draft GGUF file (the target's vocabulary)")
    p.add_argument("--memory-limit", default="none", help="comma-separated budgets, 'none' for resident")
    p.add_argument("-n", "--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", default="code",
                   help=f"comma-separated prompt kinds of {', '.join(PROMPTS)} (prose and edit go through the "
                        f"chat template and end at the answer's end)")
    p.add_argument("--prompt", default=None, help="one raw prompt instead of --prompts")
    p.add_argument("--ctx", type=int, default=1024, help="context positions (the KV cache a budget reserves)")
    p.add_argument("--contenders", default="plain,draft,lookup",
                   help="of plain, draft (model), draft-full (the model proposing from its whole vocabulary), "
                        "lookup (prompt)")


def run(a: argparse.Namespace) -> int:
    rows, data, mismatch, points = [], {}, False, []
    if a.prompt is not None:
        kinds = {"custom": (False, a.prompt)}
    else:
        unknown = [k for k in a.prompts.split(",") if k not in PROMPTS]
        if unknown:
            raise ValueError(f"--prompts: unknown {', '.join(unknown)}; choose from {', '.join(PROMPTS)}")
        kinds = {k: PROMPTS[k] for k in a.prompts.split(",")}
    from ..runtime.probe import disk_bandwidth, memory_bandwidth

    disk_bw, memory_bw = max(disk_bandwidth(Path(a.target)).values()), memory_bandwidth()
    for kind, prompt, limit in ((k, p, lim) for k, p in kinds.items() for lim in a.memory_limit.split(",")):
        chosen = a.contenders.split(",")
        if "plain" not in chosen:
            raise ValueError("--contenders must include plain (the reference tokens and speed)")
        every = {"plain": ("plain", "none", "auto"), "draft": ("draft model", a.draft, "auto"),
                 "draft-full": ("draft model, whole vocabulary", a.draft, "all"),
                 "lookup": ("prompt lookup", "prompt-lookup", "auto")}
        unknown = [c for c in chosen if c not in every]
        if unknown:
            raise ValueError(f"--contenders: unknown {', '.join(unknown)}; choose from {', '.join(every)}")
        contenders = {every[c][0]: (lambda d=every[c][1], v=every[c][2]: run_child(
            CHILD, a.target, d, limit, a.max_tokens, json.dumps(prompt), a.ctx, v)) for c in chosen}
        results = alternate(contenders, a.repeats)
        reference = results["plain"][0]["tokens"]
        plain_tps = median([r["tps"] for r in results["plain"]])
        for name, runs in results.items():
            same = all(r["tokens"] == reference for r in runs)
            mismatch |= not same
            tps = median([r["tps"] for r in runs])
            acc = runs[0]["acceptance"]
            tpp = median([r["tokens_per_pass"] for r in runs])
            # one target pass reads the streamed bytes from disk and the resident ones from memory
            pass_floor = runs[0]["streamed_bytes"] / disk_bw + runs[0]["resident_bytes"] / memory_bw
            points.append((kind, limit, name, tps, tpp / pass_floor))
            rows.append([kind, limit, name, f"{acc:.0%}" if acc is not None else "-", tpp,
                         tps, tps / plain_tps, tpp / pass_floor, ", ".join(f"{r['tps']:.2f}" for r in runs),
                         f"{runs[0]['streamed_bytes'] / 1e6:.0f} MB", f"{max(r['peak_rss'] for r in runs) / 1e9:.2f} GB",
                         "yes" if same else "NO"])
        data[f"{kind} {limit}"] = {k: [{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v] for k, v in results.items()}
    table = markdown_table(["prompt", "budget", "draft", "acceptance", "tokens/pass", "tok/s (median)", "x plain",
                            "bound (target passes x tokens/pass)", "runs",
                            "target streamed per pass", "peak RSS", "tokens = plain"], rows)
    print(table)
    print(f"bound: tokens per pass / (streamed bytes / {disk_bw / 1e9:.2f} GB/s disk + resident bytes / "
          f"{memory_bw / 1e9:.1f} GB/s memory), both measured now; the draft's own time not counted")
    save(Path(a.out), "speculative", {"target": a.target, "draft": a.draft, "n": a.max_tokens, "ctx": a.ctx,
                                      "disk_bw": disk_bw, "memory_bw": memory_bw, "prompts": kinds, "runs": data}, table)
    _plot(Path(a.out) / "speculative.png", points, a.target)
    return 1 if mismatch else 0


def _plot(png: Path, points: list[tuple], target: str) -> None:
    """tok/s against the budget, a line per contender, a panel per prompt kind ("none": resident,
    drawn right of the largest budget)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    from ..runtime.memory import parse_size

    kinds = list(dict.fromkeys(p[0] for p in points))
    budgets = sorted({parse_size(p[1]) for p in points if p[1] != "none"})
    resident_x = (budgets[-1] * 1.25 if budgets else 1e9) / 1e9
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name in dict.fromkeys(p[2] for p in points if p[0] == kind):
            mine = sorted(((resident_x if b == "none" else parse_size(b) / 1e9), tps)
                          for k, b, n, tps, _ in points if k == kind and n == name)
            ax.plot([x for x, _ in mine], [y for _, y in mine], "o-", label=name)
        ax.set_title(f"{kind} prompt")
        ax.set_xlabel(f"memory budget (GB); {resident_x:.2f} = resident" if budgets else "resident")
        ax.set_ylabel("tokens/s (greedy, batch 1)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(Path(target).name)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")
