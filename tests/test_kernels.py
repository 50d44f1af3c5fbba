"""The compiled kernels of the old packed layouts (quant/kernels.c) against torch references.

Nothing in the runtime calls these kernels any more (it computes on GGUF blocks through
quant/ops.py); they stay tested until quant/kernels.c and ckernels.py are replaced."""

from types import SimpleNamespace

import pytest
import torch

from pipeload.quant import ckernels

needs_c = pytest.mark.skipif(not ckernels.available(), reason=f"no C kernels here: {ckernels.failure()}")
INT4_TILE_N = 64  # rows per tile of the CPU int4pack layout


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the CPU kernel's layout for integer weights q in 0..15 of shape [N, K]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of pack_int4 (N a multiple of 64): rows i (low nibble) and i + 32 (high) per k."""
    tiles = packed.reshape(n // INT4_TILE_N, k, INT4_TILE_N // 2)  # (N/64, K, 32)
    return torch.cat((tiles & 15, tiles >> 4), dim=2).transpose(1, 2).reshape(n, k)


def _int4(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = SimpleNamespace(qweight=pack_int4(torch.randint(0, 16, (n, k), generator=g)),
                        scales_zeros=(torch.randn(k // 32, n, 2, generator=g) * 0.02).bfloat16())
    m.dequantized = lambda: _dequantized_int4(m, n, k)
    return m


def _dequantized_int4(m, n, k):
    q = unpack_int4(m.qweight, n, k).view(n, -1, 32).to(torch.bfloat16)
    sz = m.scales_zeros.transpose(0, 1)  # (N, K/32, 2)
    return ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)


def _int8(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) * 0.01).bfloat16()
    return SimpleNamespace(qweight=qweight, scales=scales,
                           dequantized=lambda: qweight.to(torch.bfloat16) * scales[:, None])


def _quantized_activations(x):
    """What the kernels compute activations as: blocks of 32, scale amax / 127, round half even."""
    xf = x.float().view(x.shape[0], -1, 32)
    d = xf.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xf * torch.where(d > 0, 1 / d, 0.0)).clamp(-127, 127)
    return (q * d).view_as(x.float()), xf.sum(-1)


@needs_c
@pytest.mark.parametrize("n,k", [(64, 32), (192, 256), (128, 96)])
def test_unpack_int4_is_bit_exact(n, k):
    m = _int4(n, k)
    q = unpack_int4(m.qweight, n, k).view(n, -1, 32).to(torch.bfloat16)
    sz = m.scales_zeros.transpose(0, 1)  # (N, K/32, 2)
    expected = ((q - 8) * sz[..., :1] + sz[..., 1:]).view(n, k)  # torch's bf16 arithmetic
    got = ckernels.unpack_int4_t_bf16(m.qweight, m.scales_zeros, n, k, 32)
    assert torch.equal(got.t(), expected)


@needs_c
@pytest.mark.parametrize("rows", [1, 3, 15])
def test_decode_kernels_match_their_definition(rows):
    """int8 activations in blocks of 32 (as llama.cpp's Q8_0), integer dot products per block:
    float64 references of the same math, and of the exact product."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 256).bfloat16()
    xdq, xs = _quantized_activations(x)  # (rows, K), (rows, K/32)
    m4, m8 = _int4(192, 256), _int8(160, 256)
    # int4: per group, s * (q . x_quantized) + (z - 8 s) * exact block sum of x
    q = unpack_int4(m4.qweight, 192, 256).double()
    s, z = (t.double().t() for t in m4.scales_zeros.unbind(-1))  # (N, K/32)
    ref4 = xdq.double() @ (q * s.repeat_interleave(32, 1)).t() + xs.double() @ (z - 8 * s).t()
    ref8 = xdq.double() @ m8.dequantized().double().t()
    got4 = ckernels.gemv_int4(x, m4.qweight, m4.scales_zeros).double()
    got8 = ckernels.gemv_int8(x, m8.qweight, m8.scales).double()
    for got, ref in ((got4, ref4), (got8, ref8)):
        assert ((got - ref).norm() / ref.norm()).item() < 4e-3  # bf16 output rounding
    for got, m in ((got4, m4), (got8, m8)):  # 8-bit activations cost about what they cost llama.cpp
        exact = x.double() @ m.dequantized().double().t()
        assert ((got - exact).norm() / exact.norm()).item() < 0.03


@needs_c
def test_decode_kernels_do_not_depend_on_threads_or_other_rows():
    x = torch.randn(4, 512).bfloat16()
    m4, m8 = _int4(256, 512), _int8(256, 512)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((ckernels.gemv_int4(x, m4.qweight, m4.scales_zeros), ckernels.gemv_int8(x, m8.qweight, m8.scales)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    # each row gets the bits it gets alone (batched decode stays exact)
    alone = ckernels.gemv_int4(x[2:3], m4.qweight, m4.scales_zeros)
    assert torch.equal(alone, outs[0][0][2:3])


@needs_c
def test_int8_unpack_is_bit_exact():
    m = _int8(192, 256)
    expected = m.qweight.to(torch.bfloat16) * m.scales[:, None]
    assert torch.equal(ckernels.int8_to_bf16(m.qweight, m.scales), expected)


@needs_c
@pytest.mark.parametrize("S", [1, 7, 130])
def test_one_token_attention_matches_sdpa(S):
    """Decode attention (one query token over the cache) in C against float64 SDPA, GQA included."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(S)
    cache = torch.randn(2, 1, 4, 160, 32, generator=g).bfloat16()  # (k/v, B, Hkv, S_max, hd): a cache slice
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    q = torch.randn(1, 8, 1, 32, generator=g).bfloat16()
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), enable_gqa=True)
    got = ckernels.attend_one(q, k, v, 32 ** -0.5)
    assert (got.double() - ref.transpose(1, 2).reshape(1, 1, -1)).abs().max().item() < 8e-3
