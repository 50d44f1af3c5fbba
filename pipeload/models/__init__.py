"""Architectures: one module per family, each exporting ModelArgs, Block, Model and HF_NAME_RULES.

Found through a small registry keyed by the names checkpoints use: Hugging Face `model_type`
in config.json, or GGUF `general.architecture`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import UnsupportedModelError

# checkpoint architecture name -> pipeload module (under pipeload.models)
HF_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "llama", "gpt2": "gpt2"}


def _load(module_name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{module_name}")


def for_hf_model_type(model_type: str) -> ModuleType:
    """The architecture module for a config.json `model_type`; raises UnsupportedModelError."""
    if model_type not in HF_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unknown architecture {model_type!r} (config.json model_type); supported: {', '.join(sorted(HF_MODEL_TYPES))}")
    return _load(HF_MODEL_TYPES[model_type])


def for_gguf_architecture(arch: str) -> ModuleType:
    """The architecture module for a GGUF `general.architecture`; raises UnsupportedModelError."""
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unknown architecture {arch!r} (GGUF general.architecture); supported: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return _load(GGUF_ARCHITECTURES[arch])
