"""The compiled kernels (quant/kernels.c) against torch references, and merged (fused) linears."""

import pytest
import torch

from pipeload.quant import ckernels
from pipeload.quant.linear import Int4Linear, Int8Linear, Linear, concat_linears, pack_int4

needs_c = pytest.mark.skipif(not ckernels.available(), reason=f"no C kernels here: {ckernels.failure()}")


def _int4(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = Int4Linear(k, n)
    m.qweight = pack_int4(torch.randint(0, 16, (n, k), generator=g))
    m.scales_zeros = (torch.randn(k // 32, n, 2, generator=g) * 0.02).bfloat16()
    return m


def _int8(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = Int8Linear(k, n)
    m.qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    m.scales = (torch.rand(n, generator=g) * 0.01).bfloat16()
    return m


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
    from pipeload.quant.linear import unpack_int4

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
    from pipeload.quant.linear import unpack_int4

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


@pytest.mark.parametrize("kind", ["int4", "int8", "bf16", "f32"])
def test_concat_linears_keeps_every_output(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "int4":
        parts = [_int4(n, 256, seed=n) for n in (128, 64, 64)]
    elif kind == "int8":
        parts = [_int8(n, 256, seed=n) for n in (128, 64, 64)]
    else:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        parts = []
        for n in (128, 64, 64):
            p = Linear(256, n, bias=True)
            p.weight = torch.nn.Parameter(torch.randn(n, 256, generator=g).to(dtype), requires_grad=False)
            p.bias = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype), requires_grad=False)
            parts.append(p)
    fused = concat_linears(parts)
    assert fused is not None and fused.out_features == 256
    for rows in (1, 3, 40):  # packed kernels, and the unpack + GEMM path for many rows
        x = torch.randn(rows, 256, generator=g)
        expected = torch.cat([p(x) for p in parts], dim=-1)
        assert torch.equal(fused(x), expected), (kind, rows)


def test_concat_linears_refuses_mixed_formats():
    assert concat_linears([_int4(64, 256), _int8(64, 256)]) is None
    assert concat_linears([_int4(64, 256), _int4(64, 512)]) is None


def test_fused_block_computes_what_the_plain_block_does(tiny):
    """A resident block merges q/k/v and gate/up at load; the outputs are those of the plain block."""
    from pipeload.runtime.engine import load_engine

    _, _, gguf = tiny("llama3")
    engine = load_engine(gguf)
    block = engine.executor.layers.blocks[0]
    assert block.attn_qkv is not None and block.ffn_gate_up is not None
    plain = engine.model.new_block(0)
    sd = {}
    a = engine.args
    q, k, v = block.attn_qkv.weight.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim,
                                           a.n_kv_heads * a.head_dim])
    gate, up = block.ffn_gate_up.weight.chunk(2)
    sd.update({"attn_q.weight": q, "attn_k.weight": k, "attn_v.weight": v, "ffn_gate.weight": gate,
               "ffn_up.weight": up})
    sd.update({n: p for n, p in block.named_parameters() if not n.startswith(("attn_qkv", "ffn_gate_up"))})
    plain.load_state_dict(sd, assign=True)
    x = torch.randn(1, 5, a.dim)
    pos = torch.arange(5)[None]
    step = engine.model.step_inputs(pos, None)
    assert torch.allclose(block(x, step, None), plain(x, step, None), atol=1e-6, rtol=1e-5)


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
