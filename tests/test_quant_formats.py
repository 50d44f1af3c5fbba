"""GGML quant formats: bit-exact dequantization against gguf-py, sizes, errors, quantizers."""

from __future__ import annotations

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeload.errors import ModelFileError, UnsupportedModelError
from pipeload.quant import (
    dequantize,
    format_for,
    quant_type_name,
    quantize,
    row_nbytes,
    supported_qtypes,
    tensor_nbytes,
)

LEGACY_QUANTIZED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
KQUANTS = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
ALL_TYPES = [T.F32, T.F16, T.BF16, *LEGACY_QUANTIZED, *KQUANTS]

# byte offsets of the fp16 fields (scales, mins) inside one block of each type
FP16_FIELDS = {
    T.F16: [0], T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}  # fmt: skip

# types whose values come from at most one NaN-able operand per float op: their NaN payloads
# match numpy's too. In the others (d * q - m) two NaNs can meet, and which payload survives
# depends on the SIMD loop (numpy itself differs between its broadcast and contiguous loops).
SINGLE_NAN_SOURCE = {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q3_K, T.Q6_K}

# measured RMS relative error of quantize -> dequantize on the realistic weights below, with headroom
RMS_BOUND = {
    T.F32: 0.0, T.F16: 5e-4, T.BF16: 4e-3, T.Q8_0: 0.008, T.Q6_K: 0.025, T.Q5_1: 0.05, T.Q5_0: 0.055,
    T.Q5_K: 0.05, T.Q4_1: 0.10, T.Q4_0: 0.11, T.Q4_K: 0.09, T.Q3_K: 0.19, T.Q2_K: 0.36,
}  # fmt: skip


def _block(qtype) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[qtype]


def _random_blocks(qtype, n_blocks: int, seed: int, finite_scales: bool) -> np.ndarray:
    """Random uint8 [n_blocks, type_size]; with finite_scales every fp16 field holds a finite value."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n_blocks, _block(qtype)[1]), dtype=np.uint8)
    if finite_scales:
        for offset in FP16_FIELDS.get(qtype, []):
            field = raw[:, offset : offset + 2].copy().view(np.uint16)  # (n, 1)
            field = np.where((field & 0x7C00) == 0x7C00, field ^ 0x4000, field)  # Inf/NaN -> finite
            raw[:, offset : offset + 2] = field.astype(np.uint16).view(np.uint8)
    return raw


def _reference(raw: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's float32 dequantization of packed bytes, flat."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Inf * 0 in random scales
        return gguf.quants.dequantize(raw, qtype).reshape(-1)


def _ours(raw: np.ndarray, qtype, **kwargs) -> np.ndarray:
    block_size = _block(qtype)[0]
    n_values = raw.shape[0] * raw.shape[1] // _block(qtype)[1] * block_size
    return dequantize(torch.from_numpy(raw.copy()), qtype, (n_values,), **kwargs).numpy()


def _bits_equal(ours: np.ndarray, ref: np.ndarray) -> bool:
    return ours.shape == ref.shape and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def _bits_equal_nan_aware(ours: np.ndarray, ref: np.ndarray) -> bool:
    """Same NaN positions, identical bits everywhere else."""
    nan = np.isnan(ref)
    return np.array_equal(np.isnan(ours), nan) and _bits_equal(ours[~nan], ref[~nan])


def _realistic_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float32 [rows, cols] like a trained matrix: gaussian, per-row scales, a few outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.02
    x *= torch.exp(torch.randn(rows, 1, generator=g) * 0.5)  # rows differ in scale
    outliers = torch.rand(rows, cols, generator=g) < 0.002
    return torch.where(outliers, x * 8, x)


def _rms_rel(approx: torch.Tensor, x: torch.Tensor) -> float:
    return ((approx - x).square().mean() / x.square().mean()).sqrt().item()


# ---------------------------------------------------------------------------------------------
# registry, sizes, names, errors


def test_registry_covers_the_supported_types():
    assert set(supported_qtypes()) == set(ALL_TYPES)
    for qtype in ALL_TYPES:
        fmt = format_for(qtype)
        assert (fmt.qtype, fmt.block_size, fmt.type_size) == (qtype, *_block(qtype))


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_sizes_match_gguf(qtype):
    block_size, type_size = _block(qtype)
    cols = block_size * 6
    assert row_nbytes(qtype, cols) == 6 * type_size
    assert row_nbytes(int(qtype), cols) == 6 * type_size
    shape = (3, 5, cols)
    assert tensor_nbytes(qtype, shape) == int(np.prod(gguf.quant_shape_to_byte_shape(shape, qtype)))


def test_names():
    assert quant_type_name(T.Q4_K) == "Q4_K"
    assert quant_type_name(12) == "Q4_K"
    assert quant_type_name(999) == "unknown type 999"


def test_unsupported_type_is_named():
    data = torch.zeros(66, dtype=torch.uint8)
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        dequantize(data, T.IQ2_XXS, (256,))
    with pytest.raises(UnsupportedModelError, match="unknown type 999"):
        dequantize(data, 999, (256,))
    with pytest.raises(UnsupportedModelError, match="IQ2_XXS"):
        quantize(torch.zeros(1, 256), T.IQ2_XXS)


def test_bad_row_length_and_byte_count():
    with pytest.raises(ModelFileError, match="not a multiple of the Q4_K block size 256"):
        row_nbytes(T.Q4_K, 100)
    with pytest.raises(ModelFileError, match="block size 32"):
        dequantize(torch.zeros(18 * 4, dtype=torch.uint8), T.Q4_0, (4, 33))
    with pytest.raises(ModelFileError, match="needs 36 bytes, got 35"):
        dequantize(torch.zeros(35, dtype=torch.uint8), T.Q4_0, (64,))
    with pytest.raises(UnsupportedModelError, match="not a multiple of its block size 256"):
        quantize(torch.zeros(2, 100), T.Q4_K)
    bad = torch.zeros(2, 256)
    bad[1, 5] = float("nan")
    with pytest.raises(ModelFileError, match="Q4_K: the tensor holds non-finite values \\(nan\\)"):
        quantize(bad, T.Q4_K)
    assert quantize(bad, T.F16).shape == (2, 512)  # float types store NaN as they are


# ---------------------------------------------------------------------------------------------
# dequantization: bit for bit with gguf-py


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_bits_equal_gguf_with_finite_scales(qtype):
    n_blocks = 4096 if _block(qtype)[0] == 1 else 600
    raw = _random_blocks(qtype, n_blocks, seed=int(qtype), finite_scales=True)
    ref = _reference(raw, qtype)
    if qtype not in (T.F32, T.BF16):  # F32/BF16 values are raw bits: NaNs there are part of the test
        assert np.isfinite(ref).all()
    assert _bits_equal(_ours(raw, qtype), ref)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_dequantize_bits_equal_gguf_with_any_bytes(qtype):
    raw = _random_blocks(qtype, 600, seed=100 + int(qtype), finite_scales=False)
    ref, ours = _reference(raw, qtype), _ours(raw, qtype)
    assert _bits_equal_nan_aware(ours, ref)
    if qtype in SINGLE_NAN_SOURCE:
        assert _bits_equal(ours, ref)


@pytest.mark.parametrize("qtype", [t for t in ALL_TYPES if t not in (T.F32,)])
def test_dequantize_bits_equal_gguf_on_realistic_blocks(qtype):
    x = _realistic_weights(8, 1024, seed=int(qtype))
    packed = quantize(x, qtype).numpy()  # (8, row bytes)
    ref = _reference(packed, qtype)
    assert np.isfinite(ref).all()
    assert _bits_equal(_ours(packed, qtype), ref)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ALL_TYPES), st.data())
def test_dequantize_any_block_property(qtype, data):
    type_size = _block(qtype)[1]
    n_blocks = data.draw(st.integers(1, 4))
    n_bytes = n_blocks * type_size
    raw = np.frombuffer(data.draw(st.binary(min_size=n_bytes, max_size=n_bytes)), np.uint8)
    raw = raw.reshape(n_blocks, type_size)
    assert _bits_equal_nan_aware(_ours(raw, qtype), _reference(raw, qtype))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q8_0, T.F16, T.BF16])
def test_dequantize_shapes_dtypes_and_buffers(qtype):
    block_size, type_size = _block(qtype)
    shape = (2, 3, 2 * max(block_size, 32))
    n_bytes = tensor_nbytes(qtype, shape)
    raw = _random_blocks(qtype, n_bytes // type_size, seed=7, finite_scales=True)
    ref = torch.from_numpy(_reference(raw, qtype)).view(shape)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # bitwise: random F32/BF16 bits hold NaNs
        int_type = torch.int32 if a.dtype == torch.float32 else torch.int16
        return a.dtype == b.dtype and torch.equal(a.view(int_type), b.view(int_type))

    flat = torch.from_numpy(raw.copy()).view(-1)
    ours = dequantize(flat, qtype, shape)
    assert ours.shape == shape and ours.dtype == torch.float32
    assert same(ours, ref)
    # 2-D bytes, one row per tensor row
    assert same(dequantize(flat.view(6, -1), qtype, shape), ours)
    # bytes at an odd address (e.g. a tensor inside an mmapped file)
    shifted = torch.empty(n_bytes + 1, dtype=torch.uint8)
    shifted[1:] = flat
    assert same(dequantize(shifted[1:], qtype, shape), ours)
    # bfloat16 output is the float32 result rounded once
    assert same(dequantize(flat, qtype, shape, out_dtype=torch.bfloat16), ref.to(torch.bfloat16))
    # into a caller's buffer; the result never aliases the input bytes
    out = torch.full(shape, 7.0)
    assert dequantize(flat, qtype, shape, out=out) is out
    assert same(out, ours)
    before = ours.clone()
    flat.zero_()
    assert same(ours, before)


def test_dequantize_crosses_chunk_boundaries(monkeypatch):
    import pipeload.quant.formats as formats

    monkeypatch.setattr(formats, "_DEQUANT_CHUNK_VALUES", 3 * 256)  # 3 blocks per chunk, 10 blocks
    raw = _random_blocks(T.Q4_K, 10, seed=3, finite_scales=True)
    assert _bits_equal(_ours(raw, T.Q4_K), _reference(raw, T.Q4_K))
    ours = dequantize(torch.from_numpy(raw.copy()), T.Q4_K, (10 * 256,), out_dtype=torch.bfloat16)
    ref = torch.from_numpy(_reference(raw, T.Q4_K)).to(torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))


# ---------------------------------------------------------------------------------------------
# quantization


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, *LEGACY_QUANTIZED])
def test_quantize_equals_gguf_where_gguf_quantizes(qtype):
    x = _realistic_weights(16, 512, seed=5)
    x[0, :8] = torch.tensor([0.0, -0.0, 1e-30, -1e-8, 3e38, -7e4, 1.0, 0.5])  # zeros, tiny, huge
    x[1] = 0.0  # an all-zero row
    x[2, :32] = 0.125  # a constant block
    ref = gguf.quants.quantize(x.numpy(), qtype)
    ref = np.ascontiguousarray(ref).view(np.uint8).reshape(16, -1)
    ours = quantize(x, qtype)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (16, row_nbytes(qtype, 512))
    assert np.array_equal(ours.numpy(), ref)


def test_quantize_bf16_special_values_equal_gguf():
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 1e-40, 3.3895314e38, 1.00390625])
    bits = torch.tensor([0x7F800001, 0xFF812345, 0x7FFFFFFF], dtype=torch.int64).to(torch.int32)
    bits = bits.view(torch.float32)
    x = torch.cat([special, bits]).view(1, -1)  # includes signalling and negative NaNs
    ref = np.ascontiguousarray(gguf.quants.quantize(x.numpy(), T.BF16)).view(np.uint8).reshape(1, -1)
    assert np.array_equal(quantize(x, T.BF16).numpy(), ref)


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_quantize_round_trip_error(qtype):
    x = _realistic_weights(32, 1024, seed=11)
    packed = quantize(x, qtype)
    assert tuple(packed.shape) == (32, row_nbytes(qtype, 1024))
    back = torch.from_numpy(_reference(packed.numpy(), qtype)).view(32, 1024)  # gguf-py reads our bytes
    err = _rms_rel(back, x)
    assert err <= RMS_BOUND[qtype], f"{qtype.name}: RMS relative error {err:.4f}"


def test_kquant_errors_order_by_bits():
    x = _realistic_weights(32, 1024, seed=13)
    errs = {q: _rms_rel(dequantize(quantize(x, q), q, x.shape), x) for q in [*KQUANTS, T.Q4_0, T.Q8_0]}
    assert errs[T.Q2_K] > errs[T.Q3_K] > errs[T.Q4_K] > errs[T.Q5_K] > errs[T.Q6_K] > errs[T.Q8_0]
    assert errs[T.Q4_K] < errs[T.Q4_0]  # same 4.5 bits per weight, better fit


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_edge_blocks(qtype):
    rows = [
        torch.zeros(256),
        torch.full((256,), 0.5),
        torch.full((256,), -0.5),
        torch.full((256,), 1e-20),  # below fp16 range: becomes zeros
        torch.linspace(0, 1, 256),  # all positive
        torch.linspace(-3, -1, 256),  # all negative
        torch.where(torch.arange(256) == 17, 100.0, 0.01),  # one outlier
        torch.randn(256, generator=torch.Generator().manual_seed(1)) * 1000,  # large values
    ]
    x = torch.stack(rows)  # (8, 256)
    back = torch.from_numpy(_reference(quantize(x, qtype).numpy(), qtype)).view(8, 256)
    assert torch.isfinite(back).all()
    assert torch.equal(back[0], torch.zeros(256))
    assert back[3].abs().max() <= 1e-6
    bound = {T.Q2_K: 0.5, T.Q3_K: 0.3}.get(qtype, 0.12)
    for i in [1, 2, 4, 5, 7]:
        assert _rms_rel(back[i], x[i]) < bound, (qtype.name, i)
    assert abs(back[6, 17].item() - 100.0) < 100.0 * bound


def test_quantize_accepts_vectors_and_batches():
    x = _realistic_weights(4, 512, seed=2)
    packed = quantize(x, T.Q6_K)
    assert torch.equal(quantize(x[1], T.Q6_K).view(-1), packed[1])
    assert torch.equal(quantize(x.view(2, 2, 512), T.Q6_K), packed)


# ---------------------------------------------------------------------------------------------
# against llama.cpp's own C quantizers (only where llama-cpp-python, which bundles ggml, is installed)


def _ggml_quantize(x: np.ndarray, qtype) -> np.ndarray:
    """uint8 [rows, row bytes] from ggml's ggml_quantize_chunk (reference quantizers, no imatrix)."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp")
    lib_path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(lib_path):
        pytest.skip(f"no ggml library at {lib_path}")
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_nbytes(qtype, cols)), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return out


@pytest.mark.parametrize("qtype", [*KQUANTS, *LEGACY_QUANTIZED])
def test_quantizers_match_llama_cpp(qtype):
    x = _realistic_weights(32, 1024, seed=17)
    ref = torch.from_numpy(_ggml_quantize(x.numpy(), qtype))
    ours = quantize(x, qtype)
    if qtype in LEGACY_QUANTIZED:
        assert torch.equal(ours, ref)  # gguf-py's quantizers are bit-exact with ggml's
        return
    err_ours = _rms_rel(dequantize(ours, qtype, x.shape), x)
    err_ref = _rms_rel(dequantize(ref, qtype, x.shape), x)
    # same algorithm, vectorised: most bytes agree; Q3_K fits scales differently (about 1% worse)
    assert err_ours <= err_ref * (1.03 if qtype == T.Q3_K else 1.005), (err_ours, err_ref)
    assert (ours == ref).double().mean() > (0.6 if qtype == T.Q3_K else 0.95)
