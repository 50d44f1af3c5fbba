"""Expert-level streaming: routed experts read on demand into a budgeted cache give the resident
run's bits; the cache counts what it does; a batch reads the union of its rows' experts once;
the plan's bound is routed-expert bytes, not layer bytes."""

import pytest
import torch

from pipeload import PipelineModel
from pipeload.bench.synth_moe import MOE_SHAPES, write_moe_gguf
from pipeload.errors import MemoryBudgetError
from pipeload.runtime.memory import current_rss
from pipeload.runtime.planner import make_plan
from pipeload.runtime.spec import open_model

PROMPT = [5, 77, 1000, 3, 9, 64, 812, 13, 1999, 4]


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    """A Qwen3-MoE-shaped Q4_K_M model (32 experts, top 4, 4 layers: experts are 96% of its
    bytes), its resident model and the resident greedy tokens and logits."""
    root = tmp_path_factory.mktemp("moe-stream")
    path = write_moe_gguf(root / "mid.gguf", MOE_SHAPES["test-mid"], "q4_k_m", seed=1)
    resident = PipelineModel.from_pretrained(path, ctx=64)
    tokens = [r for r in resident.stream(PROMPT, max_tokens=6)][-1].token_ids
    return path, resident, tokens, resident.logits(PROMPT)


def _budget(path, keep: float, batch: int = 1) -> int:
    """A budget that holds everything but (1 - keep) of the routed experts' bytes."""
    full = make_plan(open_model(path), None, current_rss(), 64, batch, 2)
    return full.predicted_peak - int((1 - keep) * full.resident_expert_bytes)


@pytest.mark.parametrize("policy,io_mode", [("lru", "direct"), ("lfu", "buffered")])
def test_expert_streaming_equals_resident(mid, policy, io_mode):
    path, resident, tokens, logits = mid
    m = PipelineModel.from_pretrained(path, memory_limit=_budget(path, 0.4), ctx=64, io_mode=io_mode,
                                      expert_policy=policy)
    try:
        plan = m.plan
        assert 0 < plan.expert_slots < plan.expert_total, "the budget should hold some experts, not all"
        assert not plan.streamed  # the dense parts are small: they stay resident
        assert torch.equal(m.logits(PROMPT), logits)  # the same bits
        out = [r for r in m.stream(PROMPT, max_tokens=6)][-1].token_ids
        assert out == tokens
        st = m.stats["experts"]
        assert st["uses"] == st["hits"] + st["guess_hits"] + st["misses"] > 0
        assert st["hits"] + st["guess_hits"] > 0 and st["misses"] > 0
        geometry = m.engine.expert_cache.geometry
        smallest = min(geometry.read_bytes(i, e) for i in geometry.pieces for e in range(len(geometry.pieces[i])))
        assert st["read_bytes"] >= (st["misses"] + st["guess_reads"]) * smallest
        assert m.stats["bytes_read"] > 0  # expert reads are the run's reads
        assert st["guessed"] > 0 and 0 <= st["guess_recall"] <= 1  # the next layer's router was applied ahead
    finally:
        m.close()


def test_batch_reads_the_union_of_its_rows_experts_once(mid):
    path, resident, _, _ = mid
    m = PipelineModel.from_pretrained(path, memory_limit=_budget(path, 0.4, batch=3), ctx=64, batch_size=3)
    cache = m.engine.expert_cache
    calls = []
    real = cache.fetch

    def spy(layer, experts, hidden):
        calls.append((layer, list(experts), hidden.shape[0]))
        return real(layer, experts, hidden)

    cache.fetch = spy
    try:
        prompts = [PROMPT, PROMPT[::-1], PROMPT[2:] + PROMPT[:2]]
        batched = {r.sequence: r.token_ids for r in m.stream(prompts, max_tokens=4) if r.finish_reason}
        alone = [[r for r in resident.stream(p, max_tokens=4)][-1].token_ids for p in prompts]
        assert [batched[i] for i in range(3)] == alone
        decode = [(layer, ex) for layer, ex, rows in calls if rows == 3]  # decode steps of the three rows
        assert decode, "the three sequences should have decoded together"
        k = m.engine.spec.args.top_k
        for layer, ex in decode:
            assert ex == sorted(set(ex))          # each expert once, whichever rows chose it
            assert k <= len(ex) <= 3 * k
        assert any(len(ex) < 3 * k for _, ex in decode)  # rows shared experts: fewer reads than rows x k
    finally:
        m.close()


def test_plan_bound_is_routed_expert_bytes(mid):
    path, _, _, _ = mid
    spec = open_model(path)
    a = spec.args
    plan = make_plan(spec, _budget(path, 0.4), current_rss(), 64, 1, 2)
    exps = [t for t in spec.index.block(0).tensors + spec.index.block(1).tensors + spec.index.block(2).tensors
            + spec.index.block(3).tensors if "_exps" in t.name]
    per_expert_total = sum(t.info.nbytes for t in exps) / a.n_experts  # over all layers
    assert plan.routed_bytes_per_token == pytest.approx(a.top_k * per_expert_total, rel=1e-6)
    floors = plan.seconds_per_pass(1e9, 1e10, 1.0, 1e12)
    assert floors["disk"] == pytest.approx(plan.read_bytes_per_pass / 1e9)
    assert plan.read_bytes_per_pass < plan.routed_bytes_per_token  # some experts are expected in the cache
    assert plan.read_bytes_per_pass < sum(t.info.nbytes for t in exps) / 10  # not the layers' size
    assert sum(b for _, b in plan.rows()) == plan.predicted_peak


def test_pipeload_plan_shows_the_expert_cache(mid, capsys):
    from pipeload.cli import main

    path, _, _, _ = mid
    assert main(["plan", str(path), "--memory-limit", str(_budget(path, 0.4)), "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    assert "expert cache (" in out and "% of the budget" in out
    assert "routed experts:" in out and "per token" in out


def test_budget_too_small_for_the_expert_cache(mid):
    path, _, _, _ = mid
    with pytest.raises(MemoryBudgetError, match="expert cache of at least 8 experts"):
        PipelineModel.from_pretrained(path, memory_limit=current_rss() + (1 << 20), ctx=64)


def test_eviction_keeps_every_layer_its_share():
    """The victim comes from the layer holding the most experts (the asking layer among equals),
    least recently (lru) or least often (lfu) used within it; a layer below its share loses
    nothing while another holds more."""
    from pipeload.runtime.experts import LFU, LRU, LayerBalanced

    lru = LayerBalanced(LRU)
    for key in [(0, 1), (0, 2), (0, 3), (1, 5), (1, 6), (2, 7)]:
        lru.insert(key)
    lru.use((0, 1))
    assert next(lru.victims(2)) == (0, 2)        # layer 0 holds most; (0, 2) is its least recent
    lru.remove((0, 2))
    assert next(lru.victims(1)) == (1, 5)        # layers 0 and 1 hold two each: the asking layer's
    assert next(lru.victims(0)) == (0, 3)
    assert next(lru.victims(2)) == (0, 3)        # a tie the asker is not in: the lower layer
    assert list(lru.victims(2))[-1] == (2, 7)    # the layer holding least comes last

    lfu = LayerBalanced(LFU)
    for key in [(0, 1), (0, 2), (1, 3)]:
        lfu.insert(key)
    for _ in range(3):
        lfu.use((0, 2))
    lfu.use((0, 1))
    assert next(lfu.victims(1)) == (0, 1)        # used once against three times


def test_slot_pools_follow_each_layer_s_expert_size(mid):
    """Q4_K_M keeps some layers' down matrices in Q6_K: their experts are larger. The cache gives
    every layer the same number of slots of its own size (not slots of the largest for all),
    falls back to one pool of the largest when a pool would be too small to serve a step, and
    never holds more slots than experts."""
    from pipeload.runtime.experts import expert_geometry

    path, _, _, _ = mid
    geometry = expert_geometry(open_model(path))
    small, large = sorted(set(geometry.layer_slot_bytes.values()))
    per_size = {b: sum(1 for s in geometry.layer_slot_bytes.values() if s == b) for b in (small, large)}
    assert per_size == {small: 2, large: 2}
    total = sum(geometry.layer_slot_bytes.values())
    # five slots per layer, and the bytes left over one more slot of the smaller size
    assert geometry.carve(5 * total + small + 1, top_k=4) == {small: 11, large: 10}
    # three per layer would leave pools of 6 (< 2 x top_k): one pool of the largest slots instead
    assert geometry.carve(3 * total, top_k=4) == {large: 3 * total // large}
    # float copies cost `extra` per slot beside its size
    assert geometry.carve(5 * (total + 4 * 1000), top_k=4, extra=1000) == {small: 10, large: 10}
    assert geometry.carve(10 ** 6 * total, top_k=4) == {small: 64, large: 64}  # 32 experts x 2 layers each

    m = PipelineModel.from_pretrained(path, memory_limit=_budget(path, 0.4), ctx=64)
    try:
        cache = m.engine.expert_cache
        assert cache.pool_slots == m.plan.expert_slot_counts and set(cache.pool_slots) == {small, large}
        assert cache.nbytes == m.plan.expert_cache_bytes
        assert {cache.pool_of[i] for i in range(4)} == {small, large}
        assert all(cache.pool_of[i] == geometry.layer_slot_bytes[i] for i in range(4))
    finally:
        m.close()
