"""Tiny random mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) saved as HF
folders, and GGUF files of them written by llama.cpp's own converter (tests/llama_cpp_converter.py).

The converter refuses a tokenizer it does not recognise, so the folders carry the WordPiece
vocabulary of the real all-MiniLM-L6-v2 (which it knows): their vocabulary has 30522 rows.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

MINILM = Path(os.environ.get("PIPELOAD_MODELS") or Path.home() / ".cache" / "pipeload" / "models") / "all-minilm-l6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
VOCAB = 30522


def moe_config(kind: str, n_layers: int = 2):
    """A transformers config of a tiny MoE model: (experts, top k) 8/2 for Mixtral and OLMoE,
    12/4 with a shared expert for Qwen2-MoE, 16/4 renormalised for Qwen3-MoE (their real
    routing, scaled down)."""
    import transformers as tf

    base = dict(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if kind == "mixtral":
        return tf.MixtralConfig(**base, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                sliding_window=None)
    if kind == "qwen2_moe":
        return tf.Qwen2MoeConfig(**base, intermediate_size=96, moe_intermediate_size=32, num_experts=12,
                                 num_experts_per_tok=4, shared_expert_intermediate_size=48, norm_topk_prob=False)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**base, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=16,
                                 num_experts_per_tok=4, norm_topk_prob=True)
    if kind == "olmoe":
        return tf.OlmoeConfig(**base, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                              norm_topk_prob=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    raise ValueError(kind)


def build_moe_model(kind: str, folder: Path, seed: int = 0, n_layers: int = 2):
    """Create, randomise and save a tiny MoE model with the MiniLM tokenizer files beside it;
    returns the transformers model (eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(kind, n_layers), attn_implementation="eager").eval()
    with torch.no_grad():  # larger-than-init weights: logits that differ clearly, routers that pick varied experts
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(MINILM / f, folder / f)
    return model


def gguf_with_metadata(src: Path, dst: Path, **values: int) -> Path:
    """A copy of the GGUF `src` at `dst` with integer metadata keys (dots written as "__")
    changed in place (gguf-py's reader over a writable map); returns dst."""
    from gguf import GGUFReader

    shutil.copy(src, dst)
    reader = GGUFReader(dst, "r+")
    for key, value in values.items():
        field = reader.fields[key.replace("__", ".")]
        field.parts[field.data[0]][0] = value
    reader.data.flush()
    return dst
