"""Fuzzing the file readers with hypothesis: GGUF headers built field by field (counts, lengths,
types and shapes drawn from valid and hostile values), safetensors headers (the length prefix
and every entry's fields), and tokenizer folders (tokenizer.json, tokenizer_config.json,
generation_config.json mutated). Each must parse, or raise the clear ModelFileError /
UnsupportedModelError; never another exception, a hang, or an allocation beyond the file's size
(a length field claiming 2^60 bytes must not be believed). Bounded for CI: a few hundred files."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeload.errors import ModelFileError, UnsupportedModelError
from pipeload.weights.gguf import read_gguf
from pipeload.weights.safetensors import read_safetensors_header
from pipeload.tokenizer.tokenizer import load_hf_tokenizer

CLEAR = (ModelFileError, UnsupportedModelError)
FUZZ = settings(max_examples=int(os.environ.get("PIPELOAD_FUZZ_EXAMPLES", 150)), deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLACK = 4 << 20  # the parser's own objects: a few MiB at most, whatever the file claims


def parses_or_fails_clearly(read, path: Path):
    """read(path) under tracemalloc: its result, or None after a clear error; asserts the bound."""
    size = path.stat().st_size
    tracemalloc.start()
    try:
        return read(path)
    except CLEAR as e:
        assert str(e)
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak <= 16 * size + SLACK, f"{peak} bytes allocated reading a {size}-byte file"


# -- GGUF ---------------------------------------------------------------------------------------

HOSTILE_U64 = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32 - 1, 2**32, 2**62, 2**64 - 1]))


def _gguf_string(data, raw: bytes) -> bytes:
    n = data.draw(st.one_of(st.just(len(raw)), HOSTILE_U64), label="string length")
    return struct.pack("<Q", n) + raw


def _gguf_value(data, vtype: int, depth: int = 0) -> bytes:
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    if vtype in scalar:
        return struct.pack(scalar[vtype], 0 if vtype == 7 else 1)
    if vtype == 8:
        return _gguf_string(data, data.draw(st.binary(max_size=12)))
    etype = data.draw(st.integers(0, 13), label="element type") if depth < 6 else 0
    count = data.draw(st.one_of(st.integers(0, 4), HOSTILE_U64), label="array length")
    items = b"".join(_gguf_value(data, etype, depth + 1) for _ in range(min(count, 4)))
    return struct.pack("<IQ", etype, count) + items


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_headers(tmp_path_factory, data):
    n_kv = data.draw(st.integers(0, 4))
    n_tensors = data.draw(st.integers(0, 3))
    out = b"GGUF" + struct.pack("<I", data.draw(st.sampled_from([3, 3, 2, 1, 0x03000000])))
    out += struct.pack("<QQ", data.draw(st.one_of(st.just(n_tensors), HOSTILE_U64)),
                       data.draw(st.one_of(st.just(n_kv), HOSTILE_U64)))
    for i in range(n_kv):
        vtype = data.draw(st.integers(0, 14), label="value type")
        key = data.draw(st.sampled_from(["general.architecture", "general.alignment", f"k{i}", "llama.block_count"]))
        out += _gguf_string(data, key.encode()) + struct.pack("<I", vtype) + _gguf_value(data, vtype)
    for i in range(n_tensors):
        dims = data.draw(st.lists(st.one_of(st.integers(0, 64), HOSTILE_U64), min_size=0, max_size=6))
        out += _gguf_string(data, f"t{i}".encode()) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", data.draw(st.integers(0, 45)), data.draw(st.one_of(st.integers(0, 96), HOSTILE_U64)))
    out += bytes(data.draw(st.integers(0, 256)))
    path = tmp_path_factory.mktemp("gguf") / "x.gguf"
    path.write_bytes(out)
    g = parses_or_fails_clearly(read_gguf, path)
    if g is not None:
        assert all(t.offset + t.nbytes <= g.file_size for t in g.tensors.values())


# -- safetensors --------------------------------------------------------------------------------

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                    max_size=3), max_leaves=8)


def _safetensors_entry(data) -> object:
    valid_shape = data.draw(st.lists(st.integers(0, 6), max_size=3))
    count = 1
    for d in valid_shape:
        count *= d
    entry = {"dtype": "F32", "shape": valid_shape, "data_offsets": [0, 4 * count]}
    for field in ("dtype", "shape", "data_offsets"):
        if data.draw(st.booleans()):
            entry[field] = data.draw(ANY_JSON | st.lists(st.integers(-2**65, 2**65), max_size=3)
                                     | st.sampled_from(["F16", "BF16", "Q4", "I64"]), label=field)
    if data.draw(st.integers(0, 9)) == 0:
        del entry[data.draw(st.sampled_from(sorted(entry)))]
    return entry if data.draw(st.integers(0, 9)) else data.draw(ANY_JSON)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_headers(tmp_path_factory, data):
    header = {f"t{i}": _safetensors_entry(data) for i in range(data.draw(st.integers(0, 3)))}
    if data.draw(st.booleans()):
        header["__metadata__"] = data.draw(ANY_JSON)
    raw = json.dumps(header).encode()
    if data.draw(st.integers(0, 5)) == 0:  # not an object, or nested deeper than any parser recurses
        raw = data.draw(st.sampled_from([b"[1, 2]", b"[" * 200_000 + b"]" * 200_000, b'{"a": ' * 50_000, b"\xff\xfe"]))
    length = data.draw(st.one_of(st.just(len(raw)), HOSTILE_U64, st.integers(0, len(raw) + 8)))
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw + bytes(data.draw(st.integers(0, 128))))
    infos = parses_or_fails_clearly(read_safetensors_header, path)
    for t in (infos or {}).values():
        assert t.offset + t.nbytes <= path.stat().st_size


# -- tokenizer folders --------------------------------------------------------------------------

_BASE: dict[str, str] = {}


def _base_files(tmp_path_factory) -> dict[str, str]:
    if not _BASE:
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.train_from_iterator(["hello world, a tiny corpus", "fuzzing the tokenizer folder"] * 3,
                                trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False))
        _BASE["tokenizer.json"] = tok.to_str()
        _BASE["tokenizer_config.json"] = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                                     "chat_template": "{{ messages[0]['content'] }}"})
        _BASE["generation_config.json"] = json.dumps({"bos_token_id": 0, "eos_token_id": [1]})
    return _BASE


def _mutate(data, value, depth: int = 0):
    """`value` with some of its parts replaced by arbitrary JSON (or removed)."""
    if isinstance(value, dict) and depth < 4:
        out = {}
        for k, v in value.items():
            choice = data.draw(st.integers(0, 19), label=f"mutate {k}")
            if choice == 0:
                continue  # removed
            out[k] = data.draw(ANY_JSON) if choice == 1 else _mutate(data, v, depth + 1)
        return out
    if isinstance(value, list) and value and depth < 4:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [_mutate(data, value[i], depth + 1)] + value[i + 1:]
    return data.draw(ANY_JSON) if data.draw(st.integers(0, 9)) == 0 else value


@FUZZ
@given(data=st.data())
def test_fuzz_tokenizer_folders(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("tok")
    for name, text in _base_files(tmp_path_factory).items():
        how = data.draw(st.integers(0, 9), label=f"{name}: how")
        if how == 0:
            continue  # the file is absent
        if how == 1:
            text = text[: data.draw(st.integers(0, len(text)))]  # truncated
        elif how <= 5:
            text = json.dumps(_mutate(data, json.loads(text)))
        (folder / name).write_text(text)
    try:
        tok = load_hf_tokenizer(folder)
    except CLEAR as e:
        assert str(e)
        return
    if tok is not None:  # what loads must also work
        ids = tok.encode("hello world")
        assert isinstance(tok.decode(ids), str)
        if tok.chat_template:
            try:
                tok.apply_chat_template([{"role": "user", "content": "hi"}])
            except CLEAR:
                pass


def test_a_deeply_nested_config_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelFileError):
        load_hf_tokenizer(tmp_path)


@pytest.mark.parametrize("index", ['{"weight_map": [1, 2]}', '{"weight_map": {"a": 3}}', "[" * 50_000])
def test_a_corrupt_shard_index_is_a_clear_error(tmp_path, index):
    from pipeload.weights.safetensors import read_hf_folder

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelFileError, match="shard index"):
        read_hf_folder(tmp_path)
