"""Opening a model path: a GGUF file or a Hugging Face folder, whichever it is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .gguf import GGUFFile, is_gguf, read_gguf
from .safetensors import read_hf_folder
from .tensor_info import TensorInfo


@dataclass
class Checkpoint:
    """A model on disk: its format, configuration and tensors under their file names.

    format: "gguf" or "hf"
    config: GGUF metadata (format "gguf") or config.json (format "hf")
    """

    path: Path
    format: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    gguf: GGUFFile | None = None

    @property
    def architecture(self) -> str:
        """GGUF general.architecture or config.json model_type."""
        if self.gguf is not None:
            return self.gguf.architecture
        model_type = self.config.get("model_type")
        if not isinstance(model_type, str):
            raise ModelFileError(f"{self.path}: config.json has no model_type")
        return model_type

    @property
    def file_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a GGUF file or HF model folder (or a .safetensors file inside one); raises
    ModelFileError naming what is wrong. Use runtime.spec.open_model, which calls this."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix == ".safetensors" and not is_gguf(p):
        if not (p.parent / "config.json").is_file():
            raise ModelFileError(f"{p}: a lone .safetensors file has no config.json beside it; pass the model folder")
        p = p.parent
    if p.is_dir():
        config, tensors = read_hf_folder(p)
        return Checkpoint(path=p, format="hf", config=config, tensors=tensors)
    if is_gguf(p):
        g = read_gguf(p)
        return Checkpoint(path=p, format="gguf", config=g.metadata, tensors=g.tensors, gguf=g)
    raise ModelFileError(f"{p}: not a GGUF file or a Hugging Face model folder (expected a .gguf file or a folder "
                         f"with config.json and model.safetensors)")
