"""Sentence vectors from an encoder's hidden states, as sentence-transformers makes them.

A sentence-transformers folder says what to do in `modules.json` (Transformer -> Pooling ->
optionally Normalize), `1_Pooling/config.json` (which pooling) and `sentence_bert_config.json`
(max_seq_length, do_lower_case). A GGUF file written by llama.cpp's converter keeps only the
pooling type (`bert.pooling_type`); llama.cpp normalises embeddings by default (its embedding
tool's --embd-normalize 2), and pipeload does the same for GGUF files.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError, UnsupportedModelError

# sentence-transformers' pooling modes, in the order it concatenates several
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}
# llama.cpp's enum llama_pooling_type (GGUF {arch}.pooling_type)
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "lasttoken"}
# sentence-transformers modules that change nothing pipeload computes differently
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class SentenceConfig:
    """How hidden states become one vector per input.

    modes:     pooling modes (POOLING_MODES), their vectors concatenated in that order
    normalize: L2-normalise the pooled vector
    max_tokens: the longest input in tokens (None: the model's position table decides)
    lowercase: lower-case the text before tokenizing (sentence_bert_config do_lower_case)
    source:    where this came from, for messages and stats
    """

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False
    max_tokens: int | None = None
    lowercase: bool = False
    source: str = "default"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not readable JSON ({e})") from None


def _pooling_modes(cfg: dict[str, Any], where: Path) -> tuple[str, ...]:
    mode = cfg.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in _LEGACY_KEYS.items() if cfg.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise UnsupportedModelError(f"{where}: pooling mode {unknown[0]!r} is not supported ({', '.join(POOLING_MODES)} are)")
    if cfg.get("include_prompt") is False:
        raise UnsupportedModelError(f"{where}: include_prompt=false (pooling without the prompt tokens) is not supported")
    modes = modes or ("mean",)  # sentence-transformers' default when no mode is switched on
    return tuple(m for m in POOLING_MODES if m in modes)


def sentence_config_of_folder(folder: Path) -> SentenceConfig:
    """The pooling of a Hugging Face folder: sentence-transformers' files if present, else mean
    pooling without normalisation (with a warning saying so). Raises ModelFileError for a corrupt
    file, UnsupportedModelError for modules pipeload does not run (Dense, ...)."""
    folder = Path(folder)
    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        warnings.warn(f"{folder}: no sentence-transformers modules.json; using mean pooling without normalisation",
                      stacklevel=3)
        return SentenceConfig(source="default (no modules.json)")
    modules = _read_json(modules_path)
    if not isinstance(modules, list):
        raise ModelFileError(f"{modules_path}: expected a list of modules")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    others = [k for k in kinds if k not in _KNOWN_MODULES]
    if others:
        raise UnsupportedModelError(f"{modules_path}: sentence-transformers module {others[0]!r} is not supported "
                                    f"(only {', '.join(_KNOWN_MODULES)} are)")
    modes: tuple[str, ...] = ("mean",)
    pooling = [m for m, k in zip(modules, kinds) if k == "Pooling"]
    if pooling:
        cfg_path = folder / pooling[0].get("path", "") / "config.json"
        if not cfg_path.is_file():
            raise ModelFileError(f"{cfg_path}: missing (modules.json names a Pooling module there)")
        modes = _pooling_modes(_read_json(cfg_path), cfg_path)
    else:
        warnings.warn(f"{modules_path}: no Pooling module; using mean pooling", stacklevel=3)
    st_path = folder / "sentence_bert_config.json"
    st = _read_json(st_path) if st_path.is_file() else {}
    max_tokens = st.get("max_seq_length")
    return SentenceConfig(modes=modes, normalize="Normalize" in kinds,
                          max_tokens=int(max_tokens) if max_tokens else None,
                          lowercase=bool(st.get("do_lower_case", False)), source=str(modules_path))


def sentence_config_of_gguf(arch: str, metadata: dict[str, Any]) -> SentenceConfig:
    """The pooling a GGUF file declares ({arch}.pooling_type), L2-normalised as llama.cpp does;
    mean pooling with a warning when the file declares none."""
    kind = metadata.get(f"{arch}.pooling_type")
    if kind is None or kind == 0:
        warnings.warn(f"the GGUF file declares no pooling ({arch}.pooling_type); using mean pooling", stacklevel=3)
        return SentenceConfig(normalize=True, source="default (no pooling_type in the GGUF file)")
    if kind not in _GGUF_POOLING:
        raise UnsupportedModelError(f"GGUF {arch}.pooling_type {kind} is not supported (1 mean, 2 cls, 3 last are)")
    return SentenceConfig(modes=(_GGUF_POOLING[kind],), normalize=True, source=f"GGUF {arch}.pooling_type")


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: SentenceConfig) -> torch.Tensor:
    """Sentence vectors (B, len(modes) * D) float32 from final hidden states (B, T, D) and the
    mask (B, T) bool of real (unpadded) tokens; each input's padded rows are left out exactly."""
    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)                       # (B, T, 1)
    lengths = mask.sum(dim=1)                                # (B,)
    out = []
    for mode in config.modes:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(h.masked_fill(~mask.unsqueeze(-1), float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (h * m).sum(dim=1)                       # (B, D)
            count = m.sum(dim=1).clamp(min=1e-9)             # (B, 1)
            out.append(total / (count if mode == "mean" else count.sqrt()))
        elif mode == "weightedmean":
            w = torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None] * m  # (B, T, 1): position weights
            out.append((h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            out.append(h[torch.arange(h.shape[0]), lengths - 1])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}")
    vec = out[0] if len(out) == 1 else torch.cat(out, dim=-1)
    return torch.nn.functional.normalize(vec, p=2, dim=-1) if config.normalize else vec
