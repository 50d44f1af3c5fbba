"""Speculative decoding (runtime/speculative.py): greedy output is the target's alone, token for
token, whatever the draft proposes, resident and streamed; the verification pass gives the bits of
lone decode steps; sampled output follows the target's distribution (chi-square tests); drafts of
another vocabulary are refused by name."""

import pytest
import torch

from pipeload import PipelineModel
from pipeload.api import builtin_model_path
from pipeload.errors import UnsupportedModelError
from pipeload.runtime.memory import current_rss
from pipeload.runtime.planner import make_plan
from pipeload.runtime.sampling import Sampler, SamplingParams
from pipeload.runtime.speculative import ModelDraft, PromptLookup
from pipeload.runtime.spec import open_model

from budget_helpers import load_streaming  # tests/, on pytest's path

# repeats, so that prompt lookup finds matches, and plain code, so that the draft model agrees often
PROMPT = "def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n    return a + b + c\n\ndef add4(a, b, c, d):\n"
N = 48


def _tokens(model, prompt=PROMPT, n=N, **sampling):
    out = None
    for r in model.stream(prompt, max_tokens=n, ignore_eos=True, **sampling):
        out = r.token_ids
    return out


@pytest.fixture(scope="module")
def plain():
    m = PipelineModel.from_pretrained(None)
    yield m, _tokens(m)
    m.close()


@pytest.mark.parametrize("draft", ["builtin", "prompt-lookup"])
@pytest.mark.parametrize("k", ["auto", 1, 3, 8])
def test_greedy_equals_target_alone(plain, draft, k):
    target, reference = plain
    m = PipelineModel.from_pretrained(None, draft=draft, draft_tokens=k)
    try:
        assert _tokens(m) == reference
        st = m.stats
        assert st["draft"] == ("model" if draft == "builtin" else "prompt-lookup")
        assert st["generation_tokens"] == N
        assert st["draft_proposed"] > 0
        # rejections happened and were rolled back (else this run would not test the rollback)
        assert st["draft_accepted"] < st["draft_proposed"]
        assert st["draft_accepted"] > 0
        assert st["decode_passes"] < N - 1  # fewer target passes than tokens
        assert st["tokens_per_pass"] == pytest.approx((N - 1) / st["decode_passes"])
        assert 0 < st["acceptance_rate"] < 1
    finally:
        m.close()


def test_streamed_target_equals_target_alone(plain):
    """Under a budget where layers stream (the draft's memory counted in it), the same tokens."""
    _, reference = plain
    spec = open_model(builtin_model_path())
    draft_bytes = open_model(builtin_model_path("draft")).index.total_bytes
    PipelineModel.from_pretrained(None, draft="builtin").close()  # imports and allocator warmed: RSS settles
    for draft in ("builtin", "prompt-lookup"):
        full = make_plan(spec, None, current_rss(), spec.args.context_length, 1, 1)
        weights = sum(full.group_bytes.values())
        top = full.predicted_peak + (draft_bytes if draft == "builtin" else 0)
        m = load_streaming(lambda budget: PipelineModel.from_pretrained(
            None, draft=draft, memory_limit=budget, prefetch_depth=1, io_mode="direct"),
            top - weights - 64 * 2**20, top + 64 * 2**20)
        try:
            assert _tokens(m) == reference
            assert m.stats["decode_passes"] < N - 1
            assert m.stats["bytes_read"] >= m.stats["decode_passes"] * m.plan.streamed_bytes * 0.9  # a pass per round
        finally:
            m.close()


def test_verification_pass_has_the_bits_of_decode_steps():
    """k + 1 positions in one pass with lone_queries: logits equal (torch.equal) to k + 1 decode steps."""
    m = PipelineModel.from_pretrained(None)
    try:
        ex, eng = m.engine.executor, m.engine
        ids = m.tokenizer.encode(PROMPT)
        extra = [17, 400, 33, 2048, 5]
        a, b = eng.new_cache(1, 256), eng.new_cache(1, 256)
        n = len(ids)
        ex.forward(torch.tensor([ids]), torch.arange(n)[None], a)
        ex.forward(torch.tensor([ids]), torch.arange(n)[None], b)
        steps = torch.cat([ex.forward(torch.tensor([[t]]), torch.tensor([[n + i]]), a)[0]
                           for i, t in enumerate(extra)])                                      # (k + 1, V)
        verify = ex.forward(torch.tensor([extra]), torch.arange(n, n + len(extra))[None], b,
                            lone_queries=True)[0]                                               # (k + 1, V)
        assert torch.equal(verify, steps)
        assert torch.equal(a.k[:, :, :, :n + len(extra)], b.k[:, :, :, :n + len(extra)])  # the same keys cached
    finally:
        m.close()


def test_tiny_models_greedy_equal(tiny, kind):
    """Every architecture (Llama, Mistral's window, Qwen2's biases, GPT-2) with prompt lookup."""
    _, _, gguf = tiny(kind)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 1, 4, 1, 5]
    ref = PipelineModel.from_pretrained(gguf)
    spec = PipelineModel.from_pretrained(gguf, draft="prompt-lookup", draft_tokens=4)
    try:
        out_ref, out_spec = _tokens(ref, prompt, 40), _tokens(spec, prompt, 40)
        assert out_spec == out_ref
        assert spec.stats["draft_proposed"] > 0
    finally:
        ref.close()
        spec.close()


def test_draft_of_another_vocabulary_is_refused(tiny):
    _, _, gguf = tiny("llama2")  # 128 tokens; the built-in model has 4096
    with pytest.raises(UnsupportedModelError, match="vocabulary of 128 tokens but the target has 4096"):
        PipelineModel.from_pretrained(None, draft=gguf)
    with pytest.raises(ValueError, match="draft_tokens"):
        PipelineModel.from_pretrained(None, draft="prompt-lookup", draft_tokens=0)
    for bad in (0, "all", 2.5):
        with pytest.raises(ValueError, match="draft_vocab must be 'auto', None"):
            PipelineModel.from_pretrained(None, draft="builtin", draft_vocab=bad)


def _with_draft_vocab(vocab):
    """The built-in target with its draft sibling proposing only ids below `vocab`."""
    m = PipelineModel.from_pretrained(None, draft="builtin", draft_tokens=4)
    m.draft = ModelDraft(m.draft.engine, m.engine.args.vocab_size, vocab=vocab)
    return m


def test_draft_of_a_vocabulary_prefix_gives_the_target_tokens(plain):
    """A draft proposing from the first ids (its head narrowed to those rows): the target's tokens,
    proposals below the prefix, the draft's engine left with its whole head; when the answer uses
    ids past the prefix, the draft widens to the whole vocabulary and stays exact."""
    target, reference = plain
    covering = max(reference) + 1  # every token of this answer lies below it: the head stays narrow
    m = _with_draft_vocab(covering)
    try:
        proposed = []
        propose = m.draft.propose
        m.draft.propose = lambda h, k: _record(proposed, propose(h, k))
        assert _tokens(m) == reference
        assert m.draft.narrow is not None and m.draft.proposes_from == covering
        assert proposed and max(proposed) < covering
        layers = m.draft.engine.executor.layers
        assert layers.acquire_head().output.out_features == m.engine.args.vocab_size
        layers.release_head()
        assert m.stats["draft_accepted"] > 0
    finally:
        m.close()
    middle = sorted(set(reference))[len(set(reference)) // 2]  # about half the answer's distinct ids lie past it
    m = _with_draft_vocab(middle)
    try:
        assert _tokens(m) == reference
        assert m.draft.narrow is None and m.draft.proposes_from == m.engine.args.vocab_size  # widened
        assert m.draft.outside > 2
    finally:
        m.close()


def _record(into: list, tokens: list) -> list:
    into.extend(tokens)
    return tokens


def test_draft_of_a_vocabulary_prefix_samples_with_zero_probability_past_it():
    m = _with_draft_vocab(1000)
    try:
        d = m.draft
        prompt = m.tokenizer.encode("def fibonacci(n):\n")
        d.start(prompt, 64)
        sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3), 1)
        tokens, q = d.propose_sampled(prompt, 3, sampler)
        assert q.shape == (3, m.engine.args.vocab_size)
        assert torch.all(q[:, 1000:] == 0) and torch.allclose(q.sum(-1), torch.ones(3))
        assert all(t < 1000 and q[i, t] > 0 for i, t in enumerate(tokens))
        # the same seed, the same sampled text through the speculative generator
        assert _tokens(m, "def fibonacci(n):\n", 12, temperature=0.9, seed=5) == \
            _tokens(m, "def fibonacci(n):\n", 12, temperature=0.9, seed=5)
    finally:
        m.close()


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    pl = PromptLookup(ngram=3)
    assert pl.propose([1, 2, 3, 4, 5, 9, 2, 3, 4, 7, 2, 3, 4], 2) == [7, 2]  # latest "2 3 4" is followed by 7
    assert pl.propose([1, 2, 3, 9, 3], 5) == [9, 3]  # only the 1-gram "3" matches
    assert pl.propose([1, 2, 3], 4) == []


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z = 3.09) by Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def _two_sample_chi2(a: list[int], b: list[int], min_count: int = 10) -> tuple[float, int]:
    """Chi-square statistic and degrees of freedom that samples a and b come from one distribution
    (values seen fewer than min_count times in both together pooled into one bin)."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    keys = [t for t in set(ca) | set(cb) if ca[t] + cb[t] >= min_count]
    bins = [(ca[t], cb[t]) for t in keys]
    rest = (len(a) - sum(x for x, _ in bins), len(b) - sum(y for _, y in bins))
    if sum(rest):
        bins.append(rest)
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in bins:
        tot = x + y
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    return stat, len(bins) - 1


@pytest.mark.parametrize("certain", [False, True])
def test_speculative_pick_draws_from_the_target_distribution(certain):
    """A kept draft token or the residual draw: the emitted token follows p exactly, whatever q is."""
    from pipeload.runtime.speculative import speculative_pick

    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10])
    q = torch.tensor([0.40, 0.05, 0.25, 0.05, 0.05, 0.20])
    n = 20000
    out = []
    for _ in range(n):
        d = 0 if certain else int(torch.multinomial(q, 1, generator=g))
        out.append(speculative_pick(p, d, None if certain else q, g)[0])
    counts = torch.bincount(torch.tensor(out), minlength=6).double()
    stat = float(((counts - n * p.double()) ** 2 / (n * p.double())).sum())
    assert stat < _chi2_critical(5), (counts / n).tolist()
    # the same check rejects a wrong rule (always keeping the draft token draws from q, not p)
    wrong = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g), minlength=6).double()
    assert float(((wrong - n * p.double()) ** 2 / (n * p.double())).sum()) > _chi2_critical(5)


def test_sampled_output_follows_the_target_distribution(plain):
    """Built-in model, draft sibling: the 2nd and 3rd sampled tokens (from verification passes)
    over 300 seeds have the plain run's distribution (two-sample chi-square at p = 0.001); the
    same seed gives the same text."""
    target, _ = plain
    m = PipelineModel.from_pretrained(None, draft="builtin", draft_tokens=3)
    prompt = "def fibonacci(n):\n"
    hot = dict(temperature=0.8, top_k=0, top_p=1.0)  # several likely tokens at the 2nd position
    try:
        assert _tokens(m, prompt, 12, temperature=0.9, seed=5) == _tokens(m, prompt, 12, temperature=0.9, seed=5)
        assert m.stats["draft_proposed"] > 0
        spec, ref, accepted = [], [], 0
        for seed in range(300):
            spec.append(tuple(_tokens(m, prompt, 3, seed=seed, **hot)))
            accepted += m.stats["draft_accepted"]
            ref.append(tuple(_tokens(target, prompt, 3, seed=10_000 + seed, **hot)))
        assert accepted > 100  # the drafts were kept often: the accept rule, not only the residual, is tested
        dfs = []
        for pos in (1, 2):
            stat, df = _two_sample_chi2([s[pos] for s in spec], [r[pos] for r in ref])
            dfs.append(df)
            assert df == 0 or stat < _chi2_critical(df), (pos, stat, df)
        assert max(dfs) >= 3, dfs  # at least one position had several likely tokens
    finally:
        m.close()


def test_batches_decode_plainly_with_a_note(plain):
    target, _ = plain
    m = PipelineModel.from_pretrained(None, draft="builtin", batch_size=2)
    try:
        both = {r.sequence: r.token_ids for r in m.stream([PROMPT, "import os\n"], max_tokens=8, ignore_eos=True)}
        assert both == {r.sequence: r.token_ids for r in target.stream([PROMPT, "import os\n"], max_tokens=8,
                                                                         ignore_eos=True)}
        assert "draft" not in m.stats
        assert m.stats["speculative"].startswith("off: a batch")
    finally:
        m.close()


def test_cli_prints_acceptance(capsys):
    from pipeload.cli import main

    assert main(["run", "--draft", "builtin", "--draft-tokens", "3", "--temperature", "0", "-n", "16"]) == 0
    err = capsys.readouterr().err
    assert "[speculative] draft builtin: acceptance" in err and "tokens per target pass" in err


def test_a_draft_with_a_cluster_is_refused_before_connecting():
    """Speculation does not run on a cluster yet: asking for it says so instead of ignoring the draft."""
    with pytest.raises(ValueError, match="cluster is not supported"):
        PipelineModel.from_pretrained(cluster="127.0.0.1:1", draft="prompt-lookup")


def _schedule(model, requests, draft=None, submit_at=None):
    """Run requests through a Scheduler (optionally with a draft); request i is submitted before
    step submit_at[i] (default: all at once). Returns ({id: tokens}, counters)."""
    from pipeload.runtime.scheduler import Scheduler

    sched = Scheduler(model.engine, model._tokenizer, max_batch=4, max_len=256, draft=draft)
    submit_at = submit_at or [0] * len(requests)
    out, step = {r.id: [] for r in requests}, 0
    pending = list(zip(submit_at, requests))
    while pending or sched.busy:
        while pending and pending[0][0] <= step:
            sched.submit(pending.pop(0)[1])
        for e in sched.step():
            out[e.request_id].append(e.token)
        step += 1
    return out, sched.counters


@pytest.mark.parametrize("kind", ["builtin", "prompt-lookup"])
def test_scheduler_speculates_for_a_lone_greedy_request_with_the_plain_tokens(plain, kind):
    """The server's scheduler: a request decoding alone with temperature 0 speculates (fewer target
    passes than tokens) and gets the plain tokens; one that joins later makes the batch decode
    plainly, and both still get their plain tokens; a sampled request never speculates."""
    from pipeload.runtime.sampling import SamplingParams
    from pipeload.runtime.scheduler import Request
    from pipeload.runtime.speculative import ModelDraft

    target, _ = plain
    ids = target._tokenizer.encode(PROMPT)
    other = target._tokenizer.encode("import os\n")
    draft = PromptLookup() if kind == "prompt-lookup" else ModelDraft(
        PipelineModel.from_pretrained(builtin_model_path("draft")).engine,
        target.args.vocab_size)
    lone = [Request("a", ids, max_tokens=N)]
    plain_out, plain_c = _schedule(target, lone)
    spec_out, spec_c = _schedule(target, lone, draft)
    assert spec_out == plain_out
    assert spec_c["speculative_passes"] > 0 and spec_c["draft_accepted"] > 0
    assert spec_c["decode_passes"] < plain_c["decode_passes"]
    assert spec_c["generated_tokens"] == plain_c["generated_tokens"] == N

    # a second request joins at step 5: from then on the batch decodes plainly; after it ends, "a"
    # (still running, it has more tokens) speculates again
    two = [Request("a", ids, max_tokens=N), Request("b", other, max_tokens=6)]
    plain_two, _ = _schedule(target, two, None, submit_at=[0, 5])
    spec_two, c = _schedule(target, two, draft, submit_at=[0, 5])
    assert spec_two == plain_two
    assert c["speculative_passes"] > 0

    sampled = [Request("s", ids, params=SamplingParams(temperature=0.8, seed=3), max_tokens=12)]
    assert _schedule(target, sampled, draft)[0] == _schedule(target, sampled)[0]
    assert _schedule(target, sampled, draft)[1]["speculative_passes"] == 0


def test_server_speculates_for_a_lone_greedy_request_and_shows_acceptance(plain, tmp_path):
    """`pipeload serve --draft builtin`: a lone temperature-0 completion gets the plain text, and
    /metrics shows the draft tokens checked and accepted."""
    import re

    import httpx
    from server_helpers import ServerProcess

    target, _ = plain
    expected = target.generate(PROMPT, max_tokens=24, temperature=0, ignore_eos=True)
    with ServerProcess("--draft", "builtin", "--draft-tokens", "3", log=tmp_path / "server.log") as server:
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": "pipeload-main", "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                             "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected
        metrics = httpx.get(server.url + "/metrics").text

    def value(name):
        m = re.search(rf'^{name}{{model="pipeload-main"}} ([0-9.e+-]+)$', metrics, re.M)
        assert m, (name, metrics[-2000:])
        return float(m.group(1))

    assert value("pipeload_speculative_passes") > 0
    assert 0 < value("pipeload_draft_tokens_accepted") <= value("pipeload_draft_tokens_proposed")
    assert value("pipeload_draft_acceptance_rate") == pytest.approx(
        value("pipeload_draft_tokens_accepted") / value("pipeload_draft_tokens_proposed"))


def test_serve_refuses_a_missing_draft_and_bad_draft_tokens():
    from pipeload.server.serve import ServeConfig, build_registry

    with pytest.raises(ValueError, match="--draft /no/such/model.gguf: no such file"):
        build_registry(ServeConfig(draft="/no/such/model.gguf"))
    with pytest.raises(ValueError, match="draft_tokens must be"):
        build_registry(ServeConfig(draft="prompt-lookup", draft_tokens=0))
