"""Calibration text for calibrated quantization: the built-in corpus or the user's own.

The built-in models were trained on the Python standard library's sources and help topics
(training/README.md), which every Python installation carries, so the corpus is rebuilt here from
the local stdlib with the same rules: calibration uses the *training* split only (the held-out
split, used for perplexity, is never seen by the quantizer), documents spread over the corpus.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Sequence

import torch

HELDOUT_PCT = 4  # training/build_corpus.py's split: sha256(key) % 100 < 4 is held out
_TEST_DIRS = {"test", "tests", "idle_test"}
_SKIP_TOP = {"site-packages", "dist-packages", "__pycache__"}
_SKIP_FILES = {"pydoc_data/topics.py", "html/entities.py", "stringprep.py"}


def _is_heldout(key: str) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h % 100 < HELDOUT_PCT


def _skipped(rel: str, text: str | None) -> bool:
    parts = rel.split("/")
    return (parts[0] in _SKIP_TOP or any(p in _TEST_DIRS for p in parts[:-1]) or rel in _SKIP_FILES
            or parts[-1].startswith("_sysconfigdata")
            or (text is not None and parts[0] == "encodings" and "gencodec.py" in text[:400]))


def stdlib_corpus(split: str):
    """(key, text) of the built-in models' corpus split ("train" or "heldout"), rebuilt from this
    Python's standard library with training/build_corpus.py's rules, in its order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel_dir = Path(dirpath).relative_to(stdlib)
        if rel_dir.parts and rel_dir.parts[0] in _SKIP_TOP:
            dirnames[:] = []
            continue
        files += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    want_heldout = split == "heldout"
    for rel in sorted(files):
        if _skipped(rel, None) or _is_heldout(rel) != want_heldout:
            continue
        try:
            text = (stdlib / rel).read_bytes().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n")
        if not _skipped(rel, text) and text.strip():
            yield rel, text
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        key, text = f"pydoc_data/topics.py::{name}", topics[name].replace("\r\n", "\n")
        if text.strip() and _is_heldout(key) == want_heldout:
            yield key, text


def builtin_heldout_text() -> str:
    """The built-in models' held-out text (what `pipeload bench quality` scores by default)."""
    return "\n\n".join(text for _, text in stdlib_corpus("heldout"))


def builtin_calibration_text(max_bytes: int = 1 << 20) -> str:
    """About `max_bytes` of the training split, documents spread evenly over the whole corpus."""
    docs = [text for _, text in stdlib_corpus("train")]
    if not docs:
        raise FileNotFoundError("no standard library sources to calibrate with; pass calibration_data")
    texts, size = [], 0
    step = max(1, len(docs) // 200)  # spread over the library rather than its first package
    for k in list(range(0, len(docs), step)) + list(range(1, len(docs), step)):
        texts.append(docs[k])
        size += len(docs[k])
        if size >= max_bytes:
            break
    return "\n\n".join(texts)


def calibration_tokens(data, tokenizer, n_samples: int = 64, seq_len: int = 256, seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token ids: random windows of the calibration data.

    data: None (the built-in corpus), a path to a .txt/.jsonl file, a string of text, a list of
    strings, or token ids ((n, T) tensor or list of lists, used as they are). Raises ValueError
    when the data has fewer than seq_len + 1 tokens or no tokenizer is available for text."""
    if isinstance(data, torch.Tensor):
        return data.long().reshape(-1, data.shape[-1])
    if isinstance(data, Sequence) and not isinstance(data, str) and data and not isinstance(data[0], str):
        return torch.as_tensor(data, dtype=torch.long)
    if tokenizer is None:
        raise ValueError("calibration text needs a tokenizer; pass token ids instead")
    if data is None:
        text = builtin_calibration_text(max_bytes=max(1 << 20, 8 * n_samples * seq_len))
    elif isinstance(data, (str, os.PathLike)) and len(str(data)) < 4096 and Path(data).is_file():
        from ..perplexity import read_text

        text = read_text(data, max_bytes=max(1 << 22, 16 * n_samples * seq_len))
    elif isinstance(data, str):
        text = data
    else:
        text = "\n\n".join(data)
    ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
    if ids.numel() < seq_len + 1:
        raise ValueError(f"the calibration data has {ids.numel()} tokens; need at least {seq_len + 1}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    rows = ids[starts[:, None] + torch.arange(seq_len)]  # (n_samples, seq_len)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        rows[:, 0] = tokenizer.bos_token_id
    return rows
