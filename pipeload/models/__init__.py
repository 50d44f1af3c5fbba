"""Architectures: one module per family, found through a small registry keyed by the names
checkpoints use (Hugging Face `model_type` in config.json, or GGUF `general.architecture`).

What an architecture module exports (pure torch plus quant.ops; it never imports weights/ or
runtime/ and never reads a file):

- `ModelArgs` with `from_hf_config(config, tensor_names)` and `from_gguf(arch, metadata, shapes)`;
  it has n_layers, dim, n_heads, n_kv_heads, head_dim, vocab_size, context_length,
  tie_embeddings, sliding_window.
- `Block(args, layer)`: `forward(x (B, T, D), step: StepInputs, kv: LayerKV | None)`. Its
  weight-holding submodules are named after the GGUF tensors (`attn_q` takes
  `blk.<layer>.attn_q.weight`); matrices are `common.Linear` (a GGMLWeight as stored), linears
  that read one input are grouped with `common.Fused` (one ops.linear_many pass).
- `Model(args)`: the embeddings and head (`embed`, `step_inputs`, `head`); the executor runs the
  blocks in between.
- `HF_NAME_RULES`: plain data, (regex over the HF name, GGUF name or None[, "transpose"]).
- For `pipeload convert`: `gguf_architecture`, `gguf_metadata`, `gguf_extra_tensors`, `to_gguf_tensor`.

runtime/blocks.py builds every block from the file's bytes (see its docstring).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

# checkpoint architecture name -> pipeload module (under pipeload.models)
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2",
                  "phi3": "phi3", "gemma2": "gemma", "gemma3_text": "gemma",
                  "bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "camembert": "bert",
                  "vit": "vit", "deit": "vit",
                  "mixtral": "mixtral", "qwen2_moe": "qwen_moe", "qwen3_moe": "qwen_moe", "olmoe": "olmoe"}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "llama", "qwen3": "llama", "gpt2": "gpt2", "phi3": "phi3",
                      "gemma2": "gemma", "gemma3": "gemma", "bert": "bert", "vit": "vit",
                      "qwen2moe": "qwen_moe", "qwen3moe": "qwen_moe", "olmoe": "olmoe"}
# architectures that encode (no causal attention, no KV cache, no generation)
ENCODERS = frozenset({"bert", "vit"})
# GGUF architectures whose files also hold another family, told apart by a metadata key:
# llama.cpp writes Mixtral as "llama" with llama.expert_count set
GGUF_VARIANTS = {"llama": ("llama.expert_count", "mixtral")}


def _load(module_name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{module_name}")


def for_hf_model_type(model_type: str) -> ModuleType:
    """The architecture module for a config.json `model_type`; raises UnsupportedModelError."""
    if model_type not in HF_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unknown architecture {model_type!r} (config.json model_type); supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    return _load(HF_MODEL_TYPES[model_type])


def for_gguf_architecture(arch: str, metadata: dict | None = None) -> ModuleType:
    """The architecture module for a GGUF `general.architecture` (and its metadata, which tells
    variants apart: see GGUF_VARIANTS); raises UnsupportedModelError."""
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unknown architecture {arch!r} (GGUF general.architecture); supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    key, variant = GGUF_VARIANTS.get(arch, (None, None))
    if key is not None and (metadata or {}).get(key):
        return _load(variant)
    return _load(GGUF_ARCHITECTURES[arch])
