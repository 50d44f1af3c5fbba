"""The cluster tracer (cluster/trace.py) and the breakdown read back from its files
(bench/trace_report.py): spans on one clock, all-reduce waits split between the slower rank and
the hand-over, hops matched to the sends that fed them."""

import json

import pytest
import torch

from pipeload.bench import trace_report
from pipeload.cluster.trace import Tracer, trace_blocks


def _write(tmp_path, label, spans):
    t = Tracer(str(tmp_path))
    t.label = label
    for name, cat, t0, t1, args in spans:
        t.add(name, cat, t0, t1, **args)
    return t.dump()


def test_dump_is_chrome_trace_with_the_spans(tmp_path):
    t = Tracer(str(tmp_path))
    t.label = "tensor-rank1-w1"
    with t.span("step", "step", step=3):
        pass
    data = json.loads(t.dump().read_text())
    assert data["traceEvents"][0] == {"ph": "M", "name": "process_name", "pid": data["traceEvents"][0]["pid"],
                                      "args": {"name": "tensor-rank1-w1"}}
    (ev,) = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert ev["name"] == "step" and ev["args"] == {"step": 3} and ev["dur"] >= 0


def test_off_without_a_directory_records_nothing(tmp_path):
    t = Tracer(None)
    with t.span("step", "step"):
        pass
    t.add("x", "y", 0.0, 1.0)
    assert t.events == [] and t.dump() is None


def test_breakdown_splits_allreduce_into_waiting_and_hand_over(tmp_path):
    # one decode token of 10 ms; rank 1 enters its all-reduce at 2 ms, rank 2 at 5 ms (it computed
    # longer), both leave at 5.2 ms: rank 1 waited 3 ms for rank 2, both paid 0.2 ms of hand-over
    coord = [("decode", "bench", 0.0, 0.010, {"tokens": 1, "streams": 1}),
             ("submit", "serialise", 0.0, 0.0005, {"T": 1}),
             ("pack", "serialise", 0.0, 0.0004, {"step": 9, "op": 1, "dst": 1}),
             ("wait logits", "recv", 0.0005, 0.0095, {"T": 1})]
    r1 = [("recv", "recv", 0.0, 0.0006, {"step": 9, "op": 1, "src": 0}),
          ("step", "step", 0.001, 0.008, {"step": 9, "op": 1, "T": 1}),
          ("layer 0", "layer", 0.001, 0.0075, {"layer": 0}),
          ("all-reduce", "allreduce", 0.002, 0.0052, {"seq": 0})]
    r2 = [("step", "step", 0.001, 0.008, {"step": 9, "op": 1, "T": 1}),
          ("layer 0", "layer", 0.001, 0.0075, {"layer": 0}),
          ("all-reduce", "allreduce", 0.005, 0.0052, {"seq": 0})]
    _write(tmp_path, "coordinator", coord)
    _write(tmp_path, "tensor-rank1-w1", r1)
    _write(tmp_path, "tensor-rank2-w2", r2)
    b = trace_report.breakdown(tmp_path)
    one, two = b["ms_per_token"]["tensor-rank1-w1"], b["ms_per_token"]["tensor-rank2-w2"]
    assert one["all-reduce: waiting for other ranks"] == pytest.approx(3.0)
    assert one["all-reduce: hand-over"] == pytest.approx(0.2)
    assert two["all-reduce: waiting for other ranks"] == pytest.approx(0.0)
    assert one["compute"] == pytest.approx(6.5 - 3.2) and two["compute"] == pytest.approx(6.5 - 0.2)
    assert one["step overhead"] == pytest.approx(0.5)
    assert sum(one.values()) == pytest.approx(10.0)  # every ms of the window is in one category
    # the receive was waiting when the coordinator posted at 0.4 ms; it returned at 0.6 ms
    assert b["handover_us"]["tensor-rank1-w1: receive from rank 0"] == pytest.approx(200.0)
    assert b["handover_us"]["tensor-rank2-w2: all-reduce"] == pytest.approx(200.0)
    assert b["tokens_per_second"] == pytest.approx(100.0)
    # rank 1's 3 ms wait is a stall (>= 1 ms); rank 2 did not wait
    assert b["allreduce_stalls"]["tensor-rank1-w1"] == pytest.approx({"per_token": 1.0, "ms_per_token": 3.0})
    assert b["allreduce_stalls"]["tensor-rank2-w2"] == {"per_token": 0.0, "ms_per_token": 0.0}
    assert "1 ms or more (stalls)" in trace_report.table("run", b)
    png = trace_report.plot({"run": b}, tmp_path / "b.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_breakdown_refuses_a_trace_without_a_decode_window(tmp_path):
    _write(tmp_path, "coordinator", [("submit", "serialise", 0.0, 0.001, {"T": 1})])
    with pytest.raises(ValueError, match="no decode window"):
        trace_report.breakdown(tmp_path)


class _Work:
    def wait(self):
        return True

    def is_completed(self):
        return True


class _Group:
    def send(self, *a):
        return _Work()

    def recv(self, *a):
        return _Work()

    def size(self):
        return 2


def _gloo_pair():
    """Two gloo process groups of one pair of ranks in this process (a store shared in memory)."""
    import torch.distributed as dist
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    store = dist.HashStore()
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda r: dist.ProcessGroupGloo(store, r, 2, timedelta(seconds=20)), range(2)))


def test_all_reduce_with_receives_posted_early_sums_and_is_traced(monkeypatch, tmp_path):
    """AllReduce.begin(numel, count): every exchange's receives are posted as soon as the one
    before ended; the sums are those of the plain exchange, each all-reduce is one traced span,
    and a call of another size than was posted for is refused, not summed wrongly."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeload.cluster import shard
    from pipeload.cluster.shard import AllReduce

    t = Tracer(str(tmp_path))
    monkeypatch.setattr(shard, "TRACE", t)
    groups = _gloo_pair()
    xs = [[torch.randn(2, 8) for _ in range(3)] for _ in range(2)]

    def rank(r):
        red = AllReduce(groups[r])
        red.begin(16, 3)
        out = [red(x) for x in xs[r]]
        assert red.posted is None and red.remaining == 0  # nothing left posted after the step
        return out

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(rank, range(2)))
    for k in range(3):
        want = xs[0][k] + xs[1][k]
        assert torch.equal(outs[0][k], want) and torch.equal(outs[1][k], want)
    assert [e[0] for e in t.events] == ["all-reduce"] * 6
    assert sorted(e[5]["seq"] for e in t.events) == list(range(6))  # one tracer for both ranks here

    def broken(r):
        red = AllReduce(groups[r])
        red.begin(16, 2)
        with pytest.raises(RuntimeError, match="16 elements posted, 4 sent"):
            red(torch.ones(4))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(broken, range(2)))


def test_trace_blocks_times_every_forward(monkeypatch, tmp_path):
    from pipeload.cluster import trace

    t = Tracer(str(tmp_path))
    monkeypatch.setattr(trace, "TRACE", t)
    blocks = {4: torch.nn.Linear(2, 2), 5: torch.nn.Linear(2, 2)}
    trace_blocks(blocks)
    trace_blocks(blocks)  # hooked once only
    for b in blocks.values():
        b(torch.ones(1, 2))
    assert [e[0] for e in t.events] == ["layer 4", "layer 5"]
