"""Building a `Tokenizer` from GGUF metadata (and from a SentencePiece tokenizer.model).

A GGUF file carries no tokenizer.json: it stores the vocabulary under llama.cpp's keys
(`tokenizer.ggml.*`). We rebuild a `tokenizers.Tokenizer` that encodes the way llama.cpp does
(src/llama-vocab.cpp), since llama.cpp is what the file was made for:

- "gpt2": byte-level BPE with the file's merges, split first by the regexes llama.cpp uses for
  `tokenizer.ggml.pre`.
- "llama": SentencePiece BPE, merging the highest-scoring pair first, "▁" for spaces, "<0x0A>"
  byte fallback.
- "bert": WordPiece, with llama.cpp's "▁word" / "piece" spelling turned back into "word" / "##piece".
- "t5": SentencePiece unigram (XLM-RoBERTa, T5): the scored pieces, the file's precompiled
  normalisation map, "▁" for spaces; built as transformers builds XLM-R's tokenizer.json.

Where llama.cpp and transformers (transformers/integrations/gguf/gguf_tokenizer_mapping.py) read
the same file differently, we follow llama.cpp:

1. SentencePiece prefix space: llama.cpp prepends a space to every text piece that starts the text
   or follows a special token, even when it already starts with a space (as sentencepiece does):
   " hi" -> "▁▁hi", "<s>hi" -> "<s>", "▁hi". transformers' Metaspace(prepend_scheme="first") adds
   it only at the very start and not before an existing space: "▁hi", and "<s>", "hi".
2. Pre-tokenizer regexes: transformers knows the llama3/qwen2/qwen35/tekken/gpt-4o splits and uses
   the GPT-2 regex for every other `tokenizer.ggml.pre` ("default", "starcoder", "falcon",
   "deepseek-*", ...); llama.cpp has its own list for each (e.g. "default" first isolates runs of
   punctuation and cuts digit runs into threes; "starcoder" isolates every digit).
3. Contractions: llama.cpp matches 's 't 're ... with ASCII-only case folding; transformers'
   `(?i:'s|...)` folds Unicode too ("'ſ" matches there).
4. tekken / gpt-4o: llama.cpp approximates the upper/lower-case letter classes as "a letter that is
   not a-z" / "not A-Z", so non-ASCII letters count as both; the original regex uses \\p{Lu}/\\p{Ll}.
5. "llama3"-family and "tekken" pre-tokenizers set ignore_merges (a pre-token that is itself in the
   vocabulary is taken whole, as in the original tokenizer.json); transformers' GGUF BPE does not.
6. Defaults when a key is missing: llama.cpp adds BOS for "llama3"/"tekken" pre-tokenizers and for
   SentencePiece; transformers adds none for byte-level BPE.
7. Control tokens written outside the byte alphabet in a byte-level vocabulary (e.g. with spaces):
   llama.cpp matches them in text; transformers skips them.
8. End of generation: llama.cpp also stops on tokens it recognises by text (<|eot_id|>, <|im_end|>,
   ...), see `tokenizer.END_OF_GENERATION_TEXTS`; transformers knows only the EOS id.

Both run their regexes in different engines (llama.cpp's own Unicode tables, Oniguruma here), so
rare Unicode category edge cases may still differ. Detokenizing never "cleans up" spaces before
punctuation (llama.cpp's `clean_spaces` only applies to its whole-text detokenize call).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import ModelFileError, UnsupportedModelError
from .tokenizer import (END_OF_GENERATION_TEXTS, PieceDecoding, Tokenizer, end_of_generation_ids,
                        set_bos_eos_processor)

# GGUF token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# ---- pre-tokenizer regexes, per tokenizer.ggml.pre, as llama.cpp applies them (one after another,
# each splitting the pieces the previous one left, keeping matches and the text between them)
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_UPPERISH, _LOWERISH = r"((?=[\p{L}])([^a-z]))", r"((?=[\p{L}])([^A-Z]))"
_TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}*{_LOWERISH}+{_CONTRACTIONS}?"
          rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPERISH}+{_LOWERISH}*{_CONTRACTIONS}?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
              r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text before BPE for one `tokenizer.ggml.pre` value."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a pre-token found whole in the vocabulary is not merged
    add_bos: bool = False  # llama.cpp's add_bos default when the file does not say
    has_bos: bool = True  # False: llama.cpp ignores the BOS id (chatglm)


def _family(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return dict.fromkeys(names.split(), pre)


PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **_family("default", PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
              PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **_family("dbrx smaug-bpe", PreTokenizer((_LLAMA3,))),
    **_family("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert mpt olmo "
              "jais trillion granite-docling exaone4 jina-v1-en jina-v2-code roberta-bpe", PreTokenizer((_GPT2,))),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
              PreTokenizer((r"\p{N}", _GPT2))),
    **_family("falcon", PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open grok-2",
              PreTokenizer((_QWEN2,))),
    **_family("qwen35", PreTokenizer((_QWEN35,))),
    **_family("deepseek-coder",
              PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"))),
    **_family("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer(tuple(_DEEPSEEK3))),
    **_family("tekken", PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True)),
    **_family("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer((_GPT4O,))),
    **_family("glm4 chatglm-bpe", PreTokenizer((_LLAMA3,), has_bos=False)),
    **_family("bloom poro-chat gpt3-finnish", PreTokenizer((r" ?[^(\s|.,!?…。，、।۔،)]+",))),
    **_family("seed-coder", PreTokenizer((_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
                                          r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",))),
    **_family("bailingmoe bailingmoe2 llada-moe",
              PreTokenizer((r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                            r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",))),
}


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer GGUF metadata describes, or None if it has none.

    Raises UnsupportedModelError for a tokenizer model or pre-tokenizer we do not build, and
    ModelFileError for inconsistent tokenizer metadata.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind in ("no_vocab", "none") or (kind is None and not tokens):
        return None
    if kind is None:
        raise ModelFileError("GGUF metadata has tokenizer.ggml.tokens but no tokenizer.ggml.model")
    builders = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe, "bert": _wordpiece, "t5": _unigram}
    if kind not in builders:
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported (supported: {', '.join(builders)}); "
            "pass token ids instead of text")
    vocab = _Vocab.from_metadata(metadata)
    backend, decoding, defaults = builders[kind](vocab, metadata)
    # Control, unknown and user-defined tokens are matched whole in the text before the model runs.
    typed = list(zip(vocab.tokens, vocab.types))
    backend.add_special_tokens([AddedToken(text, special=True, normalized=False)
                                for text, token_type in typed if token_type in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(text, special=False, normalized=False)
                        for text, token_type in typed if token_type == USER_DEFINED])

    def special_id(name: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{name}_token_id", defaults.get(name))
        return value if isinstance(value, int) and 0 <= value < len(vocab.tokens) else None

    bos_id, eos_id = special_id("bos") if defaults.get("has_bos", True) else None, special_id("eos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", defaults.get("add_bos", False)))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", defaults.get("add_eos", False)))
    set_bos_eos_processor(backend, bos_id, eos_id, add_bos, add_eos)
    eos_ids = {i for i in (special_id("eot"), special_id("eom")) if i is not None}
    eos_ids |= end_of_generation_ids(dict(enumerate(vocab.tokens)))
    template = metadata.get("tokenizer.chat_template")
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_id=eos_id, eos_token_ids=eos_ids,
                     pad_token_id=special_id("padding"), chat_template=template if isinstance(template, str) else None,
                     piece_decoding=decoding)


@dataclass
class _Vocab:
    tokens: list[str]
    types: list[int]
    scores: list[float] | None

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> _Vocab:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise ModelFileError("GGUF tokenizer.ggml.tokens is missing or not a list of strings")
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]  # as llama.cpp renames them
        if len(set(tokens)) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise ModelFileError(f"GGUF vocabulary has the token {dup!r} twice")
        types = _per_token(metadata, "token_type", len(tokens)) or [NORMAL] * len(tokens)
        scores = _per_token(metadata, "scores", len(tokens))
        types = [int(t) for t in types]
        for i, text in enumerate(tokens):  # llama.cpp's corrections by token text
            if text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
                types[i] = USER_DEFINED
            elif text in END_OF_GENERATION_TEXTS and types[i] not in (CONTROL, UNKNOWN):
                types[i] = CONTROL
        return cls(tokens, types, scores)


def _per_token(metadata: dict[str, Any], key: str, n: int) -> list | None:
    values = metadata.get(f"tokenizer.ggml.{key}")
    if values is None:
        return None
    if not isinstance(values, list) or len(values) < n:
        raise ModelFileError(f"GGUF tokenizer.ggml.{key} has {len(values) if isinstance(values, list) else 'no'} "
                             f"entries for {n} tokens")
    return values[:n]


def _byte_level_bpe(vocab: _Vocab, metadata: dict[str, Any]):
    pre_name = metadata.get("tokenizer.ggml.pre") or "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported")
    merges = metadata.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise ModelFileError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)  # as llama.cpp: the first space after the first character
        if cut < 0:
            raise ModelFileError(f"GGUF merge {merge!r} is not two tokens separated by a space")
        pairs.append((merge[:cut], merge[cut + 1:]))
    ids = {text: i for i, text in enumerate(vocab.tokens)}
    try:
        model = models.BPE(ids, pairs, ignore_merges=pre.ignore_merges, fuse_unk=False)
    except Exception as e:  # the Rust side raises a bare Exception naming the bad merge
        raise ModelFileError(f"GGUF merges do not fit the vocabulary: {e}") from e
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, PieceDecoding(byte_level=True, raw_added_tokens=True), {"add_bos": pre.add_bos,
                                                                            "has_bos": pre.has_bos}


def _sentencepiece_bpe(vocab: _Vocab, metadata: dict[str, Any]):
    if vocab.scores is None:
        raise ModelFileError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
    ids = {text: i for i, text in enumerate(vocab.tokens)}
    unk = metadata.get("tokenizer.ggml.unknown_token_id",
                       next((i for i, t in enumerate(vocab.types) if t == UNKNOWN), 0))
    unk = unk if isinstance(unk, int) and 0 <= unk < len(vocab.tokens) else None
    backend = tokenizers.Tokenizer(models.BPE(
        ids, _merges_by_score(vocab, ids), unk_token=None if unk is None else vocab.tokens[unk],
        byte_fallback=BYTE in vocab.types, fuse_unk=True))
    add_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    # The normalizer runs on each stretch of text between special tokens, so each gets the prefix.
    backend.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    decoding = PieceDecoding(byte_level=False, byte_fallback=True, strip_first_space=add_prefix,
                             raw_added_tokens=True)
    return backend, decoding, {"bos": 1, "eos": 2, "add_bos": True}


def _merges_by_score(vocab: _Vocab, ids: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the best-scoring pair": every split of a
    normal token into two tokens, best score first (ties: lower token id first)."""
    ranked = []
    for token_id, (text, token_type) in enumerate(zip(vocab.tokens, vocab.types)):
        if token_type != NORMAL or len(text) < 2:
            continue
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[token_id], token_id, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _wordpiece(vocab: _Vocab, metadata: dict[str, Any]):
    # llama.cpp's converter writes word starts as "▁word" and continuations bare; WordPiece wants
    # "word" and "##piece". Special tokens ([CLS], [UNK], ...) stay as they are.
    spelled = {}
    for i, (text, token_type) in enumerate(zip(vocab.tokens, vocab.types)):
        if token_type in (CONTROL, UNKNOWN, USER_DEFINED):
            spelled.setdefault(text, i)
        elif text.startswith("▁"):
            spelled.setdefault(text[1:], i)
        else:
            spelled.setdefault("##" + text, i)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 100)
    unk = vocab.tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(vocab.tokens) else "[UNK]"
    backend = tokenizers.Tokenizer(models.WordPiece(spelled, unk_token=unk, max_input_chars_per_word=100))
    lowercase = bool(metadata.get("tokenizer.ggml.normalizer.lowercase", True))
    strip_accents = bool(metadata.get("tokenizer.ggml.normalizer.strip_accents", lowercase))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=strip_accents, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    # llama.cpp wraps the text as [CLS] text [SEP]; BOS is [CLS] and EOS the separator.
    return backend, None, {"bos": 101, "eos": metadata.get("tokenizer.ggml.seperator_token_id", 102),
                           "add_bos": True, "add_eos": True}


def _unigram(vocab: _Vocab, metadata: dict[str, Any]):
    # what transformers' XLMRobertaConverter writes for the same SentencePiece model: the file's
    # normalisation map, whitespace split, "▁" before every word
    if vocab.scores is None:
        raise ModelFileError("GGUF unigram (t5) tokenizer has no tokenizer.ggml.scores")
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id", 2)
    backend = tokenizers.Tokenizer(models.Unigram([(t, float(s)) for t, s in zip(vocab.tokens, vocab.scores)],
                                                  unk_id=unk_id if isinstance(unk_id, int) else None))
    charsmap = metadata.get("tokenizer.ggml.precompiled_charsmap")
    if charsmap is not None and len(charsmap):
        backend.normalizer = normalizers.Precompiled(bytes(bytearray(int(b) & 0xFF for b in charsmap)))
    prepend = "always" if metadata.get("tokenizer.ggml.add_space_prefix", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend)])
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend)
    return backend, None, {"bos": 0, "eos": 2, "add_bos": True, "add_eos": True}


# ---------------------------------------------------------------------------------------------
# SentencePiece tokenizer.model -> the GGUF metadata llama.cpp's converter would write for it

def sentencepiece_metadata(path: Path, tokenizer_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """GGUF-style tokenizer metadata for a SentencePiece BPE `tokenizer.model` (plus HF added tokens).

    Raises ModelFileError if the file is not a SentencePiece model, UnsupportedModelError if it
    is a unigram one.
    """
    data = Path(path).read_bytes()
    tokens, scores, types = [], [], []
    trainer: dict[int, Any] = {}
    normalizer: dict[int, Any] = {}
    try:
        for field, value in _proto_fields(data):
            if field == 1:
                piece = dict(_proto_fields(value))
                tokens.append(piece.get(1, b"").decode("utf-8"))
                scores.append(struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0)
                types.append(piece.get(3, NORMAL))
            elif field == 2:
                trainer = dict(_proto_fields(value))
            elif field == 3:
                normalizer = dict(_proto_fields(value))
    except (ModelFileError, IndexError, KeyError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise ModelFileError(f"{path}: not a SentencePiece model ({e})") from e
    if not tokens:
        raise ModelFileError(f"{path}: not a SentencePiece model (no pieces)")
    model_type = trainer.get(3, 1)
    if model_type != 2:
        name = {1: "unigram", 3: "word", 4: "char"}.get(model_type, str(model_type))
        raise UnsupportedModelError(f"{path}: SentencePiece {name} models are not supported, only BPE")

    def signed(v: int) -> int:
        return v - (1 << 64) if v >= 1 << 63 else v

    metadata: dict[str, Any] = {"tokenizer.ggml.model": "llama",
                                "tokenizer.ggml.add_space_prefix": bool(normalizer.get(3, 1))}
    for key, field, default in (("unknown", 40, 0), ("bos", 41, 1), ("eos", 42, 2), ("padding", 43, -1)):
        value = signed(trainer.get(field, default))
        if 0 <= value < len(tokens):
            metadata[f"tokenizer.ggml.{key}_token_id"] = value
    for token_id, token in sorted(_added_tokens(tokenizer_config or {}).items()):
        content, special = token
        while len(tokens) <= token_id:  # ids past the model's pieces, as llama.cpp's converter pads them
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        tokens[token_id] = content
        types[token_id] = CONTROL if special else USER_DEFINED
    metadata.update({"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
                     "tokenizer.ggml.token_type": types})
    return metadata


def _added_tokens(config: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    """tokenizer_config.json's added_tokens_decoder as {id: (content, special)}."""
    added = {}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(token, dict) and isinstance(token.get("content"), str) and str(key).isdigit():
            added[int(key)] = (token["content"], bool(token.get("special", False)))
    return added


def _proto_fields(data: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ModelFileError(f"unexpected protobuf wire type {wire} at byte {pos}")
        if pos > len(data):
            raise ModelFileError("protobuf message is truncated")
        yield field, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
