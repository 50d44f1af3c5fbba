"""Tiny random decoders (Qwen3, Phi-3, Gemma 2, Gemma 3 text) saved as HF folders, with GGUF files of
them written by llama.cpp's own converter (encoder_models.llama_cpp_convert).

The converter refuses tokenizers it does not know: Qwen3 and Gemma 3 carry the WordPiece
vocabulary of the real all-MiniLM-L6-v2 (30522 rows, as the MoE test models do); Gemma 2's and
Phi-3's converters read only a SentencePiece `tokenizer.model`, so their folders get a tiny one trained
here from a fixed text (deterministic).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from moe_models import MINILM, TOKENIZER_FILES, VOCAB

DECODER_KINDS = ["qwen3", "phi3", "gemma2", "gemma3"]
WINDOW = 8         # the sliding window of the Gemma models: tests run sequences longer than it
SPM_VOCAB = 320    # Gemma 2's and Phi-3's SentencePiece vocabulary
LONGROPE_ORIGINAL = 64  # Phi-3's original_max_position_embeddings: longer sequences take the long factors
SENTENCEPIECE_KINDS = {"gemma2", "phi3"}  # folders with a tokenizer.model (the others: MiniLM's WordPiece)


def decoder_config(kind: str, **over):
    """A transformers config of a tiny decoder: 6 layers for Gemma 3 (5 local : 1 global), 4
    for Gemma 2 (alternating local and global), 4 for Qwen3 and Phi-3; the feed-forward wide
    enough that a budget can stream layers (test_decoders._streaming_budget)."""
    import transformers as tf

    base = dict(hidden_size=64, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
    if kind == "qwen3":
        return tf.Qwen3Config(**{**base, "num_hidden_layers": 4, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
                                 "tie_word_embeddings": False, **over})
    if kind == "phi3":  # LongRoPE: short factors within 64 positions, long ones beyond; a window on every layer
        g = torch.Generator().manual_seed(3)
        factors = lambda: [round(1.0 + 3.0 * x, 4) for x in torch.rand(8, generator=g).tolist()]  # noqa: E731
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": factors(), "long_factor": factors(),
                "original_max_position_embeddings": LONGROPE_ORIGINAL}
        return tf.Phi3Config(**{**base, "num_hidden_layers": 4, "vocab_size": SPM_VOCAB, "tie_word_embeddings": False,
                                "original_max_position_embeddings": LONGROPE_ORIGINAL, "rope_parameters": rope,
                                "sliding_window": WINDOW, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
                                **over})
    if kind == "gemma2":  # query_pre_attn_scalar = head_dim: llama.cpp scales by head_dim (but for 27B)
        return tf.Gemma2Config(**{**base, "num_hidden_layers": 4, "vocab_size": SPM_VOCAB, "sliding_window": WINDOW,
                                  "query_pre_attn_scalar": 16, "attn_logit_softcapping": 2.0,
                                  "final_logit_softcapping": 3.0, "pad_token_id": 0, "eos_token_id": 1,
                                  "bos_token_id": 2, **over})
    if kind == "gemma3":
        return tf.Gemma3TextConfig(**{**base, "num_hidden_layers": 6, "vocab_size": VOCAB, "sliding_window": WINDOW,
                                      "query_pre_attn_scalar": 16, "pad_token_id": 0, "eos_token_id": 1,
                                      "bos_token_id": 2, **over})
    raise ValueError(kind)


def build_decoder(kind: str, folder: Path, seed: int = 0, **over):
    """Create, randomise and save a tiny decoder with tokenizer files the converter accepts;
    returns the transformers model (eval mode, eager attention: its sliding-window mask)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(decoder_config(kind, **over), attn_implementation="eager").eval()
    gemma = kind.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # Gemma stores w of (1 + w): keep 1 + w near 1 either way
                p.uniform_(-0.2, 0.2) if gemma else p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    if kind in SENTENCEPIECE_KINDS:
        _write_sentencepiece(Path(folder) / "tokenizer.model")
    else:
        for f in TOKENIZER_FILES:
            shutil.copy(MINILM / f, Path(folder) / f)
    return model


def _write_sentencepiece(path: Path) -> None:
    """A SentencePiece BPE model of SPM_VOCAB pieces over the standard library's docstrings."""
    import collections
    import io
    import json
    import os
    import re

    import sentencepiece as spm

    text = [line.strip() for mod in (collections, io, json, os, re)
            for obj in [mod, *(getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_"))]
            for line in (getattr(obj, "__doc__", None) or "").splitlines() if len(line.strip()) > 10]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=SPM_VOCAB,
                                   model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, minloglevel=2,
                                   num_threads=1)
    path.write_bytes(out.getvalue())


def gguf_without_key(src: Path, dst: Path, *keys: str) -> Path:
    """A copy of the GGUF `src` at `dst` whose metadata `keys` are gone (each renamed in place to
    a key of the same length that no reader asks for: its last character becomes '~'); returns dst."""
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    for key in keys:
        reader.fields[key].parts[1][-1] = ord("~")  # parts[1]: the key's bytes
    reader.data.flush()
    return dst
