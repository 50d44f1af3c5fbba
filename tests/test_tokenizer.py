"""Tokenizers: HF folders and GGUF metadata, checked token for token against transformers,
sentencepiece and llama.cpp's documented behaviour; the streaming detokenizer against decode().

Every tokenizer here is trained in the test (no hub access): a byte-level BPE with the `tokenizers`
trainer and a SentencePiece BPE with the `sentencepiece` trainer, on Python stdlib sources plus
some multilingual lines.
"""

from __future__ import annotations

import functools
import io
import json
import random
import sysconfig
from pathlib import Path

import gguf
import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from pipeload.errors import ModelFileError, UnsupportedModelError
from pipeload.weights.gguf import read_gguf
from pipeload.tokenizer.from_gguf import PRE_TOKENIZERS, sentencepiece_metadata, tokenizer_from_gguf
from pipeload.tokenizer.tokenizer import PieceDecoding, Tokenizer, load_hf_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
MULTILINGUAL = [
    "日本語のテキストです。東京は大きい都市です。", "中文文本测试，你好世界！", "한국어 텍스트 안녕하세요",
    "Emoji 😀🎉👍🏽 and café naïve résumé", "Ünïcödé ßtraße Ελληνικά русский текст", "مرحبا بالعالم",
]
BPE_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello world", "def f(x):\n    return x * 2  # double\n", "    indented\n\n\n  trailing   \n",
    "tabs\tand\r\nwindows line ends", "numbers 1234567 3.14159 -42 1e10 ٣٤٥", "日本語のテキストです。中文文本测试",
    "emoji 😀🎉👍🏽 and ZWJ 👨‍👩‍👧", "café naïve résumé Ünïcödé ßtraße Ελληνικά русский",
    "don't I'LL we've THEY'RE it's", "x=[1,2,3]; y={'a': (4, 5)} !== <= >>>", "", " ", "\n", "a" * 40,
    "mixed 中文 and English 123 😀", "  two leading spaces", "trailing spaces   ", "\u00a0nbsp\u2003em space",
]
SPECIAL_TEXTS = ["<|eot_id|>special<|end_of_text|> tokens <|begin_of_text|>", "<|im_start|>user\nhi<|im_end|>\n"]


def _source_chunks() -> list[str]:
    source = (STDLIB / "textwrap.py").read_text(encoding="utf-8")  # not in the training files
    return [source[i:i + 240] for i in range(0, 4800, 240)]


@functools.cache
def training_lines() -> tuple[str, ...]:
    lines = []
    for name in ("argparse.py", "ast.py", "base64.py", "calendar.py", "csv.py", "dataclasses.py"):
        lines += (STDLIB / name).read_text(encoding="utf-8").splitlines()
    return tuple([line for line in lines if line.strip()] + MULTILINGUAL * 40)


@functools.cache
def byte_bpe() -> tokenizers.Tokenizer:
    """A Llama-3-style byte-level BPE (2000 tokens)."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=BPE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_lines(), trainer)
    return tok


@functools.cache
def sp_model() -> bytes:
    """A Llama-2-style SentencePiece BPE: byte fallback, identity normalization, split digits."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_writer=out, vocab_size=1200, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        character_coverage=0.9995, minloglevel=2, max_sentence_length=4000)
    return out.getvalue()


def write_gguf(path: Path, tokenizer_kv: dict) -> dict:
    """Write a tiny valid llama GGUF with the given tokenizer keys; return its metadata as pipeload reads it."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    for key, value in tokenizer_kv.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokenizer_kv["token_list"]), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf(path).metadata


def byte_bpe_gguf_kv(pre: str) -> dict:
    data = json.loads(byte_bpe().to_str())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    types = [3 if t in BPE_SPECIALS else 1 for t in tokens]
    return {"tokenizer_model": "gpt2", "tokenizer_pre": pre, "token_list": tokens, "token_types": types,
            "token_merges": [" ".join(m) for m in data["model"]["merges"]], "bos_token_id": 0, "eos_token_id": 1,
            "add_bos_token": True}


def sp_gguf_kv() -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model())
    n = sp.get_piece_size()
    user_defined = {"<|im_start|>", "<|im_end|>"}
    types = [4 if sp.id_to_piece(i) in user_defined else 2 if sp.is_unknown(i) else 3 if sp.is_control(i)
             else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1 for i in range(n)]
    return {"tokenizer_model": "llama", "token_list": [sp.id_to_piece(i) for i in range(n)],
            "token_scores": [sp.get_score(i) for i in range(n)], "token_types": types,
            "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "add_bos_token": True}


def hf_gguf_tokenizer(path: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# ---- GGUF byte-level BPE vs transformers ------------------------------------------------------

@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "gpt-2"])
def test_gguf_byte_level_bpe_matches_transformers(tmp_path, pre):
    path = tmp_path / "bpe.gguf"
    ours = tokenizer_from_gguf(write_gguf(path, byte_bpe_gguf_kv(pre)))
    theirs = hf_gguf_tokenizer(path)
    for text in TEXTS + SPECIAL_TEXTS + MULTILINGUAL + _source_chunks():
        ids = ours.encode(text)
        assert ids == theirs.encode(text), (pre, text)
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == theirs.vocab_size  # (len(theirs) counts an <|endoftext|> GPT2Tokenizer adds)
    assert (ours.bos_token, ours.eos_token, ours.add_bos_token) == ("<|begin_of_text|>", "<|end_of_text|>", True)
    # <|eot_id|> / <|im_end|> end generation too, as in llama.cpp
    assert ours.eos_token_ids == {1, 2, 4}


def test_gguf_pre_tokenizer_regexes_follow_llama_cpp():
    def split(pre: str, text: str) -> list[str]:
        ours = tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                                    "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []})
        return [piece for piece, _ in ours.backend.pre_tokenizer.pre_tokenize_str(text)]

    # "default" isolates punctuation runs and cuts digit runs in threes; transformers would use GPT-2's regex.
    assert split("default", "x=1234567;") == ["x", "=", "123", "456", "7", ";"]
    assert split("gpt-2", "x=1234567;") == ["x", "=", "1234567", ";"]
    assert split("starcoder", "ab 123") == ["ab", "Ġ", "1", "2", "3"]
    assert split("llama-bpe", "I'LL 12345") == ["I", "'LL", "Ġ", "123", "45"]
    # ASCII-only case folding of contractions, as llama.cpp (transformers' (?i:'s) also takes "'ſ")
    assert len(split("llama-bpe", "x'st")) == 3 and len(split("llama-bpe", "x'ſt")) == 2
    assert split("qwen2", "a 123") == ["a", "Ġ", "1", "2", "3"]
    assert "default" in PRE_TOKENIZERS and PRE_TOKENIZERS["llama-bpe"].ignore_merges


# ---- GGUF SentencePiece vs sentencepiece and transformers -----------------------------------

def test_gguf_sentencepiece_matches_sentencepiece_and_transformers(tmp_path):
    import sentencepiece as spm

    path = tmp_path / "sp.gguf"
    ours = tokenizer_from_gguf(write_gguf(path, sp_gguf_kv()))
    sp = spm.SentencePieceProcessor(model_proto=sp_model())
    theirs = hf_gguf_tokenizer(path)
    for text in TEXTS + MULTILINGUAL + _source_chunks():
        ids = ours.encode(text)
        assert ids == [1] + sp.encode(text), text  # sentencepiece itself: the ground truth
        assert ours.decode(ids) == sp.decode(ids[1:])
        if not text[:1].isspace():  # transformers drops the prefix space before leading whitespace
            assert ids == theirs.encode(text), text
            assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (1, 2, True)
    assert ours.encode(" hi") == [1, *sp.encode(" hi")] != theirs.encode(" hi")


def test_gguf_sentencepiece_special_tokens_follow_llama_cpp(tmp_path):
    ours = tokenizer_from_gguf(write_gguf(tmp_path / "sp.gguf", sp_gguf_kv()))
    im_start = ours.backend.token_to_id("<|im_start|>")
    # llama.cpp gives every stretch of text after a special token its own prefix space
    assert ours.encode("<|im_start|>user") == [1, im_start, *ours.encode("user", add_special_tokens=False)]
    assert ours.encode("a</s>b", add_special_tokens=False) == [*ours.encode("a", False), 2, *ours.encode("b", False)]
    assert ours.decode(ours.encode("<|im_start|>user")) == "<|im_start|> user"  # user-defined: kept
    assert ours.decode(ours.encode("hi</s>")) == "hi"  # control: skipped


def test_gguf_metadata_errors_and_absence():
    assert tokenizer_from_gguf({"general.architecture": "llama"}) is None
    assert tokenizer_from_gguf({"tokenizer.ggml.model": "no_vocab"}) is None
    with pytest.raises(UnsupportedModelError, match="'rwkv'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(UnsupportedModelError, match="'kimi-k2'"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "kimi-k2",
                             "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})
    with pytest.raises(ModelFileError, match="merges"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ModelFileError, match="twice"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "a"],
                             "tokenizer.ggml.merges": []})
    with pytest.raises(ModelFileError, match="token_type"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"],
                             "tokenizer.ggml.scores": [0.0, 0.0], "tokenizer.ggml.token_type": [1]})


def test_gguf_wordpiece_round_trips_a_bert_vocabulary():
    bert = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert.train_from_iterator(training_lines(), trainers.WordPieceTrainer(vocab_size=1500, special_tokens=specials,
                                                                          show_progress=False))
    bert.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    vocab = sorted(bert.get_vocab().items(), key=lambda kv: kv[1])
    # llama.cpp's converter spells word starts "▁word" and continuations bare
    tokens = [t if t in specials else t[2:] if t.startswith("##") else "▁" + t for t, _ in vocab]
    ours = tokenizer_from_gguf({
        "tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in specials else 1 for t, _ in vocab],
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.seperator_token_id": 3, "tokenizer.ggml.unknown_token_id": 1})
    for text in TEXTS + MULTILINGUAL:
        assert ours.encode(text) == bert.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == bert.decode(bert.encode(text).ids)


# ---- Hugging Face folders ---------------------------------------------------------------------

def test_hf_folder_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    with_bos().save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True},
        "chat_template": "unused: chat_template.jinja wins"}))
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    ours = load_hf_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS + SPECIAL_TEXTS + _source_chunks():
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    assert (ours.bos_token_id, ours.eos_token_id, ours.add_bos_token) == (0, 1, True)
    assert ours.eos_token_ids == {1, 2, 4}  # generation_config's list, plus <|im_end|> by name
    assert ours.chat_template == template
    messages = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.encode_chat(messages) == ours.encode("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False)


def with_bos() -> tokenizers.Tokenizer:
    """byte_bpe() with a Llama-3-style post-processor that adds <|begin_of_text|>."""
    backend = tokenizers.Tokenizer.from_str(byte_bpe().to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    return backend


def test_hf_folder_special_tokens_map_add_bos_flag_and_chat_template_json(tmp_path):
    with_bos().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                  "eos_token": "<|eot_id|>"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.add_bos_token and tok.encode("x")[0] == 0 and tok.encode("x", add_special_tokens=False)[0] != 0
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_ids == {1, 2, 4}  # + <|end_of_text|>, <|im_end|> by name
    assert tok.apply_chat_template([{"role": "user", "content": "yo"}]) == "yo"
    # an explicit add_bos_token / add_eos_token in tokenizer_config.json overrides tokenizer.json's post-processor
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True,
                                                                "eos_token": "<|end_of_text|>"}))
    tok = load_hf_tokenizer(tmp_path)
    assert not tok.add_bos_token and tok.add_eos_token
    assert tok.encode("x") == [*tok.encode("x", add_special_tokens=False), 1]


def test_hf_folder_with_only_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    (tmp_path / "tokenizer.model").write_bytes(sp_model())
    tok = load_hf_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=sp_model())
    for text in TEXTS + MULTILINGUAL + _source_chunks():
        assert tok.encode(text) == [1] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
    assert (tok.bos_token, tok.eos_token, tok.chat_template) == ("<s>", "</s>", None)
    assert tok.vocab_size == sp.get_piece_size()
    # tokenizer_config.json's added tokens join the vocabulary and are matched whole
    n = sp.get_piece_size()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(n): {"content": "<tool>", "special": True}, "1": {"content": "<s>", "special": True}}}))
    tok = load_hf_tokenizer(tmp_path)
    assert tok.vocab_size == n + 1 and tok.encode("<tool>hi")[:2] == [1, n]
    assert tok.decode(tok.encode("<tool>hi")) == "hi"


def test_hf_folder_without_tokenizer_and_corrupt_files(tmp_path):
    assert load_hf_tokenizer(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert load_hf_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello")  # a piece message cut short
    with pytest.raises(ModelFileError, match="tokenizer.model"):
        sentencepiece_metadata(tmp_path / "tokenizer.model")


# ---- streaming detokenizer ----------------------------------------------------------------

@functools.cache
def all_tokenizers() -> dict[str, Tokenizer]:
    data = json.loads(byte_bpe().to_str())
    tokens = sorted(data["model"]["vocab"], key=data["model"]["vocab"].get)
    gguf_bpe = tokenizer_from_gguf({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in BPE_SPECIALS else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) for m in data["model"]["merges"]], "tokenizer.ggml.bos_token_id": 0})
    kv = sp_gguf_kv()
    gguf_sp = tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": kv["token_list"],
                                   "tokenizer.ggml.scores": kv["token_scores"],
                                   "tokenizer.ggml.token_type": kv["token_types"]})
    hf_bpe = Tokenizer(tokenizers.Tokenizer.from_str(byte_bpe().to_str()))
    hf_sp = Tokenizer(tokenizers.Tokenizer.from_str(gguf_sp.backend.to_str()))  # a Llama-2-style tokenizer.json
    hf_sp_metaspace = Tokenizer(tokenizers.Tokenizer.from_str(gguf_sp.backend.to_str()))
    hf_sp_metaspace.backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    hf_sp_metaspace = Tokenizer(hf_sp_metaspace.backend)
    bert = tokenizers.Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "##s": 2, "world": 3, ".": 4, "##ing": 5},
                                                 unk_token="[UNK]"))
    bert.decoder = decoders.WordPiece()
    return {"gguf_bpe": gguf_bpe, "gguf_sp": gguf_sp, "hf_bpe": hf_bpe, "hf_sp": hf_sp,
            "hf_sp_metaspace": hf_sp_metaspace, "wordpiece": Tokenizer(bert)}


def test_piece_decoding_is_recognised_from_tokenizer_json_decoders():
    toks = all_tokenizers()
    assert toks["hf_bpe"].piece_decoding == PieceDecoding(byte_level=True)
    assert toks["hf_sp"].piece_decoding == PieceDecoding(byte_level=False, byte_fallback=True, strip_first_space=True)
    assert toks["hf_sp_metaspace"].piece_decoding == PieceDecoding(byte_level=False, strip_first_space=True)
    assert toks["wordpiece"].piece_decoding is None
    assert toks["gguf_sp"].token_bytes(toks["gguf_sp"].backend.token_to_id("<0x0A>")) == b"\n"


def stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = tok.detokenizer(skip_special_tokens)
    deltas = [detok.add(i) for i in ids] + [detok.finish()]
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("name", ["gguf_bpe", "gguf_sp", "hf_bpe", "hf_sp"])
def test_streaming_real_text_never_splits_characters(name):
    tok = all_tokenizers()[name]
    for text in TEXTS + MULTILINGUAL + _source_chunks() + ["<|im_start|>user\n😀 日本<|im_end|>"]:
        ids = tok.encode(text)
        for skip in (True, False):
            deltas = stream(tok, ids, skip)
            assert "".join(deltas) == tok.decode(ids, skip)
            assert tok.decode(ids, skip) == tok.backend.decode(ids, skip_special_tokens=skip)  # replay == decoder
            assert not any("\ufffd" in d for d in deltas), (text, deltas)
    assert tok.piece_decoding is not None  # these decode byte by byte


def test_streaming_sentencepiece_leading_space_matches_whole_decode():
    tok = all_tokenizers()["gguf_sp"]
    ids = tok.encode("Hello world")
    assert tok.decode(ids) == "Hello world" == "".join(stream(tok, ids))
    assert "".join(stream(tok, ids[1:])) == "Hello world"  # without BOS
    assert "".join(stream(tok, ids, skip_special_tokens=False)) == "<s> Hello world"  # as llama.cpp and HF


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_streaming_random_ids_concatenate_to_decode(data):
    name = data.draw(st.sampled_from(sorted(all_tokenizers())))
    tok = all_tokenizers()[name]
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip)


def test_streaming_random_ids_many_seeds():
    rng = random.Random(0)
    for name, tok in all_tokenizers().items():
        for _ in range(200):
            ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
            assert "".join(stream(tok, ids)) == tok.decode(ids), (name, ids)


def test_byte_decode_matches_tokenizers_on_random_byte_level_ids():
    tok = all_tokenizers()["hf_bpe"]
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 20))]
        assert tok.decode(ids, False) == tok.backend.decode(ids, skip_special_tokens=False), ids


def test_hf_folder_exported_to_gguf_metadata_tokenizes_the_same(tmp_path):
    from pipeload.weights.gguf_export import hf_tokenizer_metadata

    with_bos().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|end_of_text|>"}))
    hf = load_hf_tokenizer(tmp_path)
    from_gguf = tokenizer_from_gguf(hf_tokenizer_metadata(tmp_path, hf.vocab_size))
    for text in TEXTS + SPECIAL_TEXTS + MULTILINGUAL + _source_chunks():
        assert from_gguf.encode(text) == hf.encode(text), text
        assert from_gguf.decode(hf.encode(text), False) == hf.decode(hf.encode(text), False)
    assert (from_gguf.bos_token_id, from_gguf.eos_token_ids) == (hf.bos_token_id, hf.eos_token_ids)
