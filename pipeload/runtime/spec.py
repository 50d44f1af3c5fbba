"""Opening a model: the one place that turns a path into what the model is (docs/DESIGN.md, "file -> spec").

`open_model(path)` reads the checkpoint's header (GGUF metadata or config.json and safetensors
headers; no tensor data), finds the architecture module, builds its ModelArgs, indexes every
tensor under its GGUF name by layer group, and chooses the compute dtype. The engine, the
planner, the cluster's coordinator and stages, `convert`, `quantize`, `inspect` and `plan` all
start from the ModelSpec it returns; none of them opens a checkpoint itself.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .. import models
from ..errors import ModelFileError
from ..weights.checkpoint import Checkpoint, open_checkpoint
from ..weights.index import EMBED_NAMES, HEAD_NAMES, WeightsIndex, build_index


@dataclass
class ModelSpec:
    """What a model file is: its checkpoint, architecture module and args, the weights index,
    the name rules that index used, the compute dtype, and where its tokenizer comes from."""

    checkpoint: Checkpoint
    arch: ModuleType
    args: Any
    index: WeightsIndex
    dtype: torch.dtype                # compute dtype of activations, on the weights as stored
    name_rules: list                  # the architecture's HF_NAME_RULES (plain data; unused for GGUF)
    exact: bool = False               # the reference mode: every matrix dequantized to float32 (dtype float32)

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @property
    def tokenizer_source(self) -> str:
        """"gguf" (tokenizer.ggml.* metadata), "hf" (tokenizer files in the folder) or "none"."""
        ckpt = self.checkpoint
        if ckpt.format == "gguf":
            return "gguf" if any(k.startswith("tokenizer.ggml.") for k in ckpt.config) else "none"
        has = (ckpt.path / "tokenizer.json").is_file() or (ckpt.path / "tokenizer.model").is_file()
        return "hf" if has else "none"

    def load_tokenizer(self):
        """The model's Tokenizer (pipeload/tokenizer), or None when the file has none."""
        from ..tokenizer import load_tokenizer

        return load_tokenizer(self.checkpoint)

    def new_model(self) -> torch.nn.Module:
        """The architecture's Model (embeddings and head) with no weights yet."""
        return self.arch.Model(self.args)

    @property
    def is_encoder(self) -> bool:
        """An encoder (BERT, ViT): bidirectional attention, no KV cache, no generation."""
        return self.arch.__name__.rsplit(".", 1)[-1] in models.ENCODERS

    @property
    def embed_names(self) -> tuple[str, ...]:
        """First parts of the names of the embed group's tensors (the architecture's, or the default)."""
        return getattr(self.arch, "EMBED_NAMES", EMBED_NAMES)

    @property
    def head_names(self) -> tuple[str, ...]:
        return getattr(self.arch, "HEAD_NAMES", HEAD_NAMES)


def model_args(ckpt: Checkpoint) -> tuple[ModuleType, Any]:
    """(architecture module, ModelArgs) from a checkpoint's metadata; raises ModelFileError on
    missing or malformed settings, UnsupportedModelError for unknown architectures."""
    where = "GGUF metadata" if ckpt.format == "gguf" else "config.json"
    try:
        if ckpt.format == "gguf":
            arch = models.for_gguf_architecture(ckpt.architecture, ckpt.config)
            shapes = {name: t.shape for name, t in ckpt.tensors.items()}
            args = arch.ModelArgs.from_gguf(ckpt.architecture, ckpt.config, shapes)
        else:
            arch = models.for_hf_model_type(ckpt.architecture)
            args = arch.ModelArgs.from_hf_config(ckpt.config, set(ckpt.tensors))
    except KeyError as e:
        raise ModelFileError(f"{ckpt.path}: {where} lacks {e.args[0]!r}") from None
    except (TypeError, ZeroDivisionError) as e:
        raise ModelFileError(f"{ckpt.path}: {where} has a missing or malformed setting ({e})") from None
    except ModelFileError as e:  # the architecture's own checks (e.g. expert counts against tensor shapes)
        raise ModelFileError(f"{ckpt.path}: {e}") from None
    for field in dataclasses.fields(args):  # the required settings (no default) are positive integers
        value = getattr(args, field.name)
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if required and field.type in ("int", int) and (not isinstance(value, int) or value <= 0):
            raise ModelFileError(f"{ckpt.path}: model setting {field.name} = {value!r} is missing or not a positive integer")
    return arch, args


def compute_dtype(ckpt: Checkpoint, requested: torch.dtype | None) -> torch.dtype:
    """The requested activations' dtype, by default float32 (weights stay as stored either way;
    see runtime/blocks.py). float32 costs no speed: the products run on the stored blocks with
    8-bit activations as llama.cpp's do, and the residual stream keeps float32 as llama.cpp's
    does (bfloat16 moved real models' perplexity by up to ~1.8%)."""
    if requested is not None:
        if requested not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute dtype must be float32 or bfloat16, got {requested}")
        return requested
    return torch.float32


def open_model(path: str | os.PathLike, dtype: torch.dtype | None = None, exact: bool = False) -> ModelSpec:
    """The ModelSpec of a GGUF file or Hugging Face folder (`exact`: the reference mode, float32
    activations on every matrix dequantized to float32); raises ModelFileError (missing,
    truncated or corrupt files, bad settings) or UnsupportedModelError (unknown architecture,
    tensors the architecture does not use)."""
    ckpt = open_checkpoint(path)
    arch, args = model_args(ckpt)
    rules = list(getattr(arch, "HF_NAME_RULES", []))
    index = build_index(ckpt, args.n_layers, rules, args.tie_embeddings, getattr(arch, "EMBED_NAMES", EMBED_NAMES),
                        getattr(arch, "HEAD_NAMES", HEAD_NAMES))
    dtype = torch.float32 if exact else compute_dtype(ckpt, dtype)
    return ModelSpec(checkpoint=ckpt, arch=arch, args=args, index=index, dtype=dtype, name_rules=rules, exact=exact)


class SpecView:
    """What a loaded engine (runtime/engine.py Engine, cluster/launch.py ClusterEngine) says
    about its model, read from its `spec` (a ModelSpec) and `context` (0: the model's own)."""

    spec: ModelSpec
    context: int

    @property
    def checkpoint(self) -> Checkpoint:
        return self.spec.checkpoint

    @property
    def arch(self) -> ModuleType:
        return self.spec.arch

    @property
    def args(self) -> Any:
        return self.spec.args

    @property
    def index(self) -> WeightsIndex:
        return self.spec.index

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.dtype

    @property
    def context_length(self) -> int:
        return self.context or self.args.context_length
