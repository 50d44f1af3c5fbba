"""Perplexity with a sliding window against a direct computation from transformers' logits."""

import json
import math

import pytest
import torch

from tiny_models import reference_logits

from pipeload.perplexity import kl_divergence, perplexity, read_text, token_nll, windows


def test_windows_score_every_target_once():
    for n, ctx, stride in [(10, 4, 2), (100, 16, 5), (7, 16, 8), (33, 8, 7), (2, 2, 1), (50, 8, 1)]:
        targets = [j for _, end, first in windows(n, ctx, stride) for j in range(first, end)]
        assert targets == list(range(1, n)), (n, ctx, stride)
        assert all(end - begin <= ctx for begin, end, _ in windows(n, ctx, stride))
    with pytest.raises(ValueError):
        windows(10, 4, 4)


def _direct_nll(model, ids, ctx, stride):
    """Each target's NLL from transformers' logits of its own window, computed independently."""
    out = {}
    for begin, end, first in windows(len(ids), ctx, stride):
        logp = torch.log_softmax(reference_logits(model, torch.tensor([ids[begin:end]]))[0].double(), -1)
        for j in range(first, end):
            out[j] = -logp[j - 1 - begin, ids[j]].item()
    return torch.tensor([out[j] for j in range(1, len(ids))], dtype=torch.float64)


class ByteTokenizer:
    """Token i stands for byte i (vocabulary 128: ASCII)."""

    bos_token_id = None
    eos_token_ids = frozenset()

    def encode(self, text):
        return list(text.encode("ascii"))

    def token_bytes(self, i):
        return bytes([i])


def test_perplexity_matches_direct_computation(tiny):
    from pipeload.runtime.engine import load_engine

    model, _, gguf = tiny("llama2")
    engine = load_engine(gguf)  # F32 file: the exact float32 path
    text = "def f(x):\n    return x * 2 + 1  # a small test of the sliding window\n" * 2
    ids = ByteTokenizer().encode(text)
    for ctx, stride in [(32, 16), (len(ids), len(ids) - 1), (40, 39)]:
        nll, _ = token_nll(engine, ids, ctx, stride)
        direct = _direct_nll(model, ids, ctx, stride)
        assert torch.allclose(nll, direct, atol=1e-4), (ctx, stride, (nll - direct).abs().max())
    r = perplexity(engine, ByteTokenizer(), text, ctx=32, stride=16)
    direct = _direct_nll(model, ids, 32, 16)
    assert r.tokens == len(ids) - 1 and r.bytes == len(ids) - 1
    assert r.perplexity == pytest.approx(math.exp(direct.mean().item()), rel=1e-4)
    assert r.bits_per_byte == pytest.approx(direct.sum().item() / math.log(2) / (len(ids) - 1), rel=1e-4)
    # a model compared with itself: no divergence, same top token everywhere
    same = kl_divergence(engine, engine, ids, 32, 16)
    assert abs(same["kl_divergence"]) < 1e-6 and same["same_top_token"] == 1.0


def test_read_text_joins_jsonl_documents(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"path": str(i), "text": f"doc {i}"}) for i in range(3)) + "\n")
    assert read_text(path) == "doc 0\n\ndoc 1\n\ndoc 2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_text(bad)
