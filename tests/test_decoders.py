"""Qwen3, Gemma 2 and Gemma 3 (text) against transformers, from the HF folder and from the GGUF
llama.cpp's own converter writes: logits, cached decoding, sliding windows longer than the
window, generation resident and streamed; their bad input."""

import pytest
import torch

from budget_helpers import load_streaming
from decoder_models import DECODER_KINDS, SENTENCEPIECE_KINDS, WINDOW, gguf_without_key
from pipeload.runtime.engine import load_engine
from tiny_models import reference_logits

TOL = 1e-4


def _ids(n=21, batch=2, seed=0, vocab=300):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, n), generator=g)


def _forward(eng, ids):
    return eng.executor.forward(ids, torch.arange(ids.shape[1]).expand_as(ids), cache=None)


@pytest.mark.parametrize("kind", DECODER_KINDS)
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_logits_match_transformers(decoder_tiny, kind, fmt):
    """Sequences of 3 x the sliding window: local layers must see only their window."""
    model, folder, gguf = decoder_tiny(kind)
    ids = _ids(n=3 * WINDOW + 1)
    ref = reference_logits(model, ids)
    ours = _forward(load_engine(folder if fmt == "hf" else gguf), ids)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"{kind} from {fmt}: max |diff| {diff}"
    assert ref.std() > 0.1  # the comparison is not between near-constant outputs


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_cached_decoding_matches_transformers(decoder_tiny, kind):
    """A prompt in one pass, then token by token past the window with the KV cache."""
    model, _, gguf = decoder_tiny(kind)
    eng = load_engine(gguf)
    n, p = 3 * WINDOW, WINDOW // 2 + 1
    ids = _ids(n=n, batch=1)
    ref = reference_logits(model, ids)[0]
    cache = eng.new_cache(1, n)
    first = eng.executor.forward(ids[:, :p], torch.arange(p)[None], cache)[0]
    steps = [eng.executor.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0, 0] for t in range(p, n)]
    diff = (torch.cat([first, torch.stack(steps)]) - ref).abs().max().item()
    assert diff < TOL, f"{kind}: max |diff| {diff}"


def _loadable_gguf(decoder_tiny, kind, tmp_path):
    """The kind's GGUF with a tokenizer pipeload loads. Token ids in and out: the tokenizer does
    not matter here, but a file's must load. The converter writes MiniLM's WordPiece vocabulary as
    a byte-level BPE without merges and pre-tokenizer "jina-v2-en", which neither llama.cpp nor
    pipeload runs: those kinds use the file without it."""
    gguf = decoder_tiny(kind)[2]
    if kind in SENTENCEPIECE_KINDS:
        return gguf
    return gguf_without_key(gguf, tmp_path / "model.gguf", "tokenizer.ggml.model", "tokenizer.ggml.tokens")


def _load_streamed(path):
    """PipelineModel under a memory budget between the all-resident plan's peak and the smallest
    plan, with O_DIRECT reads (buffered ones also hold a group's page cache while it is read,
    which for models this small costs more than streaming saves). The plan is made from the RSS
    at load (tests/budget_helpers.py)."""
    from pipeload import PipelineModel
    from pipeload.runtime.memory import current_rss
    from pipeload.runtime.planner import _candidates
    from pipeload.runtime.spec import open_model

    full, candidates = _candidates(open_model(path), None, current_rss(), 64, 1, 1, buffered_reads=False)
    lo, hi = min(c.predicted_peak for c in candidates if c.streamed), full.predicted_peak
    assert lo < hi - 2 * 2**20, "the test model is too small for a budget to stream it"
    return load_streaming(lambda budget: PipelineModel.from_pretrained(
        path, ctx=64, memory_limit=budget, prefetch_depth=1, io_mode="direct"), lo - 64 * 2**20, hi + 64 * 2**20)


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_generation_resident_and_streamed(decoder_tiny, kind, tmp_path):
    """PipelineModel.from_pretrained + greedy generation past the window gives transformers'
    greedy tokens; under a memory_limit that streams layers, the same tokens and the resident
    logits bit for bit."""
    from pipeload import PipelineModel

    model, gguf = decoder_tiny(kind)[0], _loadable_gguf(decoder_tiny, kind, tmp_path)
    prompt = _ids(n=WINDOW + 3, batch=1, seed=1)[0].tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    expected = ref[0, len(prompt):].tolist()
    resident = PipelineModel.from_pretrained(gguf, ctx=64)
    tokens = [r for r in resident.stream(prompt, max_tokens=12, temperature=0)][-1].token_ids
    assert tokens == expected
    m = _load_streamed(gguf)
    try:
        assert [r for r in m.stream(prompt, max_tokens=12, temperature=0)][-1].token_ids == tokens
        assert torch.equal(m.logits(prompt + tokens), resident.logits(prompt + tokens))
    finally:
        m.close()
        resident.close()


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_phi3_long_factors_beyond_the_original_context(decoder_tiny, fmt):
    """A sequence past original_max_position_embeddings takes LongRoPE's long factors (as
    transformers picks them: by the step's largest position)."""
    from decoder_models import LONGROPE_ORIGINAL

    model, folder, gguf = decoder_tiny("phi3")
    ids = _ids(n=LONGROPE_ORIGINAL + 6)
    ref = reference_logits(model, ids)
    diff = (_forward(load_engine(folder if fmt == "hf" else gguf), ids) - ref).abs().max().item()
    assert diff < TOL, f"phi3 from {fmt} past the original context: max |diff| {diff}"


# metadata an architecture's GGUF cannot do without (beyond the shared head count, width, layers)
NEEDED_KEYS = {"phi3": "phi3.rope.scaling.original_context_length", "gemma2": "gemma2.attention.sliding_window",
               "gemma3": "gemma3.attention.sliding_window"}


@pytest.mark.parametrize("kind", sorted(set(NEEDED_KEYS) & set(DECODER_KINDS)))
def test_a_gguf_without_a_key_its_architecture_needs_is_refused_naming_it(decoder_tiny, kind, tmp_path):
    from pipeload.errors import ModelFileError

    gguf = decoder_tiny(kind)[2]
    key = NEEDED_KEYS[kind]
    bad = gguf_without_key(gguf, tmp_path / "bad.gguf", key)
    with pytest.raises(ModelFileError, match=f"lacks '{key}'"):
        load_engine(bad)


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_batched_requests_get_their_lone_tokens_and_logits(decoder_tiny, kind, monkeypatch, tmp_path):
    """The continuous-batching scheduler (what `pipeload serve` runs): prompts on both sides of
    the sliding window, joining a running batch, each with its lone run's tokens and logprobs."""
    import random

    from pipeload import PipelineModel
    from pipeload.runtime.scheduler import Scheduler
    from test_scheduler import lone_run, make_requests, run_all

    model = PipelineModel.from_pretrained(_loadable_gguf(decoder_tiny, kind, tmp_path), ctx=64)
    rng = random.Random(0)
    requests = make_requests(300, 6, rng, max_tokens=12)
    events, largest = run_all(Scheduler(model.engine, None, max_batch=3), requests, rng)
    assert largest >= 2
    for req in requests:
        tokens, _, logits, _ = lone_run(model, req.prompt, req.params, req.max_tokens, monkeypatch)
        assert [e.token for e in events[req.id]] == tokens, req.id
        assert [e.logprob for e in events[req.id]] == [float(torch.log_softmax(lg.float(), -1)[t])
                                                       for lg, t in zip(logits, tokens)]


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_cluster_pipeline_equals_one_process_and_tensor_parallel_works_or_refuses(decoder_tiny, kind, tmp_path):
    """Two pipeline stages give one process's logits bit for bit; tensor parallel gives the same
    greedy tokens where the architecture declares a split (what `pipeload models` lists), else it
    is refused at once, naming the architecture."""
    from cluster_helpers import connect, free_port, workers
    from pipeload import PipelineModel
    from pipeload.cluster.launch import connect_cluster
    from pipeload.errors import UnsupportedModelError
    from pipeload.runtime.spec import open_model

    gguf = _loadable_gguf(decoder_tiny, kind, tmp_path)
    prompt = _ids(n=WINDOW + 5, batch=1, seed=2)[0].tolist()
    ref = PipelineModel.from_pretrained(gguf, threads=1)
    want = list(ref.stream(prompt, max_tokens=8, temperature=0))[-1].token_ids
    port = free_port()
    with workers(f"127.0.0.1:{port}", gguf, 2):
        m = connect(gguf, 2, port=port)
        try:
            assert torch.equal(m.logits(prompt), ref.logits(prompt))
            assert list(m.stream(prompt, max_tokens=8, temperature=0))[-1].token_ids == want
        finally:
            m.close()
    if getattr(open_model(gguf).arch, "TENSOR_PARALLEL", None):
        port = free_port()
        with workers(f"127.0.0.1:{port}", gguf, 2):
            m = connect(gguf, 2, "tensor", port=port)
            try:
                got = list(m.stream(prompt, max_tokens=8, temperature=0))[-1].token_ids
                if got != want:  # only at a near-tie of the single run
                    i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
                    top = torch.topk(ref.logits(prompt + want[:i])[-1], 2).values
                    assert float(top[0] - top[1]) <= 1e-4, f"tensor parallel parted at token {i} without a near-tie"
            finally:
                m.close()
    else:
        with pytest.raises(UnsupportedModelError, match=f"tensor parallel is not supported for the {kind}"):
            connect_cluster(gguf, f"127.0.0.1:{free_port()}", 2, "tensor", join_timeout=30)


def test_phi3_pipeload_convert_gives_the_llama_cpp_converters_logits(decoder_tiny, tmp_path):
    """`pipeload convert` of the HF folder (f32) writes llama.cpp's phi3 keys and rope tensors."""
    from pipeload.convert import convert
    from pipeload.weights.gguf import read_gguf

    _, folder, gguf = decoder_tiny("phi3")
    ours = convert(folder, tmp_path / "ours.gguf", quant="f32").path
    theirs_meta, ours_meta = read_gguf(gguf).metadata, read_gguf(ours).metadata
    for key in ("phi3.rope.scaling.original_context_length", "phi3.rope.scaling.attn_factor",
                "phi3.attention.sliding_window", "phi3.rope.dimension_count"):
        assert ours_meta[key] == pytest.approx(theirs_meta[key]), key
    ids = _ids(n=70)
    assert torch.equal(_forward(load_engine(ours), ids), _forward(load_engine(gguf), ids))


def test_gemma_query_scale_is_query_pre_attn_scalar_from_the_hf_folder(tmp_path):
    """transformers scales queries by query_pre_attn_scalar^-1/2 (here not head_dim); a GGUF has
    no such key and llama.cpp uses head_dim (see models/gemma.py), so this is checked from HF."""
    from decoder_models import build_decoder

    for kind in ("gemma2", "gemma3"):
        model = build_decoder(kind, tmp_path / kind, seed=4, query_pre_attn_scalar=40)
        ids = _ids(n=2 * WINDOW + 3)
        diff = (_forward(load_engine(tmp_path / kind), ids) - reference_logits(model, ids)).abs().max().item()
        assert diff < TOL, f"{kind}: max |diff| {diff}"


def test_gemma3_linear_rope_scaling_applies_to_the_global_layers_only(tmp_path):
    """Gemma 3 (4B and up) scales the global layers' rope linearly; the local layers keep their
    own base unscaled. From the HF folder and from llama.cpp's converter's GGUF."""
    from decoder_models import build_decoder
    from encoder_models import llama_cpp_convert
    from moe_models import MINILM

    if not (MINILM / "tokenizer.json").is_file():
        pytest.skip(f"{MINILM} is missing (../shared/models/fetch.sh fetches it): the converter needs its tokenizer")
    rope = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    model = build_decoder("gemma3", tmp_path / "hf", seed=5, rope_parameters=rope)
    gguf = llama_cpp_convert(tmp_path / "hf", tmp_path / "model.gguf")
    ids = _ids(n=3 * WINDOW + 1)
    ref = reference_logits(model, ids)
    for src in (tmp_path / "hf", gguf):
        diff = (_forward(load_engine(src), ids) - ref).abs().max().item()
        assert diff < TOL, f"{src.name}: max |diff| {diff}"
