"""Generation: KV cache, one-pass prompt, batching, sampling, seeds, stop tokens, figures."""

import pytest
import torch

from pipeload import PipelineModel
from pipeload.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_probs


@pytest.fixture(scope="module")
def model(tiny):
    return PipelineModel.from_pretrained(tiny("llama3")[2])


def _greedy_reference(m, prompt, n):
    """Greedy tokens by recomputing the full sequence every step (no cache): the slow truth."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(m.logits(ids)[-1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_recompute(model):
    prompt = [5, 17, 99, 3, 42, 8]
    out = list(model.stream(prompt, max_tokens=12))
    assert out[-1].token_ids == _greedy_reference(model, prompt, 12)
    assert out[-1].finish_reason == "length"
    assert len(out) == 12


def test_prompt_is_one_pass_and_cache_is_kept(model):
    """Prefill is one forward call; each new token costs exactly one more (no prompt recompute)."""
    calls = []
    real = model.engine.executor.forward

    def spy(tokens, positions, cache, logit_index=None):
        calls.append(tuple(tokens.shape))
        return real(tokens, positions, cache, logit_index)

    model.engine.executor.forward = spy
    try:
        list(model.stream(list(range(1, 30)), max_tokens=5))
    finally:
        model.engine.executor.forward = real
    assert calls == [(1, 29)] + [(1, 1)] * 4


def test_batch_equals_single(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [40, 41, 42, 43]]
    batched = {}
    for r in model.stream(prompts, max_tokens=8):
        batched[r.sequence] = r.token_ids
    for s, p in enumerate(prompts):
        assert batched[s] == _greedy_reference(model, p, 8), s


def test_seed_gives_same_tokens_and_batch_does_not_change_them(model):
    kw = dict(max_tokens=10, temperature=1.0, top_k=50, seed=1234)
    a = [r.token_ids for r in model.stream([3, 4, 5], **kw)][-1]
    b = [r.token_ids for r in model.stream([3, 4, 5], **kw)][-1]
    c = [r.token_ids for r in model.stream([3, 4, 5], **{**kw, "seed": 99})][-1]
    assert a == b
    assert a != c
    batch = {}
    for r in model.stream([[3, 4, 5], [7, 7]], **kw):
        batch[r.sequence] = r.token_ids
    assert batch[0] == a  # sequence 0 keeps its generator whatever else is in the batch


def test_stop_token_ends_sequence(model):
    prompt = [5, 17, 99, 3, 42, 8]
    greedy = _greedy_reference(model, prompt, 6)
    stop_at = greedy[3]
    from pipeload.runtime.generation import TokenGenerator

    gen = TokenGenerator(model.engine, [prompt], SamplingParams(), 20, stop_token_ids={stop_at})
    tokens = [t for step in gen for _, t in step]
    assert tokens == greedy[: greedy.index(stop_at) + 1]
    assert gen.finish_reasons[0] == "stop"


def test_stats_are_filled(model):
    list(model.stream([1, 2, 3, 4], max_tokens=6))
    st = model.stats
    assert st["prompt_tokens"] == 4 and st["generation_tokens"] == 6
    assert st["prompt_tps"] > 0 and st["generation_tps"] > 0
    assert st["peak_rss"] > 10 * 2**20


def test_context_limit_finishes_with_length(model):
    ctx = model.context_length
    out = list(model.stream([1] * (ctx - 3), max_tokens=50))
    assert len(out[-1].token_ids) == 3 and out[-1].finish_reason == "length"


# -- sampling, unit level ------------------------------------------------------------------


def test_top_k_top_p_min_p_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = filter_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p[0, 2:] == 0).all() and p[0, :2].sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, -1)[0]
    p = filter_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0] + 0.01)))
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    p = filter_probs(logits, SamplingParams(temperature=1.0, min_p=float(full[2] / full[0]) + 1e-3))
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    cold = filter_probs(logits, SamplingParams(temperature=0.1))
    assert cold[0, 0] > 0.99


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, [[0, 1]], 2.0, 64)
    assert out.tolist() == [[1.0, -4.0, 1.0]]
    assert apply_repetition_penalty(logits, [[0, 1]], 2.0, 0).tolist() == logits.tolist()


def test_sampling_follows_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    s = Sampler(SamplingParams(temperature=1.0, seed=0), 1)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[s(probs.log()[None], [[]])[0]] += 1
    assert torch.allclose(counts / 3000, probs, atol=0.03)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-3), dict(repetition_penalty=0)])
def test_bad_sampling_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
