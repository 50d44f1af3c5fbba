"""Quantization recipes and calibrated 4-bit: llama.cpp's Q4_K_M mix, GPTQ against round to nearest."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pipeload.quant import dequantize, quantize
from pipeload.quant.gptq import HessianAccumulator, gptq_quantize, output_error
from pipeload.quant.mixes import tensor_type, use_more_bits
from tiny_models import build_k_quant_llama


def test_use_more_bits_matches_llama_cpp_layers():
    # llama.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(22) if use_more_bits(i, 22)] == [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]


def test_q4_k_m_types():
    n = 22

    def t(name, shape, has_output=True):
        return tensor_type(name, shape, "q4_k_m", n, has_output)

    assert t("token_embd.weight", (32000, 2048)) == "Q4_K"
    assert t("output.weight", (32000, 2048)) == "Q6_K"
    assert t("token_embd.weight", (32000, 2048), has_output=False) == "Q6_K"  # tied: the output's type
    assert t("blk.0.attn_v.weight", (256, 2048)) == "Q6_K"
    assert t("blk.2.attn_v.weight", (256, 2048)) == "Q4_K"
    assert t("blk.4.ffn_down.weight", (2048, 5632)) == "Q6_K"
    assert t("blk.5.ffn_down.weight", (2048, 5632)) == "Q4_K"
    for name in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert t(f"blk.0.{name}.weight", (2048, 2048)) == "Q4_K"
    assert t("blk.0.attn_norm.weight", (2048,)) == "F32"
    assert t("blk.0.attn_q.bias", (2048,)) == "F32"
    # rows that are not a multiple of 256: llama.cpp's fallbacks
    assert t("blk.5.ffn_down.weight", (256, 704)) == "Q5_0"
    assert t("blk.0.ffn_down.weight", (256, 704)) == "Q8_0"
    assert t("output.weight", (4096, 96)) == "Q8_0"
    assert t("blk.5.ffn_down.weight", (256, 72)) == "F16"
    # uniform types keep their old behaviour
    assert tensor_type("blk.0.ffn_down.weight", (64, 96), "q4_k", 3) == "F16"
    assert tensor_type("blk.0.ffn_down.weight", (64, 96), "q8_0", 3) == "Q8_0"


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + torch.randn(k, k, generator=g) / k ** 0.5
    scale = 1 + 4 * (torch.rand(k, generator=g) < 0.05)  # a few outlier features, as in LLMs
    return (torch.randn(n, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("qtype", ["Q4_K", "Q4_0"])
def test_gptq_beats_round_to_nearest_on_layer_output(qtype):
    N, K = 96, 512
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.02
    X, held_out = _correlated_inputs(5000, K).split([3000, 2000])  # calibration, unseen samples
    acc = HessianAccumulator(K)
    for part in X.split(1000):
        acc.add(part)
    assert torch.allclose(acc.H, X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-4)
    result = gptq_quantize(W, acc.H, qtype)
    # what is stored is what was optimised: the GGML blocks decode to exactly the returned weight
    assert torch.equal(dequantize(torch.from_numpy(result.packed), T[qtype], (N, K)), result.values)
    rtn = dequantize(quantize(W, T[qtype]), T[qtype], (N, K))
    err = {name: ((held_out @ (W - Q).t()).norm() / (held_out @ W.t()).norm()).item()
           for name, Q in (("gptq", result.values), ("rtn", rtn))}
    assert err["gptq"] < 0.85 * err["rtn"], err
    assert result.error == pytest.approx(output_error(W, result.values, acc.H))
    # the weights themselves stay within the format's usual error
    assert ((W - result.values).norm() / W.norm()).item() < 0.2


def test_gptq_rejects_rows_the_type_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), "Q4_K")
    with pytest.raises(ValueError, match="GPTQ writes"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), "Q6_K")


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A tiny Llama whose rows are multiples of 256 (so K-quants apply), as an HF folder."""
    root = tmp_path_factory.mktemp("small_llama")
    build_k_quant_llama(root / "hf")
    return root


def test_convert_q4_k_m_writes_the_mix(small_llama):
    from pipeload.convert import convert
    from pipeload.runtime.engine import load_engine
    from pipeload.runtime.spec import open_model

    path = small_llama / "q4_k_m.gguf"
    convert(small_llama / "hf", path, quant="q4_k_m")
    ckpt = open_model(path).checkpoint
    types = {name: t.dtype for name, t in ckpt.tensors.items()}
    assert ckpt.config["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    # 3 layers: more bits for layer 2 only (i >= 7*3/8 = 2; (i - 0) % 3 == 2)
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert types["blk.0.attn_norm.weight"] == "F32"
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None]
    err = {}
    for quant in ("f32", "q4_k"):
        convert(small_llama / "hf", small_llama / f"{quant}.gguf", quant=quant)
    ref = load_engine(small_llama / "f32.gguf").executor.forward(ids, pos, None)
    for quant in ("q4_k", "q4_k_m"):
        out = load_engine(small_llama / f"{quant}.gguf", exact=True).executor.forward(ids, pos, None)
        err[quant] = ((out - ref).norm() / ref.norm()).item()
    assert err["q4_k_m"] < err["q4_k"] < 0.3, err  # the extra bits of the mix pay off


def test_calibrated_quantization_writes_loadable_4bit(small_llama):
    from pipeload.quantize import quantize_model
    from pipeload.models.common import Linear
    from pipeload.runtime.engine import load_engine
    from pipeload.runtime.spec import open_model

    tokens = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(3))
    report = quantize_model(small_llama / "hf", small_llama / "gptq4.gguf", method="gptq4", calibration_data=tokens)
    types = {name: t.dtype for name, t in open_model(report.path).checkpoint.tensors.items()}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.2.attn_v.weight"] == "Q6_K"
    assert types["output.weight"] == "Q6_K"
    # every 4-bit block matrix went through GPTQ, in the order the block runs them
    names = [layer["name"] for layer in report.layers]
    assert names[:7] == [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                         "ffn_up", "ffn_down")]
    assert len(names) == 3 * 7 - 2  # layer 2's attn_v and ffn_down are Q6_K, round to nearest
    mean = {k: sum(layer[k] for layer in report.layers) / len(names) for k in ("gptq_error", "rtn_error")}
    assert mean["gptq_error"] < mean["rtn_error"]
    engine = load_engine(report.path)
    kinds = {m.weight.qtype.name for m in engine.executor.layers.blocks[0].modules() if isinstance(m, Linear)}
    assert "Q4_K" in kinds  # the calibrated blocks run on their Q4_K blocks as stored
    logits = engine.executor.forward(tokens[:1, :8], torch.arange(8)[None], None)
    assert torch.isfinite(logits).all()


def test_unknown_method_is_a_clear_error(small_llama):
    from pipeload.errors import UnsupportedModelError
    from pipeload.quantize import quantize_model

    with pytest.raises(UnsupportedModelError, match="unknown quantization method 'gptq3'"):
        quantize_model(small_llama / "hf", small_llama / "x.gguf", method="gptq3")


BUILTIN = __import__("pathlib").Path(__file__).parent.parent / "pipeload" / "data" / "pipeload-main.gguf"


@pytest.mark.skipif(not BUILTIN.exists(), reason="the built-in model is not in the checkout")
def test_builtin_model_at_q8_0_generates_the_f16_tokens(tmp_path):
    """Greedy tokens at q8_0 equal f16's for a fixed prompt, and along f16's own continuation the
    q8_0 model (decoding token by token, on its packed kernels) picks f16's token wherever f16 is not
    at a near-tie (top-2 logit margin >= 0.5)."""
    from pipeload import PipelineModel
    from pipeload.convert import convert

    convert(BUILTIN, tmp_path / "q8_0.gguf", quant="q8_0")
    f16, q8 = PipelineModel.from_pretrained(BUILTIN), PipelineModel.from_pretrained(tmp_path / "q8_0.gguf")
    prompt = "import os\nimport sys\n\n\ndef main():\n"
    greedy = [[r.token for r in m.stream(prompt, max_tokens=32, temperature=0, ignore_eos=True)] for m in (f16, q8)]
    assert greedy[0] == greedy[1]

    ids = f16.tokenizer.encode("class Stack:\n    def __init__(self):\n")
    seq = ids + [r.token for r in f16.stream(ids, max_tokens=48, temperature=0, ignore_eos=True)]
    checked = 0
    for m_ref, m in ((f16, q8),):
        caches = [x.engine.new_cache(1, len(seq) + 1) for x in (m_ref, m)]
        for p in range(len(seq) - 1):
            tok, pos = torch.tensor([[seq[p]]]), torch.tensor([[p]])
            ref, got = (x.engine.executor.forward(tok, pos, c)[0, -1] for x, c in zip((m_ref, m), caches))
            if p < len(ids) - 1:
                continue
            top2 = ref.topk(2).values
            if (top2[0] - top2[1]).item() >= 0.5:
                assert got.argmax().item() == ref.argmax().item(), p
                checked += 1
    assert checked > 20
