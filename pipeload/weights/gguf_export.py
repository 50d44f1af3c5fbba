"""Writing GGUF: typed metadata values and a Hugging Face tokenizer as GGUF tokenizer metadata."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFWriter

from ..errors import UnsupportedModelError

# token types as llama.cpp numbers them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# the pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def add_value(w: GGUFWriter, key: str, value: Any) -> None:
    """Add a metadata value with llama.cpp's usual type: ints as uint32 (int32 if negative), floats as
    float32, lists as arrays, bytes (and the precompiled charsmap) as uint8 arrays."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if 0 <= value < 2**32 else w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (bytes, bytearray)) or key == "tokenizer.ggml.precompiled_charsmap":
        w.add_array(key, bytes(bytearray(int(b) & 0xFF for b in value)))  # a uint8 array, as llama.cpp reads it
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"cannot write metadata {key}={value!r}")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """GGUF tokenizer.ggml.pre for a tokenizer.json byte-level pre-tokenizer."""
    if not pre:
        return "default"
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Split":
            regex = step.get("pattern", {}).get("Regex")
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[regex]
            raise UnsupportedModelError(f"unknown pre-tokenizer regex {regex!r}: cannot name it for llama.cpp")
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"
    return "default"


def hf_tokenizer_metadata(folder: Path, vocab_size: int) -> dict[str, Any]:
    """GGUF tokenizer.* metadata for a folder's tokenizer.json ({} if it has none): byte-level BPE
    (GPT-2, Llama 3, Qwen2 style), WordPiece (BERT) or unigram (XLM-R), as llama.cpp's converter
    writes them. Raises UnsupportedModelError for other tokenizers."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return {}
    tok = json.loads(path.read_text())
    model = tok.get("model", {})
    if model.get("type") == "WordPiece":
        return _wordpiece_metadata(folder, tok, vocab_size)
    if model.get("type") == "Unigram":
        return _unigram_metadata(folder, tok, vocab_size)
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(tok.get("decoder")):
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE, WordPiece and unigram tokenizers can be exported to GGUF so far")
    vocab: dict[str, int] = dict(model["vocab"])
    types = {i: NORMAL for i in vocab.values()}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    token_types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i], token_types[i] = text, types[i]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}

    def token_id(key: str) -> int | None:
        t = config.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        return vocab.get(t) if isinstance(t, str) else None

    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_tokenizer_name(tok.get("pre_tokenizer")),
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": token_types,
                            "tokenizer.ggml.merges": merges}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        i = token_id(key)
        if i is not None:
            meta[f"tokenizer.ggml.{gguf_key}"] = i
    from ..tokenizer.tokenizer import load_hf_tokenizer

    loaded = load_hf_tokenizer(folder)  # knows whether tokenizer.json's post-processor adds BOS
    meta["tokenizer.ggml.add_bos_token"] = bool(loaded.add_bos_token if loaded is not None else config.get("add_bos_token"))
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if isinstance(template, str):
        meta["tokenizer.chat_template"] = template
    return meta


def _vocab_and_types(tok: dict, vocab: dict[str, int], vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types by id (added special tokens CONTROL, other added ones USER_DEFINED,
    ids nothing names: "[PADi]" UNUSED, as llama.cpp's converter fills them)."""
    types = {i: NORMAL for i in vocab.values()}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens, token_types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n
    for text, i in vocab.items():
        tokens[i], token_types[i] = text, types[i]
    return tokens, token_types


def _special_ids(folder: Path, lookup) -> dict[str, int]:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    out = {}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("cls_token", "bos_token_id"),
                          ("sep_token", "seperator_token_id"), ("pad_token", "padding_token_id"),
                          ("unk_token", "unknown_token_id"), ("mask_token", "mask_token_id")):
        t = config.get(key)
        t = t.get("content") if isinstance(t, dict) else t
        i = lookup(t) if isinstance(t, str) else None
        if i is not None:
            out[f"tokenizer.ggml.{gguf_key}"] = i
    return out


def _wordpiece_metadata(folder: Path, tok: dict, vocab_size: int) -> dict[str, Any]:
    # llama.cpp's "bert" vocabulary: word starts spelled "▁word", continuations without "##",
    # control tokens as they are; [CLS] text [SEP] around every input
    model = tok["model"]
    tokens, types = _vocab_and_types(tok, dict(model["vocab"]), vocab_size)
    spelled = [t if ty in (CONTROL, UNUSED) else t[2:] if t.startswith("##") else "\u2581" + t
               for t, ty in zip(tokens, types)]
    by_text = {t: i for i, t in reversed(list(enumerate(tokens)))}
    meta: dict[str, Any] = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.tokens": spelled, "tokenizer.ggml.token_type": types,
                            **_special_ids(folder, by_text.get)}
    if "tokenizer.ggml.seperator_token_id" in meta:
        meta.setdefault("tokenizer.ggml.eos_token_id", meta["tokenizer.ggml.seperator_token_id"])
    norm = tok.get("normalizer") or {}
    meta["tokenizer.ggml.normalizer.lowercase"] = bool(norm.get("lowercase", False))
    meta["tokenizer.ggml.add_bos_token"] = meta["tokenizer.ggml.add_eos_token"] = True
    meta["tokenizer.ggml.add_sep_token"] = False
    return meta


def _unigram_metadata(folder: Path, tok: dict, vocab_size: int) -> dict[str, Any]:
    # llama.cpp's "t5" vocabulary (unigram): pieces with scores, the precompiled normalisation map
    import base64

    model = tok["model"]
    pieces = model["vocab"]  # [[piece, score], ...] in id order
    vocab = {piece: i for i, (piece, _) in reversed(list(enumerate(pieces)))}
    tokens, types = _vocab_and_types(tok, vocab, vocab_size)
    scores = [0.0] * len(tokens)
    for i, (_, score) in enumerate(pieces):
        scores[i] = float(score)
    unk = model.get("unk_id")
    if isinstance(unk, int):
        types[unk] = UNKNOWN
    steps = json.dumps(tok.get("normalizer")) + json.dumps(tok.get("pre_tokenizer"))
    charsmap = None
    norms = tok.get("normalizer") or {}
    for step in norms.get("normalizers", [norms]):
        if step.get("type") == "Precompiled" and step.get("precompiled_charsmap"):
            charsmap = base64.b64decode(step["precompiled_charsmap"])
    meta: dict[str, Any] = {"tokenizer.ggml.model": "t5", "tokenizer.ggml.pre": "default",
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                            "tokenizer.ggml.token_type": types, "tokenizer.ggml.add_space_prefix": "Metaspace" in steps,
                            "tokenizer.ggml.remove_extra_whitespaces": "WhitespaceSplit" in steps,
                            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True,
                            "tokenizer.ggml.add_sep_token": True, **_special_ids(folder, vocab.get)}
    if charsmap:
        meta["tokenizer.ggml.precompiled_charsmap"] = charsmap
    return meta
