"""Bad input gets a clear error naming the problem: reader, loader, generation and CLI."""

import json
import shutil
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeload import PipelineModel
from pipeload.cli import main as cli_main
from pipeload.errors import ContextLengthError, ModelFileError, PipeloadError, UnsupportedModelError
from pipeload.weights.gguf import read_gguf


def _small_gguf(path, arch="llama", tensor_type=GGMLQuantizationType.F32, extra=None):
    w = GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    w.add_string("general.name", "bad-input-test")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for k, v in (extra or {}).items():
        w.add_uint32(k, v)
    if tensor_type == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.arange(96, dtype=np.float32).reshape(3, 32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((3, 66), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reader_matches_gguf_py(tiny):
    _, _, path = tiny("qwen2")
    ours = read_gguf(path)
    ref = GGUFReader(path)
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.dtype == t.tensor_type.name
    assert ours.metadata["qwen2.block_count"] == 3
    assert ours.metadata["general.architecture"] == "qwen2"


def _expect(exc, match, fn, *args):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_missing_file(tmp_path):
    _expect(ModelFileError, "no such file", read_gguf, tmp_path / "nope.gguf")
    _expect(ModelFileError, "no such file or folder", PipelineModel.from_pretrained, tmp_path / "nope.gguf")


def test_not_a_model(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, I am not a model" * 10)
    _expect(ModelFileError, "not a GGUF file or a Hugging Face model folder", PipelineModel.from_pretrained, p)
    _expect(ModelFileError, "magic", read_gguf, p)
    d = tmp_path / "folder"
    d.mkdir()
    _expect(ModelFileError, "no config.json", PipelineModel.from_pretrained, d)


def test_bad_safetensors(tmp_path, tiny):
    _, folder, _ = tiny("llama2")
    d = tmp_path / "hf"
    shutil.copytree(folder, d)
    st_file = d / "model.safetensors"
    data = st_file.read_bytes()
    st_file.write_bytes(data[: len(data) // 2])
    _expect(ModelFileError, "truncated", PipelineModel.from_pretrained, d)
    st_file.write_bytes(struct.pack("<Q", 10) + b"not json!!" + data[100:])
    _expect(ModelFileError, "corrupt safetensors header", PipelineModel.from_pretrained, d)
    (d / "config.json").write_text("{broken")
    _expect(ModelFileError, "not valid JSON", PipelineModel.from_pretrained, d)


def test_bad_magic_and_version(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    data[:4] = b"GGML"
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "magic bytes", read_gguf, p)
    data[:4] = b"GGUF"
    data[4:8] = struct.pack("<I", 7)
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "unsupported GGUF version 7", read_gguf, p)
    data[4:8] = struct.pack(">I", 3)  # a big-endian file
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "big-endian", read_gguf, p)


def test_truncated_anywhere(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    data = p.read_bytes()
    for cut in range(0, len(data) - 1, 7):
        p.write_bytes(data[:cut])
        with pytest.raises(ModelFileError):
            read_gguf(p)


def test_tensor_data_beyond_end_of_file(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    _expect(ModelFileError, "truncated GGUF file: tensor 'token_embd.weight'", read_gguf, p)


def test_impossible_shape(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    data = bytearray(p.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)  # then: n_dims u32, dims u64...
    data[at + 4:at + 12] = struct.pack("<Q", 2**60)
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "impossible shape", read_gguf, p)
    data[at + 4:at + 12] = struct.pack("<Q", 0)
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "impossible shape", read_gguf, p)
    data[at:at + 4] = struct.pack("<I", 9)
    p.write_bytes(bytes(data))
    _expect(ModelFileError, "9 dimensions", read_gguf, p)


def test_unknown_architecture(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf", arch="mamba9")
    _expect(UnsupportedModelError, "unknown architecture 'mamba9'", PipelineModel.from_pretrained, p)


def test_unknown_hf_architecture(tmp_path, tiny):
    _, folder, _ = tiny("llama2")
    d = tmp_path / "hf"
    shutil.copytree(folder, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "falcon_mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(UnsupportedModelError, "unknown architecture 'falcon_mamba'", PipelineModel.from_pretrained, d)


def test_unsupported_quant_type(tmp_path, tiny):
    """A file whose weights use a quant type pipeload does not decode (IQ2_XXS) says so by name."""
    from pipeload.convert import convert

    _, folder, _ = tiny("llama2")
    p = tmp_path / "m.gguf"
    convert(folder, p, quant="f32")
    data = bytearray(p.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = struct.pack("<I", int(GGMLQuantizationType.IQ2_XXS))
    p.write_bytes(bytes(data))
    with pytest.raises(PipeloadError, match="IQ2_XXS"):
        PipelineModel.from_pretrained(p)


def test_missing_tensor_and_bad_metadata(tmp_path):
    p = _small_gguf(tmp_path / "m.gguf")
    with pytest.raises(ModelFileError, match="lacks|missing|not a positive integer"):
        PipelineModel.from_pretrained(p)


def test_prompt_longer_than_context(tiny):
    _, _, gguf = tiny("llama2")
    m = PipelineModel.from_pretrained(gguf)
    with pytest.raises(ContextLengthError, match="context is 256"):
        m.generate(list(range(5)) * 60, max_tokens=3)
    with pytest.raises(ContextLengthError):
        m.logits([1] * 300)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.logits([1, 2, 999])


def test_cli_errors_are_one_line(tmp_path, capsys):
    rc = cli_main(["run", str(tmp_path / "missing.gguf"), "-n", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("pipeload: error:") and "no such file" in err
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + b"\xff" * 40)
    rc = cli_main(["inspect", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "GGUF" in err


_VALID = None


def _valid_bytes(tmp_path_factory):
    global _VALID
    if _VALID is None:
        _VALID = _small_gguf(tmp_path_factory.mktemp("fuzz") / "v.gguf").read_bytes()
    return _VALID


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_header_parser(tmp_path_factory, data):
    """Random byte flips and truncations of a valid header: parsed, or a clear ModelFileError /
    UnsupportedModelError; never another exception, a hang or a huge allocation."""
    raw = bytearray(_valid_bytes(tmp_path_factory))
    header_len = raw.index(b"token_embd.weight") + 60
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, header_len))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    p = tmp_path_factory.mktemp("f") / "x.gguf"
    p.write_bytes(bytes(raw))
    try:
        read_gguf(p)
    except (ModelFileError, UnsupportedModelError) as e:
        assert str(e)


def test_folder_without_tokenizer_gives_logits_but_says_no_tokenizer(tiny):
    from pipeload.errors import NoTokenizerError

    _, folder, _ = tiny("llama2")
    assert not (folder / "tokenizer.json").exists()
    m = PipelineModel.from_pretrained(folder)
    assert m.logits([1, 2, 3]).shape == (3, 128)
    assert [r for r in m.stream([1, 2, 3], max_tokens=2)][-1].token_ids  # token ids still generate
    with pytest.raises(NoTokenizerError, match="no tokenizer"):
        m.generate("hello", max_tokens=2)
    with pytest.raises(NoTokenizerError, match="no tokenizer"):
        m.tokenizer.encode("hello")
    rc = cli_main(["run", str(folder), "-p", "hi", "-n", "2"])
    assert rc == 2


def _rewritten(src, dst, drop_key=None, halve_tensor=None):
    """A copy of the GGUF `src` without metadata key `drop_key`, or with tensor `halve_tensor`
    cut to half its rows (its shape then disagrees with the metadata)."""
    from gguf import GGUFValueType

    r = GGUFReader(src)
    w = GGUFWriter(dst, r.fields["general.architecture"].contents())
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", drop_key):
            continue
        if f.types[0] == GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), f.types[0])
    for t in r.tensors:
        data = np.array(t.data)
        if t.name == halve_tensor:
            data = data[: data.shape[0] // 2]
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("kind", ["llama2", "qwen2", "gpt2"])
def test_a_missing_key_or_a_tensor_that_disagrees_with_the_metadata_is_named(tiny, tmp_path, kind):
    src = tiny(kind)[2]
    arch = read_gguf(src).metadata["general.architecture"]
    for key in (f"{arch}.attention.head_count", f"{arch}.embedding_length", f"{arch}.block_count"):
        bad = _rewritten(src, tmp_path / "k.gguf", drop_key=key)
        _expect(ModelFileError, f"lacks '{key}'", PipelineModel.from_pretrained, bad)
    names = set(read_gguf(src).tensors)
    tensors = [t for t in ("blk.0.ffn_down.weight", "output_norm.weight", "blk.1.attn_q.bias", "blk.1.attn_qkv.weight")
               if t in names]
    assert len(tensors) >= 2
    for tensor in tensors:
        bad = _rewritten(src, tmp_path / "t.gguf", halve_tensor=tensor)
        short = tensor.split(".", 2)[-1] if tensor.startswith("blk.") else tensor
        with pytest.raises(ModelFileError, match=f"tensor '{short}' has shape .* the configuration implies"):
            PipelineModel.from_pretrained(bad).logits([1, 2, 3])
