"""The model layer's linears over GGMLWeights: views of the file's bytes, fused passes that keep
each output's bits, embeddings that decode only the rows looked up."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pipeload.models.common import Embedding, Fused, Linear
from pipeload.quant import dequantize, quantize
from pipeload.quant.ops import GGMLWeight


def _weight(n, k, qtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    return GGMLWeight(qtype, (n, k), quantize(w, qtype).view(n, -1))


@pytest.mark.parametrize("rows", [1, 5, 80])  # decode rows, and a prompt beyond ops.EXACT_ROWS
def test_fused_linears_give_each_output_its_own_bits(rows):
    parts = []
    for n, qtype in ((128, T.Q4_K), (64, T.Q6_K), (64, T.Q8_0)):  # Q4_K_M mixes types within q/k/v
        p = Linear(256, n, bias=True)
        p.weight = _weight(n, 256, qtype, n + int(qtype))
        p.bias = torch.randn(n).bfloat16()
        parts.append(p)
    x = torch.randn(2, rows, 256).bfloat16()
    fused = Fused(*parts)(x)
    for part, y in zip(parts, fused):
        assert y.shape == (2, rows, part.out_features)
        assert torch.equal(y, part(x))


def test_linear_matches_the_dequantized_weight():
    """The compiled kernels quantize activations to 8 bits per block (llama.cpp's Q8_K for K-quants):
    within the rounding bound of the float64 product on those activations, and within 8-bit
    activation error of the float product; the portable path multiplies float32 activations."""
    from kernel_reference import reference
    from pipeload.quant import kernels

    lin = Linear(256, 96)
    lin.weight = _weight(96, 256, T.Q5_K, 3)
    x = torch.randn(3, 256)
    exact = x.double() @ dequantize(lin.weight.blocks, T.Q5_K, (96, 256)).double().t()
    y = lin(x).double()
    if kernels.library() is None:
        assert ((y - exact).norm() / exact.norm()).item() < 1e-5  # float32 activations
    else:
        ref, bound = reference(x, lin.weight.blocks, T.Q5_K)
        assert bool(((y - ref).abs() <= bound).all())
        assert ((y - exact).norm() / exact.norm()).item() < 0.02  # 8-bit activations


def test_embedding_decodes_only_looked_up_rows_to_the_table_values():
    emb = Embedding(300, 256)
    emb.weight, emb.dtype = _weight(300, 256, T.Q4_0, 7), torch.bfloat16
    ids = torch.tensor([[3, 299, 3], [0, 150, 7]])
    table = dequantize(emb.weight.blocks, T.Q4_0, (300, 256))
    out = emb(ids)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 256)
    assert torch.equal(out, table[ids].bfloat16())


def test_resident_weights_are_views_of_the_bytes_read(tiny):
    """A resident block's matrices point into the buffer its layer was read into: nothing copied."""
    from pipeload.runtime.engine import load_engine

    engine = load_engine(tiny("llama2")[2], dtype=torch.bfloat16)  # an F32 file computed with bf16 activations
    block = engine.executor.layers.blocks[1]
    weights = [m.weight for m in block.modules() if isinstance(m, Linear)]
    storages = {w.blocks.untyped_storage().data_ptr() for w in weights}
    assert len(storages) == 1  # one buffer for the whole layer
    assert all(w.qtype == T.F32 for w in weights)
    layer_bytes = sum(t.info.nbytes for t in engine.index.block(1).tensors)
    assert weights[0].blocks.untyped_storage().nbytes() < layer_bytes + 2 * 4096  # the aligned read, no more


def test_quantized_model_default_path_stays_close_to_the_float32_reference(tmp_path):
    """A Q4_K / Q8_0 GGUF computed on its blocks with bf16 activations stays close to the float32
    reference mode (every weight dequantized to float32)."""
    import transformers as tf

    from pipeload.convert import convert
    from pipeload.runtime.engine import load_engine

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    for quant in ("q4_k", "q8_0"):
        path = tmp_path / f"{quant}.gguf"
        convert(tmp_path / "hf", path, quant=quant)
        exact = load_engine(path, exact=True)
        default = load_engine(path)
        assert default.dtype == torch.float32  # float32 activations on the stored blocks
        q = default.executor.layers.blocks[0].attn_q.weight
        assert q.qtype == (T.Q4_K if quant == "q4_k" else T.Q8_0)
        assert exact.executor.layers.blocks[0].attn_q.weight.qtype == T.F32
        ids = torch.randint(0, 320, (1, 24))
        pos = torch.arange(24)[None]
        a = exact.executor.forward(ids, pos, None)
        b = default.executor.forward(ids, pos, None)
        assert ((a - b).norm() / a.norm()).item() < 0.04
