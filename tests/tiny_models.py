"""Tiny random-weight models with real architectures, built through transformers configs.

Each is saved as an HF folder (safetensors) and can be converted to GGUF with pipeload's own
converter, which follows llama.cpp's conventions (checked separately by loading those GGUF files
back into transformers).
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def _common(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)
    base.update(kw)
    return base


def hf_config(kind: str):
    """A transformers config for one of the tiny test architectures."""
    import transformers as tf

    if kind == "llama2":
        return tf.LlamaConfig(**_common(num_key_value_heads=4, tie_word_embeddings=False))
    if kind == "llama3":  # GQA, llama3 rope scaling, large theta, tied head
        return tf.LlamaConfig(**_common(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True))
    if kind == "mistral":
        return tf.MistralConfig(**_common(sliding_window=None, tie_word_embeddings=False))
    if kind == "qwen2":  # q/k/v biases, tied head
        return tf.Qwen2Config(**_common(tie_word_embeddings=True))
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=256, bos_token_id=0,
                             eos_token_id=0)
    raise ValueError(kind)


KINDS = ["llama2", "llama3", "mistral", "qwen2", "gpt2"]


def build_hf_model(kind: str, folder: Path, seed: int = 0):
    """Create, randomise and save a tiny model; returns the transformers model (eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(kind), attn_implementation="eager").eval()
    with torch.no_grad():  # larger-than-init weights so that logits differ clearly between tokens
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def build_k_quant_llama(folder: Path, weight_std: float | None = None) -> None:
    """Save a tiny untied Llama whose rows are multiples of 256 (so the K-quant types and mixes
    apply) as an HF folder; `weight_std` redraws its matrices with that spread (None: init)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, weight_std)
    model.save_pretrained(folder)


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits (B, T, V) for ids (B, T)."""
    with torch.no_grad():
        return model(ids).logits.float()
