"""Mixture-of-experts architectures (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) against transformers,
from the HF folder and from the GGUF llama.cpp's own converter writes; their bad input."""

import pytest
import torch

from moe_models import MOE_KINDS, gguf_with_metadata
from pipeload.errors import ModelFileError
from pipeload.runtime.engine import load_engine
from tiny_models import reference_logits

TOL = 1e-4


def _ids(n=17, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30000, (batch, n), generator=g)


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_moe_logits_match_transformers(moe_tiny, kind, fmt):
    model, folder, gguf = moe_tiny(kind)
    ids = _ids()
    ref = reference_logits(model, ids)
    eng = load_engine(folder if fmt == "hf" else gguf)
    ours = eng.executor.forward(ids, torch.arange(ids.shape[1]).expand_as(ids), cache=None)
    assert ours.shape == ref.shape
    diff = (ours - ref).abs().max().item()
    assert diff < TOL, f"{kind} from {fmt}: max |diff| {diff}"
    assert ref.std() > 0.1  # the comparison is not between near-constant outputs


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_moe_routers_pick_varied_experts(moe_tiny, kind):
    """The tiny models exercise routing: their tokens use most experts, not the same few."""
    from pipeload.models.moe import route, router_logits

    _, _, gguf = moe_tiny(kind)
    eng = load_engine(gguf)
    block = eng.executor.layers.acquire(0)
    x = eng.model.token_embd(_ids(n=32, batch=1)[0])  # (32, D): layer 0's input is the embeddings
    _, chosen = route(router_logits(block.ffn_gate_inp, block.ffn_norm(x)), eng.spec.args.top_k, False)
    assert len(torch.unique(chosen)) > eng.spec.args.n_experts // 2


def test_moe_cached_decoding_matches_full_forward(moe_tiny):
    _, _, gguf = moe_tiny("qwen3_moe")
    eng = load_engine(gguf)
    ids = _ids(20, batch=1)
    full = eng.executor.forward(ids, torch.arange(20)[None], cache=None)[0]
    cache = eng.new_cache(1, 20)
    first = eng.executor.forward(ids[:, :12], torch.arange(12)[None], cache)[0]
    steps = [eng.executor.forward(ids[:, t:t + 1], torch.tensor([[t]]), cache)[0, 0] for t in range(12, 20)]
    assert (torch.cat([first, torch.stack(steps)]) - full).abs().max().item() < TOL


def test_gguf_expert_count_disagreeing_with_tensors(moe_tiny, tmp_path):
    _, _, gguf = moe_tiny("qwen3_moe")
    bad = gguf_with_metadata(gguf, tmp_path / "bad.gguf", qwen3moe__expert_count=12)
    with pytest.raises(ModelFileError, match=r"qwen3moe\.expert_count = 12.*disagree"):
        load_engine(bad)


def test_gguf_top_k_larger_than_expert_count(moe_tiny, tmp_path):
    _, _, gguf = moe_tiny("olmoe")
    bad = gguf_with_metadata(gguf, tmp_path / "bad.gguf", olmoe__expert_used_count=9)
    with pytest.raises(ModelFileError, match=r"olmoe\.expert_used_count = 9 is larger than olmoe\.expert_count = 8"):
        load_engine(bad)


def test_hf_top_k_larger_than_expert_count(moe_tiny, tmp_path):
    import json
    import shutil

    _, folder, _ = moe_tiny("mixtral")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_experts_per_tok"] = 9
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="num_experts_per_tok = 9 is larger than num_local_experts = 8"):
        load_engine(bad)
