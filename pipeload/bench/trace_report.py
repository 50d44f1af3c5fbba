"""Reading the traces of `pipeload bench cluster --trace` back: where each token's time goes.

Every process of a traced run (the coordinator and each worker) wrote a chrome-trace file
(cluster/trace.py) on one monotonic clock. Within the decode window the bench marked, each
process's time is split per decoded token into:

- compute: the blocks' forwards (pre/post hooks; Python inside a block counts here), embed and
  head, minus the all-reduces inside them;
- all-reduce, waiting for the other ranks: from this rank's entry until the last rank entered
  (one rank's compute running longer than another's);
- all-reduce, hand-over: from the last rank's entry until this rank has the sum (the wire, the
  receiving thread's wake-up and gloo's own work);
- receive wait: blocked waiting for the next message (the coordinator's step, the previous stage);
- send wait: waiting for the next hop to take an output;
- serialisation: packing and unpacking messages (the coordinator: submitting a step, filing logits);
- step overhead: inside a step but outside the layers (masks, rope tables, the executor's loop,
  message unpacking into tensors, the reply's construction);
- rest: the remainder of the window (the data loop itself, other threads holding the GIL).

The all-reduce waits are also split by length: a wait of STALL_SECONDS or more is a stall (the
other rank was off its core or far behind, not a few µs of uneven work); the table lists stalls
per token and the ms they hold, so a jittery host shows apart from a lopsided split.

Hand-over latencies are matched across processes: a receive that was already waiting when the
sender posted its message measures the hop itself (wire + wake-up).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

CATEGORIES = ["compute", "all-reduce: waiting for other ranks", "all-reduce: hand-over", "receive wait",
              "send wait", "serialisation", "step overhead", "rest"]
STALL_SECONDS = 1e-3  # an all-reduce wait this long or longer counts as a stall
COLOURS = {"compute": "#4c72b0", "all-reduce: waiting for other ranks": "#dd8452", "all-reduce: hand-over": "#c44e52",
           "receive wait": "#bbbbbb", "send wait": "#8c8c8c", "serialisation": "#55a868", "step overhead": "#8172b3",
           "rest": "#eeeeee", "generation loop": "#937860", "waiting for logits": "#bbbbbb"}


def load(directory: Path) -> dict[str, dict]:
    """{process label: {"pid", "rank", "events": [(name, cat, t0, t1, args)] sorted by start}}
    from the chrome-trace files in `directory` (seconds on the shared clock)."""
    out = {}
    for f in sorted(Path(directory).glob("*.json")):
        data = json.loads(f.read_text())["traceEvents"]
        label = next(e["args"]["name"] for e in data if e["ph"] == "M")
        events = sorted(((e["name"], e["cat"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, e["args"])
                         for e in data if e["ph"] == "X"), key=lambda e: e[2])
        rank = 0 if label.startswith(("coordinator", "single")) else int(label.split("-rank")[1].split("-")[0])
        out[label] = {"pid": data[0]["pid"], "rank": rank, "events": events}
    return out


def _window(procs: dict) -> tuple[float, float, int, int]:
    for p in procs.values():
        for name, _, t0, t1, args in p["events"]:
            if name == "decode":
                return t0, t1, args["tokens"], args["streams"]
    raise ValueError("no decode window in the trace (was it written by `pipeload bench cluster --trace`?)")


def _inside(events, w0, w1):
    """The spans overlapping [w0, w1], cut to it (a step that began before the window counts
    only its part inside, as do its layers: the categories stay consistent)."""
    return [(n, c, max(t0, w0), min(t1, w1), a) for n, c, t0, t1, a in events if t1 > w0 and t0 < w1]


def _sum(events, *names) -> float:
    return sum(e[3] - e[2] for e in events if e[0] in names)


def _nested(inner, outer) -> float:
    """Seconds of `inner` spans that lie inside one of the `outer` spans (both sorted by start)."""
    total, k = 0.0, 0
    for e in inner:
        while k < len(outer) and outer[k][3] < e[2]:
            k += 1
        if k < len(outer) and outer[k][2] <= e[2] and e[3] <= outer[k][3]:
            total += e[3] - e[2]
    return total


def breakdown(directory: Path) -> dict:
    """Per process, ms per decoded token in each category (see the module docstring), plus the
    hand-over latencies (µs, medians) and the window's tokens/s."""
    procs = load(directory)
    w0, w1, tokens, streams = _window(procs)
    window = w1 - w0
    # all-reduce k of every rank: entries line up by sequence number (every rank runs the same ones)
    entries: dict[int, list[float]] = {}
    for p in procs.values():
        for name, _, t0, _, args in p["events"]:
            if name == "all-reduce":
                entries.setdefault(args["seq"], []).append(t0)
    posted = {}  # (step, op, dst rank) -> when the sender posted it
    for p in procs.values():
        for name, _, _, t1, args in p["events"]:
            if name == "pack":
                posted[(args["step"], args["op"], args["dst"])] = t1
    rows, handovers, stalls = {}, {}, {}
    for label, p in procs.items():
        ev = _inside(p["events"], w0, w1)
        ms = {}
        if label.startswith("coordinator"):
            steps = _sum(ev, "submit") + _sum(ev, "wait logits")
            ms["serialisation"] = _sum(ev, "submit") + _sum(ev, "deliver")
            ms["waiting for logits"] = _sum(ev, "wait logits") - _sum(ev, "deliver")
            ms["generation loop"] = max(0.0, window * streams - steps)  # every stream's thread, outside its steps
            ms = {k: 1e3 * v / tokens for k, v in ms.items()}
        elif label.startswith("single"):
            layers = [e for e in ev if e[1] == "layer"]
            ms["compute"] = _sum(layers, *{e[0] for e in layers})
            ms["step overhead"] = _sum(ev, "step") - ms["compute"]
            ms["rest"] = window - _sum(ev, "step")
            ms = {k: 1e3 * v / tokens for k, v in ms.items()}
        else:
            layers = [e for e in ev if e[1] == "layer"]
            reduces = [e for e in ev if e[0] == "all-reduce"]
            layer_time = _sum(layers, *{e[0] for e in layers})
            ms["compute"] = layer_time - _nested(reduces, layers)
            wait = hand = stalled = 0.0
            lat, n_stalls = [], 0
            for _, _, t0, t1, args in reduces:
                last = max(entries[args["seq"]])
                w = min(max(0.0, last - t0), t1 - t0)
                wait += w
                if w >= STALL_SECONDS:
                    n_stalls, stalled = n_stalls + 1, stalled + w
                hand += (t1 - t0) - w
                lat.append(t1 - max(t0, last))
            ms["all-reduce: waiting for other ranks"], ms["all-reduce: hand-over"] = wait, hand
            ms["receive wait"] = _sum(ev, "recv")
            ms["send wait"] = _sum(ev, "send wait")
            ms["serialisation"] = _sum(ev, "pack", "unpack")
            ms["step overhead"] = _sum(ev, "step") - layer_time
            ms["rest"] = window - sum(ms.values())  # the all-reduces lie inside the layers: counted once
            ms = {k: 1e3 * v / tokens for k, v in ms.items()}
            if lat:
                handovers[f"{label}: all-reduce"] = 1e6 * statistics.median(lat)
                stalls[label] = {"per_token": n_stalls / tokens, "ms_per_token": 1e3 * stalled / tokens}
        # hops: receives already waiting when their message was posted
        hop = []
        for name, _, t0, t1, args in ev:
            if name == "recv":
                sent = posted.get((args["step"], args["op"], p["rank"]))
                if sent is not None and t0 <= sent <= t1:
                    hop.append(t1 - sent)
        if hop:
            handovers[f"{label}: receive from rank {_src(ev)}"] = 1e6 * statistics.median(hop)
        rows[label] = ms
    return {"tokens": tokens, "streams": streams, "seconds": window, "tokens_per_second": tokens / window,
            "ms_per_token": rows, "handover_us": handovers, "allreduce_stalls": stalls}


def _src(ev) -> str:
    srcs = sorted({e[4]["src"] for e in ev if e[0] == "recv"})
    return ",".join(map(str, srcs))


def merge(directory: Path, out: Path) -> Path:
    """One chrome-trace file holding every process's timeline (what Perfetto should open)."""
    events = []
    for f in sorted(Path(directory).glob("*.json")):
        if f.name.startswith("merged"):
            continue
        events += json.loads(f.read_text())["traceEvents"]
    out.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return out


def table(name: str, b: dict) -> str:
    """A markdown table of one run's breakdown (ms per decoded token per process)."""
    from .harness import markdown_table

    cols = CATEGORIES + ["generation loop", "waiting for logits"]
    used = [c for c in cols if any(c in r for r in b["ms_per_token"].values())]
    rows = [[label] + [r.get(c, "") for c in used] + [sum(r.values())] for label, r in b["ms_per_token"].items()]
    head = (f"### {name}: {b['tokens_per_second']:.1f} tok/s traced ({b['tokens']} tokens, {b['streams']} "
            f"stream(s), {b['seconds']:.2f} s)\n\nms per decoded token:\n\n")
    hand = "\n".join(f"- {k}: {v:.0f} µs" for k, v in b["handover_us"].items())
    stall = "\n".join(f"- {k}: {v['per_token']:.1f} per token, {v['ms_per_token']:.3g} ms per token"
                      for k, v in b.get("allreduce_stalls", {}).items())
    return head + markdown_table(["process"] + used + ["total"], rows) + \
        ("\n\nhand-over latency (median, wire + wake-up):\n\n" + hand if hand else "") + \
        (f"\n\nall-reduce waits of {STALL_SECONDS * 1e3:g} ms or more (stalls), inside the waiting above:\n\n"
         + stall if stall else "")


def plot(results: dict[str, dict], path: Path) -> Path:
    """A PNG: per configuration, one stacked bar per process (ms per decoded token by category)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, stacks = [], []
    for name, b in results.items():
        for proc, r in b["ms_per_token"].items():
            labels.append(f"{name}\n{proc}")
            stacks.append(r)
    fig, ax = plt.subplots(figsize=(13, 0.55 * len(labels) + 1.5))
    cats = [c for c in CATEGORIES + ["generation loop", "waiting for logits"] if any(c in s for s in stacks)]
    for k, (lab, s) in enumerate(zip(labels, stacks)):
        left = 0.0
        for c in cats:
            v = max(0.0, s.get(c, 0.0))
            ax.barh(k, v, left=left, color=COLOURS[c], edgecolor="white", label=c if k == 0 or c not in
                    ax.get_legend_handles_labels()[1] else None)
            left += v
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decoded token")
    handles, names = ax.get_legend_handles_labels()
    seen = dict(zip(names, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("pipeload bench cluster --trace: where each token's time goes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
