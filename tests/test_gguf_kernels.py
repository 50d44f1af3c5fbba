"""The compiled kernels on GGUF blocks (pipeload/quant/kernels/) and quant/ops.py's contract.

Every code path this machine can run (the native build, AVX2, plain C) is checked against the
same definitions: llama.cpp's activation quantization bit for bit, the dequantizers bit for bit,
each type's product within a rounding bound of its float64 value (kernel_reference.py derives
the bound), the same bits on every path, and row exactness (M, other rows, threads).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from gguf import GGMLQuantizationType as T

from kernel_reference import QTYPES, act_format, quantize_q8_0, quantize_q8_k, random_blocks, reference
from pipeload.quant import kernels, ops

LIB = kernels.library()
needs_c = pytest.mark.skipif(LIB is None, reason=f"no compiled kernels here: {kernels.failure()}")
VARIANTS = kernels.variants() if LIB is not None else []


def _product(lib, qtype, blocks, x, threads=2, out_bf16=False, method=0):
    """y (M, N) = x @ W^T through pl_linear of one library variant (method 1: the GEMM where built)."""
    m, k = x.shape
    n = blocks.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16 if out_bf16 else torch.float32)
    desc = (ctypes.c_int64 * 6)(int(qtype), blocks.data_ptr(), blocks.stride(0), n, y.data_ptr(), n)
    code = lib.pl_linear(desc, 1, x.data_ptr(), int(x.dtype == torch.bfloat16), x.stride(0), m, k, int(out_bf16),
                         threads, method)
    assert code == 0
    return y


def _activations(m, k, seed=0):
    """Random rows with an all-zero 256-block and a tie of +a / -a for the largest magnitude."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[min(1, m - 1), :256] = 0
    x[0, 3], x[0, 10] = 7.0, -7.0
    return x


@needs_c
@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_quantization_is_llama_cpp_s(variant):
    lib = kernels.library(variant)
    x = _activations(3, 512)
    m, k = x.shape
    for fmt, code in (("q8_0", kernels.ACT_Q8_0), ("q8_1", kernels.ACT_Q8_1), ("q8_k", kernels.ACT_Q8_K)):
        block = 256 if fmt == "q8_k" else 32
        q = torch.empty(m, k, dtype=torch.int8)
        d = torch.empty(m, k // block)
        s = torch.empty(m, k // 32)
        bs = torch.empty(m, k // 16, dtype=torch.int16)
        assert lib.pl_quantize_activations(code, x.data_ptr(), m, k, q.data_ptr(), d.data_ptr(), s.data_ptr(),
                                           bs.data_ptr()) == 0
        if fmt == "q8_k":
            rq, rd, rbs = quantize_q8_k(x)
            assert torch.equal(bs, rbs)
        else:
            rq, rd, rs = quantize_q8_0(x, with_sums=fmt == "q8_1")
            if rs is not None:
                assert torch.equal(s, rs)
        assert torch.equal(q, rq) and torch.equal(d, rd), fmt


@needs_c
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_dequantize_rows_is_bit_exact(variant, qtype):
    """The kernels read the blocks as pipeload's dequantizers (bit-exact with gguf-py) do."""
    n, k = 6, 512
    blocks = random_blocks(qtype, n, k, seed=1)
    out = torch.empty(n, k)
    assert kernels.library(variant).pl_dequantize(int(qtype), blocks.data_ptr(), blocks.stride(0), n, k,
                                                  out.data_ptr(), 0, k, 2) == 0
    assert torch.equal(out, ops.GGMLWeight(qtype, (n, k), blocks).dequantized())


@needs_c
@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
def test_each_type_against_float64_and_every_path_gives_the_same_bits(qtype):
    m, n, k = 5, 37, 768  # 3 super-blocks, 24 legacy blocks (a multiple of 4 plus none), odd N
    x = _activations(m, k, seed=int(qtype))
    blocks = random_blocks(qtype, n, k, seed=int(qtype))
    ref, bound = reference(x, blocks, qtype)
    outs = {v: _product(kernels.library(v), qtype, blocks, x) for v in VARIANTS}
    err = (outs["generic"].double() - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max().item():.3g}"
    assert (err / bound).max().item() > 0  # the comparison is not vacuous: float32 rounding is visible
    for v, y in outs.items():
        assert torch.equal(y, outs["generic"]), f"{v} differs from the plain C definition"


@needs_c
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_1, T.Q8_0, T.Q3_K, T.Q4_K, T.Q6_K, T.F16],
                         ids=lambda t: t.name)
def test_a_row_alone_in_a_batch_and_on_any_thread_count_gives_the_same_bits(qtype):
    m, n, k = 9, 70, 512  # tiles of 4 rows: 9 = 4 + 4 + 1; 70 rows: 5 units of 16, uneven
    x = _activations(m, k, seed=3)
    blocks = random_blocks(qtype, n, k, seed=4)
    full = _product(LIB, qtype, blocks, x, threads=2)
    for rows in (1, 2, 3, 4, 5, 8):
        for threads in (1, 2):
            assert torch.equal(_product(LIB, qtype, blocks, x[:rows].contiguous(), threads), full[:rows])
    for r in range(m):
        assert torch.equal(_product(LIB, qtype, blocks, x[r:r + 1].contiguous(), 1), full[r:r + 1])


@needs_c
def test_ops_linear_many_bf16_and_strided_inputs():
    k = 512
    x = torch.randn(3, k)
    ws = [ops.GGMLWeight(q, (n, k), random_blocks(q, n, k, seed=n), name=f"w{n}")
          for q, n in ((T.Q4_K, 48), (T.Q6_K, 16), (T.Q8_0, 32))]
    alone = [ops.linear(x, w) for w in ws]
    fused = ops.linear_many(x, ws)
    assert all(torch.equal(a, f) for a, f in zip(alone, fused))
    xb = x.bfloat16()
    for w, y in zip(ws, ops.linear_many(xb, ws)):
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, _product(LIB, w.qtype, w.blocks, xb.float()).bfloat16())  # bf16 in is exact in f32
    wide = torch.randn(3, 2 * k)[:, :k]  # rows with a stride
    assert torch.equal(ops.linear(wide, ws[0]), ops.linear(wide.contiguous(), ws[0]))
    # rows of a bigger weight (a tensor-parallel shard) are a strided view of its blocks
    big = ws[0]
    shard = ops.GGMLWeight(big.qtype, (16, k), big.blocks[16:32])
    assert torch.equal(ops.linear(x, shard), ops.linear(x, big)[:, 16:32])


@needs_c
@pytest.mark.parametrize("qtype", [q for q in QTYPES if act_format(q) != "f32"], ids=lambda t: t.name)
def test_prompt_products_of_block_types_give_each_row_its_decode_bits(qtype):
    """Block types run many rows through the GEMM where this build has one (gemm.c): every row gets
    the bits the decode product gives it alone, at any M, within the float64 reference's bound."""
    n, k, m = 45, 512, ops.EXACT_ROWS + 7  # 45 rows: one full panel of 32 and a partial one
    x = _activations(m, k, seed=11)
    blocks = random_blocks(qtype, n, k, seed=12)
    gemm = _product(LIB, qtype, blocks, x, method=1)
    decode = torch.cat([_product(LIB, qtype, blocks, x[r:r + 1].contiguous(), threads=1) for r in range(m)])
    assert torch.equal(gemm, decode)
    ref, bound = reference(x, blocks, qtype)
    assert bool(((gemm.double() - ref).abs() <= bound).all())
    w = ops.GGMLWeight(qtype, (n, k), blocks)
    assert torch.equal(ops.linear(x, w), gemm)
    assert torch.equal(ops.linear(x[:ops.GEMM_ROWS + 1], w), gemm[:ops.GEMM_ROWS + 1])


@needs_c
@pytest.mark.parametrize("qtype", [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_prompt_products_of_float_types_match_the_reference(qtype):
    n, k, m = 40, 512, ops.EXACT_ROWS + 6
    x = torch.randn(m, k)
    w = ops.GGMLWeight(qtype, (n, k), random_blocks(qtype, n, k, seed=9))
    exact = x.double() @ w.dequantized().double().t()
    got = ops.linear(x, w).double()
    assert ((got - exact).norm() / exact.norm()).item() < 1e-5  # float32 GEMM on the converted rows
    few = ops.linear(x[:ops.EXACT_ROWS], w)  # decode products: row-exact
    assert torch.equal(few[3:4], ops.linear(x[3:4], w))


def test_bad_weights_and_inputs_are_refused_with_the_tensor_named():
    blocks = random_blocks(T.Q4_K, 4, 512)
    with pytest.raises(ValueError, match="blk.0.attn_q.weight"):
        ops.GGMLWeight(T.Q4_K, (4, 512), blocks[:, :-1], name="blk.0.attn_q.weight")  # truncated rows
    with pytest.raises(ValueError, match="multiple"):
        ops.GGMLWeight(T.Q4_K, (4, 500), blocks, name="w")  # rows not whole blocks
    with pytest.raises(ValueError, match="not supported|no known block size"):
        ops.GGMLWeight(99, (4, 512), blocks, name="w")  # unknown type
    with pytest.raises(ValueError, match="uint8"):
        ops.GGMLWeight(T.Q4_K, (4, 512), blocks.view(torch.int8), name="w")
    w = ops.GGMLWeight(T.Q4_K, (4, 512), blocks, name="blk.3.ffn_up.weight")
    with pytest.raises(ValueError, match="blk.3.ffn_up.weight"):
        ops.linear(torch.randn(2, 256), w)
    with pytest.raises(ValueError, match="does not match"):
        ops.linear_many(torch.randn(2, 512), [w, ops.GGMLWeight(T.Q4_K, (4, 256), random_blocks(T.Q4_K, 4, 256))])


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paired_products_give_each_weight_its_row_s_lone_bits(dtype):
    """linear_paired (a decode step's routed experts in one call): weight i times row i % M
    has the bits of that row alone, across the calls of 16 weights (19 weights over 5 rows:
    the second call starts mid-cycle) and for block and float types."""
    k, n, m = 512, 40, 5
    x = torch.randn(m, k).to(dtype)
    types = [T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0, T.F16]
    ws = [ops.GGMLWeight(types[i % len(types)], (n, k), random_blocks(types[i % len(types)], n, k, seed=i),
                         name=f"expert{i}") for i in range(19)]
    y = ops.linear_paired(x, ws)
    assert y.shape == (19, n) and y.dtype == dtype
    for i, w in enumerate(ws):
        assert torch.equal(y[i:i + 1], ops.linear(x[i % m:i % m + 1], w)), i
    with pytest.raises(ValueError, match="rows cannot share one output"):
        ops.linear_paired(x, [ws[0], ops.GGMLWeight(T.Q8_0, (32, k), random_blocks(T.Q8_0, 32, k))])


@needs_c
def test_kernel_entries_check_their_arguments():
    blocks = random_blocks(T.Q8_0, 4, 64)
    x, y = torch.randn(1, 64), torch.empty(1, 4)

    def call(qtype=int(T.Q8_0), w=blocks.data_ptr(), stride=blocks.stride(0), n=4, yp=y.data_ptr(), ldy=4, k=64):
        desc = (ctypes.c_int64 * 6)(qtype, w, stride, n, yp, ldy)
        return LIB.pl_linear(desc, 1, x.data_ptr(), 0, k, 1, k, 0, 1, 0)

    assert call() == 0
    assert call(qtype=99) == kernels.PL_ETYPE
    assert call(stride=blocks.stride(0) - 1) == kernels.PL_EARG  # rows shorter than K values
    assert call(k=48) == kernels.PL_EARG  # not whole blocks
    assert call(w=0) == kernels.PL_EARG and call(yp=0) == kernels.PL_EARG
    assert call(ldy=3) == kernels.PL_EARG
    desc = (ctypes.c_int64 * 6)(int(T.Q8_0), blocks.data_ptr(), blocks.stride(0), 4, y.data_ptr(), 4)
    assert LIB.pl_linear(desc, 1, x.data_ptr(), 0, 64, 1, 64, 0, 1, 3) == kernels.PL_EARG  # no method 3
    out = torch.empty(64)
    assert LIB.pl_dequantize(int(T.F16), blocks.data_ptr() + 1, 128, 1, 64, out.data_ptr(), 0, 64, 1) == kernels.PL_EARG
    assert LIB.pl_dequantize(int(T.F16), blocks.data_ptr(), 128, 1, 64, out.data_ptr(), 0, 64, 1) == 0


def _run(code: str, **env) -> subprocess.CompletedProcess:
    code = f"TESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_the_portable_path_when_kernels_are_disabled():
    """PIPELOAD_NO_C_KERNELS=1: the torch path runs every op, and says so."""
    done = _run("""
        import pipeload, torch, sys
        sys.path.insert(0, TESTS)
        from kernel_reference import random_blocks, QTYPES
        from pipeload.quant import ops
        print(ops.backend())
        for q in QTYPES:
            w = ops.GGMLWeight(q, (8, 256), random_blocks(q, 8, 256))
            x = torch.randn(3, 256)
            exact = x.double() @ w.dequantized().double().t()
            for y in (ops.linear(x, w), ops.linear_many(x, [w, w])[1]):
                assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5, q.name
            assert torch.equal(ops.linear(x[1:2], w), ops.linear(x, w)[1:2])
            assert torch.equal(ops.linear_paired(x, [w, w])[1:2], ops.linear(x[1:2], w))
        print("ok")
    """, PIPELOAD_NO_C_KERNELS="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["portable (disabled by PIPELOAD_NO_C_KERNELS)", "ok"]


def test_a_failed_build_is_reported_once_and_the_portable_path_runs(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal error: pretend compiler failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = _run("""
        import warnings, pipeload, torch
        from gguf import GGMLQuantizationType as T
        from pipeload.quant import ops
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = ops.GGMLWeight(T.F32, (2, 4), torch.ones(2, 4).view(torch.uint8))
            for _ in range(3):
                y = ops.linear(torch.ones(1, 4), w)
        assert y.tolist() == [[4.0, 4.0]]
        print(len([c for c in caught if "pretend compiler failure" in str(c.message)]), ops.backend())
    """, CC=str(fake), PIPELOAD_KERNEL_CACHE=str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    count, backend = done.stdout.split(" ", 1)
    assert count == "1" and backend.startswith("portable (building the kernels failed")
