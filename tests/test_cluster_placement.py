"""Placement is pure arithmetic: checked without processes."""

import pytest

from dataclasses import replace

from pipeload.cluster.placement import (LinkSpec, ModelCost, NodeSpec, even_out_host_peers, place_pipeline,
                                        predict_tensor_parallel, proportional_split, replan_without)

GB = 10**9
COST = ModelCost(layer_bytes=(100 << 20,) * 12, head_bytes=50 << 20, hidden_bytes=4096, logits_bytes=128000,
                 kv_bytes_per_token=2048)
LINK = LinkSpec(latency=100e-6, bandwidth=125e6)


def node(name, bw=1e9, mem=8 * GB, disk=1e9):
    return NodeSpec(name, mem, bw, disk)


def test_even_nodes_even_split_and_head_on_last():
    p = place_pipeline([node("a"), node("b"), node("c")], COST, LINK, context=256)
    assert [(s.start, s.stop) for s in p.stages][0][0] == 0 and p.stages[-1].stop == 12
    sizes = [s.stop - s.start for s in p.stages]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 12
    assert p.stages[-1].stop - p.stages[-1].start <= p.stages[0].stop - p.stages[0].start  # the head weighs too


def test_faster_node_gets_more_layers_any_count():
    for n in (2, 3, 5):
        nodes = [node("fast", bw=3e9)] + [node(f"n{k}") for k in range(n - 1)]
        p = place_pipeline(nodes, COST, LINK, context=256)
        fast = p.stages[0].stop - p.stages[0].start
        assert all(fast >= s.stop - s.start for s in p.stages[1:])
        assert sum(s.stop - s.start for s in p.stages) == 12


def test_small_memory_streams_when_still_fastest():
    # node b cannot hold its share; streaming from a fast disk beats giving a slow node more
    nodes = [node("a", bw=0.2e9), node("b", bw=2e9, mem=600 << 20, disk=4e9)]
    p = place_pipeline(nodes, COST, LINK, context=256)
    b = p.stages[-1]
    assert b.streamed_bytes > 0 and any("streams" in n for n in p.notes)


def test_infeasible_memory_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        place_pipeline([node("a", mem=100 << 20)], COST, LINK, context=256)


def test_predictions_one_and_k_streams():
    p = place_pipeline([node("a"), node("b")], COST, LINK, context=256)
    one, two = p.tokens_per_second(1), p.tokens_per_second(2)
    assert one == pytest.approx(1 / p.round_trip())
    assert 1.8 * one < two <= 1 / p.bottleneck + 1e-9
    tp = predict_tensor_parallel([node("a"), node("b")], COST, LINK)
    assert tp > 0


def test_replan_keeps_survivors_layers():
    nodes = [node("a"), node("b"), node("c")]
    p = place_pipeline(nodes, COST, LINK, context=256)
    before = {s.node: set(s.layers) for s in p.stages}
    q = replan_without(p, {"b"}, nodes, COST, context=256)
    after = {s.node: set(s.layers) for s in q.stages}
    assert set(after) == {"a", "c"}
    assert before["a"] <= after["a"] and before["c"] <= after["c"]
    assert after["a"] | after["c"] == set(range(12))
    with pytest.raises(ValueError, match="no worker survives"):
        replan_without(p, {"a", "b", "c"}, nodes, COST, context=256)


def test_proportional_split_uneven():
    assert proportional_split(4, [1, 1, 1]) == [(0, 1), (1, 2), (2, 4)] or \
        sorted(b - a for a, b in proportional_split(4, [1, 1, 1])) == [1, 1, 2]
    parts = proportional_split(10, [3, 1])
    assert parts[0] == (0, 7) or parts[0] == (0, 8)
    with pytest.raises(ValueError):
        proportional_split(2, [1, 1, 1])


def test_stage_streams_layers_beyond_its_budget(tmp_path, monkeypatch):
    """A stage given more layers than its memory holds streams the rest from the file (as a
    survivor does after taking over a dead node's layers), as runtime/planner.make_plan plans its
    layer range, with the same results."""
    import torch

    from pipeload.bench.synth import LlamaShape, write_synthetic_gguf
    from pipeload.cluster import protocol as P
    from pipeload.cluster.stage import Assignment, StageModel
    from pipeload.errors import MemoryBudgetError

    shape = LlamaShape(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=512, vocab=512, context=64)
    path = write_synthetic_gguf(tmp_path / "m.gguf", shape, "q4_0", seed=4)
    whole = StageModel(path)
    whole.assign(Assignment(0, 8, True, True), 64, 1)
    monkeypatch.setattr("pipeload.runtime.memory.current_rss", lambda: 0)
    part = StageModel(path)
    a = Assignment(0, 8, True, True)
    lo, hi = 0, part.plan(a, 64, 1).predicted_peak  # the smallest budget with 2 resident layers
    while hi - lo > 1024:
        part.memory_limit = (lo + hi) // 2
        try:
            enough = sum(g.startswith("blk.") for g in part.plan(a, 64, 1).resident) >= 2
        except MemoryBudgetError:
            enough = False
        lo, hi = (lo, part.memory_limit) if enough else (part.memory_limit, hi)
    part.memory_limit = hi
    plan = part.plan(a, 64, 1)
    figures = part.assign(a, 64, 1)
    assert figures["loaded"] == 2 and figures["streamed"] == len(plan.streamed) >= 6, figures
    tokens, positions = torch.tensor([[5, 9, 100, 7]]), torch.arange(4)[None]
    for st in (whole, part):
        st.new_cache(1, 1, 64)
    msg = P.Message(P.FORWARD, 1, 1, 1, 4, P.IS_TOKENS | P.HAS_CACHE | P.HAS_LOGIT_INDEX,
                    tensors=[tokens, positions, torch.tensor([3])])
    payload = P.pack(msg.tensors)
    outs = [st.forward(msg, payload) for st in (whole, part)]
    assert outs[0].op == outs[1].op == P.LOGITS
    assert torch.equal(outs[0].tensors[0], outs[1].tensors[0])
    part.streamed_layers.close()
    part.memory_limit = 1 << 20  # below the smallest plan: a clear error naming the budget it needs
    with pytest.raises(MemoryBudgetError, match="give at least"):
        part.assign(Assignment(0, 8, True, True), 64, 1)


def test_host_peers_with_close_speeds_count_as_equal():
    a, b, c = (replace(node(n, bw=bw), host=h) for n, bw, h in (("a", 1.0e9, "pi"), ("b", 1.15e9, "pi"), ("c", 2e9, "x")))
    even = even_out_host_peers([a, b, c])
    assert even[0].decode_bandwidth == even[1].decode_bandwidth == 1.15e9  # one host, within 20%: noise
    assert even[2] == c
    far = replace(b, decode_bandwidth=1.5e9)
    assert even_out_host_peers([a, far]) == [a, far]                     # a real difference is kept
    other = replace(b, host="other")
    assert even_out_host_peers([a, other]) == [a, other]                 # other hosts are other machines


def test_tensor_prediction_from_a_measured_layer_step():
    nodes = [node("a"), node("b")]
    slow = predict_tensor_parallel(nodes, COST, LINK, layer_seconds=0.05)
    fast = predict_tensor_parallel(nodes, COST, LINK, layer_seconds=0.01)
    # a step is the measured layer step per layer plus the head share and the hops
    step = 1 / slow
    assert 12 * 0.05 < step < 12 * 0.05 + 0.05
    assert fast > 4 * slow


def test_several_streams_run_at_the_busy_speed_of_a_shared_host():
    """Stages whose step, timed with every stage working at once, is 1/0.6 of their step alone
    (they share a host's memory bandwidth): one stream keeps one stage busy at a time, two keep
    both busy at the busy speed."""
    p = place_pipeline([node("a"), node("b")], COST, LINK, context=256)
    unshared = p.tokens_per_second(2)
    for s in p.stages:
        s.busy_seconds = s.seconds / 0.6
    assert p.tokens_per_second(1) == pytest.approx(1 / p.round_trip())
    two = p.tokens_per_second(2)
    assert two == pytest.approx(min(2 / (p.round_trip() + sum(s.busy_seconds - s.seconds for s in p.stages)),
                                    1 / max(s.busy_seconds for s in p.stages)))
    assert two < 0.7 * unshared
