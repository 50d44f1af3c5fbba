"""Text <-> token ids: the `Tokenizer` the runtime uses, and loading it from a Hugging Face folder.

A `Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library does the encoding) and adds what
generation needs: BOS, the set of ids that end generation, the chat template, and a streaming
detokenizer. GGUF files build the same class in `from_gguf.py`.

Decoding is replayed byte by byte when the decoder is one we know (GPT-2 byte-level BPE, or
SentencePiece's "▁" pieces with byte fallback): every token maps to a fixed byte string, the text is
those bytes decoded as UTF-8 (bad bytes become U+FFFD), and a streaming detokenizer is an
incremental UTF-8 decoder over the same bytes, so the concatenated deltas equal `decode(all_ids)`
by construction. Other decoders (WordPiece, ...) fall back to diffing `tokenizers` decodes.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import tokenizers
from tokenizers import processors

from ..errors import ModelFileError

# Token texts that end generation wherever they appear in a vocabulary, as llama.cpp decides it
# (src/llama-vocab.cpp, "special_eog_ids"), including its end-of-turn and FIM-separator tokens.
END_OF_GENERATION_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "</s>",
})


def end_of_generation_ids(texts: dict[int, str]) -> set[int]:
    """Ids among `texts` (id -> token text) that end generation by name, with llama.cpp's two exceptions."""
    ids = {i for i, text in texts.items() if text in END_OF_GENERATION_TEXTS}
    present = {texts[i]: i for i in ids}
    # gpt-oss and solar-open end turns with <|return|> / <|call|> / <|flush|>; <|end|> only ends a message.
    calls = "<|call|>" in present or "<|calls|>" in present
    if "<|end|>" in present and calls and ("<|return|>" in present or "<|flush|>" in present):
        ids.discard(present["<|end|>"])
    # Gemma 4 writes </s> inside tool responses.
    if "<|tool_response>" in present and "</s>" in present:
        ids.discard(present["</s>"])
    return ids


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {char: byte for byte, char in gpt2_byte_alphabet().items()}


@dataclass(frozen=True)
class PieceDecoding:
    """A decoder we can replay token by token: how one token's text becomes bytes."""

    byte_level: bool  # pieces are written in the GPT-2 byte alphabet; else SentencePiece "▁" pieces
    byte_fallback: bool = False  # SentencePiece: a "<0x0A>" piece is that single byte
    strip_first_space: bool = False  # SentencePiece: drop one leading space of the whole text
    raw_added_tokens: bool = False  # added tokens are plain text (llama.cpp), not decoded like pieces


def piece_decoding_of(backend: tokenizers.Tokenizer) -> PieceDecoding | None:
    """The byte-replayable form of `backend`'s decoder, or None if it is another kind."""
    if backend.decoder is None:
        return None
    spec = json.loads(backend.decoder.__getstate__())
    steps = spec["decoders"] if spec.get("type") == "Sequence" else [spec]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return PieceDecoding(byte_level=True)
    metaspace = byte_fallback = fused = strip = False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace" and step.get("pattern") == {"String": "▁"} and step.get("content") == " ":
            metaspace = True
        elif kind == "Metaspace" and step.get("replacement") == "▁" and not (fused or byte_fallback):
            metaspace = True
            strip = step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
        elif kind == "ByteFallback" and not fused:
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and step.get("content") == " " and step.get("stop") == 0 and step.get("start") in (0, 1):
            if step["start"] and not fused:
                return None  # strips every token, not the text
            strip = strip or step["start"] == 1
        else:
            return None
    if not metaspace:
        return None
    return PieceDecoding(byte_level=False, byte_fallback=byte_fallback, strip_first_space=strip)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, chat template and decoding rules of a model."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        pad_token_id: int | None = None,
        chat_template: str | None = None,
        piece_decoding: PieceDecoding | None | str = "auto",
    ):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = frozenset(eos_token_ids) | ({eos_token_id} if eos_token_id is not None else set())
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template or None
        self.piece_decoding = piece_decoding_of(backend) if piece_decoding == "auto" else piece_decoding
        added = backend.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, token in added.items() if token.special)
        self._added_ids = frozenset(added)
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos_token = bos_token_id is not None and probe[:1] == [bos_token_id]
        self.add_eos_token = eos_token_id is not None and probe[int(self.add_bos_token):][-1:] == [eos_token_id]
        self._piece_cache: dict[int, bytes] = {}

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"eos_token_ids={sorted(self.eos_token_ids)}, chat_template={self.chat_template is not None})")

    @property
    def bos_token(self) -> str | None:
        """The BOS token's text, or None if the model has none."""
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        """The main EOS token's text, or None if the model has none."""
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; BOS (and EOS) are added when the model wants them and add_special_tokens."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`; special tokens (BOS, EOS, <|im_end|>, ...) are left out if skip_special_tokens."""
        ids = [int(i) for i in ids]
        if self.piece_decoding is None:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        data = b"".join(self.token_bytes(i) for i in ids if not (skip_special_tokens and i in self.special_token_ids))
        if self.piece_decoding.strip_first_space and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def detokenizer(self, skip_special_tokens: bool = True) -> StreamingDetokenizer:
        """A fresh streaming detokenizer: feed ids with `add`, then call `finish`."""
        return StreamingDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for `messages`; raises NoChatTemplateError / ChatTemplateError (tokenizer/chat.py)."""
        from .chat import render_chat_template

        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of the chat prompt; adds no BOS of its own, since templates write it (as HF does)."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        return self.encode(prompt, add_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (before any leading-space strip); raises ValueError for unknown ids."""
        cached = self._piece_cache.get(token_id)
        if cached is not None:
            return cached
        text = self.backend.id_to_token(token_id)
        if text is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size} tokens")
        rule = self.piece_decoding
        if rule is None:
            data = self.backend.decode([token_id], skip_special_tokens=False).encode("utf-8")
        elif rule.raw_added_tokens and token_id in self._added_ids:
            data = text.encode("utf-8")
        elif rule.byte_level:
            data = b"".join(bytes([_CHAR_TO_BYTE[c]]) if c in _CHAR_TO_BYTE else c.encode("utf-8") for c in text)
        elif rule.byte_fallback and (match := _BYTE_TOKEN.fullmatch(text)):
            data = bytes([int(match.group(1), 16)])
        else:
            data = text.replace("▁", " ").encode("utf-8")
        self._piece_cache[token_id] = data
        return data


class StreamingDetokenizer:
    """Turns token ids, fed one at a time, into the text each one makes final.

    Text is held back while it ends in an incomplete UTF-8 character; `finish` returns what is left.
    The concatenation of every `add` and the final `finish` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._parts: list[str] = []  # everything returned so far
        self._rule = tokenizer.piece_decoding
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._started = False
        self._ids: list[int] = []  # only used without a piece decoding
        self._prefix = self._read = 0

    @property
    def text(self) -> str:
        """All text returned so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """The text that became final with `token_id` (often "", e.g. mid-character)."""
        token_id = int(token_id)
        if self._rule is None:
            delta = self._add_by_decode(token_id)
        elif self.skip_special_tokens and token_id in self.tokenizer.special_token_ids:
            delta = ""
        else:
            data = self.tokenizer.token_bytes(token_id)
            if data and not self._started:
                self._started = True
                if self._rule.strip_first_space and data.startswith(b" "):
                    data = data[1:]
            delta = self._utf8.decode(data)
        self._parts.append(delta)
        return delta

    def finish(self) -> str:
        """The held-back rest (an incomplete character at the very end becomes U+FFFD)."""
        if self._rule is None:
            decode = self.tokenizer.decode
            done = decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
            delta = decode(self._ids[self._prefix:], self.skip_special_tokens)[len(done):]
            self._prefix = self._read = len(self._ids)
        else:
            delta = self._utf8.decode(b"", final=True)
        self._parts.append(delta)
        return delta

    def _add_by_decode(self, token_id: int) -> str:
        # Decode a window starting one emission back, so decoders that join tokens (WordPiece
        # spaces, SentencePiece prefixes) see their left context; emit what grew, unless it ends
        # in U+FFFD (a character still incomplete).
        self._ids.append(token_id)
        decode = self.tokenizer.decode
        done = decode(self._ids[self._prefix:self._read], self.skip_special_tokens)
        text = decode(self._ids[self._prefix:], self.skip_special_tokens)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]


# ---------------------------------------------------------------------------------------------
# Hugging Face folders

def load_hf_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer in a Hugging Face model folder, or None if it has no tokenizer files.

    Reads tokenizer.json (or a SentencePiece tokenizer.model), tokenizer_config.json,
    special_tokens_map.json, generation_config.json and chat_template.jinja/.json.
    Raises ModelFileError if one of those files is corrupt.
    """
    folder = Path(folder)
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")
    base = None
    if (folder / "tokenizer.json").is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise ModelFileError(f"{folder / 'tokenizer.json'}: not a readable tokenizer: {e}") from e
        # Some files carry the padding/truncation their trainer used (all-MiniLM-L6-v2: pad and
        # cut every text to 128 tokens); transformers ignores them unless asked, and so do we.
        backend.no_padding()
        backend.no_truncation()
        piece_decoding = "auto"
    elif (folder / "tokenizer.model").is_file():
        from .from_gguf import sentencepiece_metadata, tokenizer_from_gguf

        base = tokenizer_from_gguf(sentencepiece_metadata(folder / "tokenizer.model", config))
        backend, piece_decoding = base.backend, base.piece_decoding
    else:
        return None

    def token_id(key: str) -> int | None:
        text = _token_text(config.get(key) or special_map.get(key))
        return None if text is None else backend.token_to_id(text)

    bos_id, eos_id, pad_id = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    if base is not None:
        bos_id = base.bos_token_id if bos_id is None else bos_id
        eos_id = base.eos_token_id if eos_id is None else eos_id
        pad_id = base.pad_token_id if pad_id is None else pad_id
    bos_id = _first_id(generation.get("bos_token_id")) if bos_id is None else bos_id
    eos_ids = set(_all_ids(generation.get("eos_token_id")))
    eos_id = _first_id(generation.get("eos_token_id")) if eos_id is None else eos_id
    pad_id = _first_id(generation.get("pad_token_id")) if pad_id is None else pad_id
    eos_ids |= set(base.eos_token_ids) if base is not None else set()
    eos_ids |= end_of_generation_ids({i: backend.id_to_token(i) for i in _special_ids(backend)})

    if "add_bos_token" in config or "add_eos_token" in config:
        set_bos_eos_processor(backend, bos_id, eos_id, bool(config.get("add_bos_token")),
                              bool(config.get("add_eos_token")))
    return Tokenizer(backend, bos_token_id=bos_id, eos_token_id=eos_id, eos_token_ids=eos_ids, pad_token_id=pad_id,
                     chat_template=_chat_template(folder, config), piece_decoding=piece_decoding)


def set_bos_eos_processor(backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None,
                          add_bos: bool, add_eos: bool) -> None:
    """Make `backend.encode(..., add_special_tokens=True)` add BOS / EOS as asked (and nothing else)."""
    add_bos, add_eos = add_bos and bos_id is not None, add_eos and eos_id is not None
    if not (add_bos or add_eos):
        backend.post_processor = None
        return
    bos, eos = backend.id_to_token(bos_id) if add_bos else None, backend.id_to_token(eos_id) if add_eos else None
    single = [*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])]
    pair = [*single, *([bos] if add_bos else []), "$B:1", *([eos] if add_eos else [])]
    specials = {(bos, bos_id)} if add_bos else set()
    specials |= {(eos, eos_id)} if add_eos else set()
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=sorted(specials))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON: {e}") from e
    except RecursionError:
        raise ModelFileError(f"{path}: JSON nested too deeply to be a tokenizer file") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _all_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _first_id(value: Any) -> int | None:
    ids = _all_ids(value)
    return ids[0] if ids else None


def _special_ids(backend: tokenizers.Tokenizer) -> list[int]:
    return [i for i, token in backend.get_added_tokens_decoder().items() if token.special]


def _chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config's (its "default" if named)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None
