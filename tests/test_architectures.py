"""Every architecture matches transformers on the same random weights, from both file formats."""

import pytest
import torch

from pipeload.runtime.engine import load_engine
from tiny_models import KINDS, reference_logits

TOL = 1e-4


def _ids(n=33, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, n), generator=g)


def _logits(path, ids):
    eng = load_engine(path)
    return eng.executor.forward(ids, torch.arange(ids.shape[1]).expand_as(ids), cache=None)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_logits_match_transformers(tiny, kind, fmt):
    model, folder, gguf = tiny(kind)
    ids = _ids(batch=2)
    ref = reference_logits(model, ids)
    ours = _logits(folder if fmt == "hf" else gguf, ids)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"{kind} from {fmt}: max |diff| {diff}"
    assert ref.std() > 0.1  # the comparison is not between near-constant outputs


# transformers ignores rope_freqs (llama3) and maps gpt2 context/vocab keys incompletely; those two are
# checked against llama.cpp itself in test_llama_cpp.py
@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("llama3", "gpt2")])
def test_gguf_follows_llama_cpp_conventions(tiny, kind):
    """transformers' own GGUF loader (which undoes llama.cpp's q/k permutation) reads our file to
    the same logits: our GGUF writer follows llama.cpp's conventions, independently of our reader."""
    import transformers as tf

    model, folder, gguf = tiny(kind)
    loaded = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = _ids()
    diff = (reference_logits(loaded, ids) - reference_logits(model, ids)).abs().max().item()
    assert diff < TOL


def test_gguf_llama_has_permuted_qk_and_rope_freqs(tiny):
    """The llama GGUF stores q/k rows permuted (not the HF layout) and a rope_freqs tensor for llama3."""
    from pipeload.weights.gguf import read_gguf
    from pipeload.weights.io import RangeReader

    model, folder, gguf = tiny("llama3")
    g = read_gguf(gguf)
    assert "rope_freqs.weight" in g.tensors
    info = g.tensors["blk.0.attn_q.weight"]
    with RangeReader() as r:
        q = r.read(info.path, info.offset, info.nbytes).view(torch.float32).view(info.shape)
    hf_q = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, hf_q)
    assert torch.equal(q.sort(dim=0).values, hf_q.sort(dim=0).values)  # same rows, other order


def test_cached_decoding_matches_full_forward(tiny, kind):
    """Prompt in one pass then token-by-token with the KV cache gives the logits of a full forward."""
    _, folder, gguf = tiny(kind)
    eng = load_engine(gguf)
    ids = _ids(20)
    full = eng.executor.forward(ids, torch.arange(20)[None], cache=None)[0]
    cache = eng.new_cache(1, 20)
    first = eng.executor.forward(ids[:, :12], torch.arange(12)[None], cache)[0]
    steps = [eng.executor.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0, 0] for t in range(12, 20)]
    cached = torch.cat([first, torch.stack(steps)])
    assert (cached - full).abs().max().item() < TOL


def test_bfloat16_close_to_float32(tiny):
    _, folder, _ = tiny("llama2")
    ids = _ids()
    f32 = _logits(folder, ids)
    bf16 = load_engine(folder, dtype=torch.bfloat16).executor.forward(ids, torch.arange(33)[None], None)
    assert bf16.dtype == torch.float32  # logits are returned as float32
    assert (bf16 - f32).abs().max().item() < 0.1 * f32.abs().max().item()
    assert (bf16.argmax(-1) == f32.argmax(-1)).float().mean() > 0.9


def test_logits_of_a_prompt_longer_than_one_prefill_chunk(tmp_path):
    """PipelineModel.logits on 2,000 tokens (four prefill chunks: the later ones attend to the
    earlier ones' keys through a KV cache) matches transformers at every position."""
    import transformers as tf

    from pipeload import PipelineModel
    from pipeload.runtime.executor import PREFILL_CHUNK

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=2048)
    ref_model = tf.LlamaForCausalLM(cfg).eval()
    ref_model.save_pretrained(tmp_path, safe_serialization=True)
    ids = _ids(2000)[0]
    assert len(ids) > 3 * PREFILL_CHUNK
    ours = PipelineModel.from_pretrained(tmp_path, dtype="float32", threads=2).logits(ids.tolist())
    ref = reference_logits(ref_model, ids[None])[0]
    assert ours.shape == ref.shape == (2000, 128)
    diff = (ours - ref).abs().max().item()
    assert diff < TOL * 10, f"max |diff| {diff} over 2,000 positions"
    assert ref[-100:].std() > 0.01  # the last chunk's logits are not near-constant
