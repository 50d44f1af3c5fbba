"""The continuous-batching scheduler: batched sequences give exactly a lone run's tokens and logits,
requests join and leave the running batch, cancelled ones free their slot at once."""

from __future__ import annotations

import random

import pytest
import torch

from pipeload import PipelineModel
from pipeload.errors import ContextLengthError, NoTokenizerError
from pipeload.runtime.sampling import SamplingParams
from pipeload.runtime.scheduler import Request, Scheduler
from server_helpers import chat_model

SAMPLINGS = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=0.8, top_k=20, seed=7),
    SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=11),
]


def lone_run(model: PipelineModel, prompt: list[int], params: SamplingParams, max_tokens: int,
             monkeypatch, stop=(), ignore_eos=True) -> tuple[list[int], str, list[torch.Tensor], str]:
    """A lone `model.stream` run: (tokens, text, logits of every step, finish reason)."""
    logits: list[torch.Tensor] = []
    forward = model.engine.executor.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        logits.append(out[0].clone())
        return out

    monkeypatch.setattr(model.engine.executor, "forward", recording)
    tokens, text, reason = [], "", None
    kw = dict(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
              repetition_penalty=params.repetition_penalty, seed=params.seed)
    for r in model.stream(prompt, max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos, **kw):
        tokens.append(r.token)
        text += r.text
        reason = r.finish_reason
    monkeypatch.undo()
    return tokens, text, logits, reason


def run_all(sched: Scheduler, requests: list[Request], rng: random.Random) -> tuple[dict[str, list], int]:
    """Submit requests a few at a time between steps (so they join a running batch).

    Returns (events by request id, the largest decode batch)."""
    pending, out, largest = list(requests), {r.id: [] for r in requests}, 0
    while pending or sched.busy:
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.submit(pending.pop(0))
        before = sched.counters["decode_passes"]
        for e in sched.step():
            out[e.request_id].append(e)
        if sched.counters["decode_passes"] > before:
            largest = max(largest, sched.last_batch)
        assert len(sched.active) <= sched.max_batch
    return out, largest


def make_requests(vocab: int, n: int, rng: random.Random, max_tokens: int = 20) -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, 30))]
        reqs.append(Request(id=f"r{i}", prompt=prompt, params=SAMPLINGS[i % len(SAMPLINGS)],
                            max_tokens=rng.randint(max_tokens // 2, max_tokens), logprobs=5))
    return reqs


def build_model(arch: str, tiny, folder) -> PipelineModel:
    import transformers as tf

    from tiny_models import _common

    torch.manual_seed(3)
    if arch == "sliding":  # mistral with a 6-token window: the lone run masks once the context passes it
        tf.MistralForCausalLM(tf.MistralConfig(**_common(sliding_window=6))).save_pretrained(folder / "hf")
        return PipelineModel.from_pretrained(folder / "hf")
    if arch in ("q4_0", "q8_0", "f16"):  # packed int4/int8 kernels, which switch at 16 rows; bf16 one-row GEMV
        from pipeload.convert import convert

        tf.LlamaForCausalLM(tf.LlamaConfig(**_common(hidden_size=128, intermediate_size=256))).save_pretrained(
            folder / "hf")
        convert(folder / "hf", folder / "q.gguf", quant=arch)
        return PipelineModel.from_pretrained(folder / "q.gguf")
    return PipelineModel.from_pretrained(tiny(arch)[2])


@pytest.mark.parametrize("arch, n, max_batch, max_tokens", [("llama3", 10, 4, 20), ("gpt2", 10, 4, 20),
                                                            ("sliding", 10, 4, 20), ("q4_0", 20, 20, 60),
                                                            ("q8_0", 20, 20, 60), ("f16", 20, 20, 60)])
def test_batched_tokens_and_logits_are_bit_identical_to_lone_runs(arch, n, max_batch, max_tokens, tiny, tmp_path,
                                                                    monkeypatch):
    model = build_model(arch, tiny, tmp_path)
    rng = random.Random(0)
    requests = make_requests(model.args.vocab_size, n, rng, max_tokens)
    events, largest = run_all(Scheduler(model.engine, None, max_batch=max_batch), requests, rng)
    assert largest >= min(max_batch, 16)  # q4_0: past the 16 rows where the packed linears change kernels
    for req in requests:
        tokens, _, logits, reason = lone_run(model, req.prompt, req.params, req.max_tokens, monkeypatch)
        got = events[req.id]
        assert [e.token for e in got] == tokens, req.id
        assert got[-1].finish_reason == reason == "length"
        for e, lone_logits in zip(got, logits):
            lp = torch.log_softmax(lone_logits.float(), -1)
            assert e.logprob == float(lp[e.token])  # the same bits, not merely close
            top = torch.topk(lp, 5)
            assert e.top_logprobs == list(zip(top.indices.tolist(), top.values.tolist()))


def test_fast_batching_differs_from_lone_runs_only_at_near_ties(tiny, monkeypatch):
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    rng = random.Random(1)
    requests = [Request(id=f"g{i}", prompt=[rng.randrange(1, 128) for _ in range(rng.randint(1, 20))],
                        max_tokens=24) for i in range(8)]
    events, _ = run_all(Scheduler(model.engine, None, max_batch=8, exact=False), requests, rng)
    for req in requests:
        tokens, _, logits, _ = lone_run(model, req.prompt, SamplingParams(), req.max_tokens, monkeypatch)
        got = [e.token for e in events[req.id]]
        part = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), None)
        if part is None:
            assert got == tokens
        else:  # allowed only where the lone run's top two logits are within 1e-4
            top2 = torch.topk(logits[part], 2).values
            assert float(top2[0] - top2[1]) < 1e-4, (req.id, part)


@pytest.mark.parametrize("exact", [True, False])
def test_requests_join_the_running_batch_and_leave_it(tiny, exact):
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    sched = Scheduler(model.engine, None, max_batch=3, exact=exact)

    def step() -> list[str]:
        return sorted(e.request_id for e in sched.step())

    sched.submit(Request(id="a", prompt=[1, 2, 3], max_tokens=8))
    assert step() == ["a"] and sched.counters["prefill_passes"] == 1
    assert step() == ["a"] and sched.counters["decode_passes"] == 1
    sched.submit(Request(id="b", prompt=[4, 5], max_tokens=2))
    sched.submit(Request(id="c", prompt=[6], max_tokens=10))
    sched.submit(Request(id="d", prompt=[7, 8], max_tokens=3))
    assert step() == ["b", "c"]  # the prompts that fit in the free slots go together
    assert step() == ["a", "b", "c"]  # the next pass over the weights serves every active sequence
    assert [s.req.id for s in sched.active] == ["a", "c"]  # b is done (2 tokens) and has left
    assert step() == ["d"]  # d takes the freed slot
    assert step() == ["a", "c", "d"] and sched.last_batch == 3
    while sched.busy:
        sched.step()
    assert sched.counters["finished"] == 4


def test_exact_prefill_takes_prompts_longer_than_a_chunk_together_with_lone_bits(tiny, monkeypatch):
    """Prompts longer than the executor's prefill chunk share a pass: each goes through each layer
    on its own, chunk by chunk, as alone."""
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    monkeypatch.setattr(model.engine.executor, "prefill_chunk", 4)
    sched = Scheduler(model.engine, None, max_batch=5)
    reqs = [Request(id=f"p{i}", prompt=list(range(1, n + 1)), max_tokens=3, logprobs=0)
            for i, n in enumerate([3, 4, 6, 2, 9])]
    for r in reqs:
        sched.submit(r)
    first = sched.step()
    assert sorted(e.request_id for e in first) == [r.id for r in reqs]  # one prefill pass for all
    out = {e.request_id: [e] for e in first}
    while sched.busy:
        for e in sched.step():
            out[e.request_id].append(e)
    for req in reqs:
        tokens, _, logits, _ = lone_run(model, req.prompt, SamplingParams(), req.max_tokens, monkeypatch)
        monkeypatch.setattr(model.engine.executor, "prefill_chunk", 4)
        assert [e.token for e in out[req.id]] == tokens
        for e, lone_logits in zip(out[req.id], logits):
            assert e.logprob == float(torch.log_softmax(lone_logits.float(), -1)[e.token])


def test_prefill_never_starves_the_running_batch(tiny):
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    sched = Scheduler(model.engine, None, max_batch=16)
    sched.submit(Request(id="long", prompt=[1], max_tokens=30))
    produced = 0
    for i in range(20):  # a new request arrives before every step
        sched.submit(Request(id=f"n{i}", prompt=[2, 3], max_tokens=30))
        produced += sum(e.request_id == "long" for e in sched.step())
    assert produced >= 10  # every other pass at least is a decode pass


def test_cancel_frees_the_slot_at_once_and_the_packed_rows_stay_right(tiny, monkeypatch):
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    sched = Scheduler(model.engine, None, max_batch=2)
    a, b = Request(id="a", prompt=[5, 6, 7], max_tokens=50), Request(id="b", prompt=[9, 10], max_tokens=12)
    sched.submit(a)
    sched.submit(b)
    got: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for _ in range(4):
        for e in sched.step():
            got[e.request_id].append(e.token)
    assert sched.cancel("a") and [s.req.id for s in sched.active] == ["b"]  # b moved into row 0
    assert not sched.cancel("a")
    c = Request(id="c", prompt=[11, 12, 13, 14], max_tokens=8)
    sched.submit(c)
    sched.submit(Request(id="w", prompt=[1], max_tokens=5))
    assert sched.cancel("w") and [r.id for r in sched.waiting] == ["c"]  # waiting ones can be cancelled too
    while sched.busy:
        for e in sched.step():
            got[e.request_id].append(e.token)
    assert sched.counters["cancelled"] == 2
    for req in (b, c):
        assert got[req.id] == lone_run(model, req.prompt, SamplingParams(), req.max_tokens, monkeypatch)[0]


def test_text_stop_strings_and_eos_follow_stream_generate(monkeypatch):
    model = PipelineModel.from_pretrained(chat_model(0))
    tok = model.tokenizer
    prompts = ["Hello, world!", "def fibonacci(n):", "The quick brown fox"]
    sched = Scheduler(model.engine, tok, max_batch=4)
    cases = []
    for i, p in enumerate(prompts):
        _, text, _, _ = lone_run(model, tok.encode(p), SamplingParams(), 40, monkeypatch, ignore_eos=False)
        stop = [text[len(text) // 2:len(text) // 2 + 2]] if len(text) > 4 else []
        cases.append((p, stop))
        sched.submit(Request(id=str(i), prompt=tok.encode(p), max_tokens=40, stop=stop,
                             stop_token_ids=frozenset(tok.eos_token_ids)))
    out: dict[str, list] = {}
    while sched.busy:
        for e in sched.step():
            out.setdefault(e.request_id, []).append(e)
    for i, (p, stop) in enumerate(cases):
        tokens, text, _, reason = lone_run(model, tok.encode(p), SamplingParams(), 40, monkeypatch, stop=stop,
                                           ignore_eos=False)
        events = out[str(i)]
        assert "".join(e.text for e in events) == text
        assert events[-1].finish_reason == reason
        assert [e.token for e in events] == tokens


def test_bad_requests_are_refused_with_clear_errors(tiny):
    model = PipelineModel.from_pretrained(tiny("llama3")[2])
    sched = Scheduler(model.engine, None, max_batch=2, max_len=64)
    with pytest.raises(ValueError, match="empty"):
        sched.submit(Request(id="x", prompt=[]))
    with pytest.raises(ContextLengthError, match="64"):
        sched.submit(Request(id="x", prompt=[1] * 64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sched.submit(Request(id="x", prompt=[1, 128]))
    with pytest.raises(ValueError, match="max_tokens"):
        sched.submit(Request(id="x", prompt=[1], max_tokens=0))
    with pytest.raises(NoTokenizerError):
        sched.submit(Request(id="x", prompt=[1], stop=["a"]))
    sched.submit(Request(id="x", prompt=[1]))
    with pytest.raises(ValueError, match="already in use"):
        sched.submit(Request(id="x", prompt=[2]))
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(model.engine, None, max_batch=0)
    # a request without max_tokens runs to the end of its slot's context
    while sched.busy:
        events = sched.step()
    assert events[-1].finish_reason == "length" and events[-1].completion_tokens == 63
