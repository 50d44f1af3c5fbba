"""Encoders (BERT, RoBERTa, XLM-R, ViT, DeiT) against transformers on the same random weights, from
HF folders and from GGUF files written by llama.cpp's own converter; padding exactness; pooling
against sentence-transformers; image preprocessing against transformers' PIL processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from encoder_models import IMAGE_KINDS, MINILM, TEXT_KINDS, varied_sentences, weights_fraction_budget
from pipeload.runtime.engine import load_engine

TOL = 1e-4


def run_text(engine, ids, mask):
    """Final hidden states (B, T, D) for ids (B, T) with the real-token mask (B, T), one pass."""
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    model = engine.model
    with torch.inference_mode():
        h = model.embed(ids, pos)
        step = model.step_inputs(pos, None if bool(mask.all()) else mask[:, None, None, :])
        return engine.executor.encode([h], [step])[0]


def _padded_ids(vocab: int, lengths: list[int], pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.int64)
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for r, n in enumerate(lengths):
        row = torch.randint(0, vocab, (n,), generator=g)
        row[row == pad] = pad + 1  # RoBERTa numbers positions by the non-pad tokens: keep pad ids out
        ids[r, :n], mask[r, :n] = row, True
    return ids, mask


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_text_encoder_matches_transformers(encoders, kind, fmt):
    ref_model, folder, gguf = encoders(kind)
    engine = load_engine(folder if fmt == "hf" else gguf)
    pad = ref_model.config.pad_token_id
    ids, mask = _padded_ids(engine.args.vocab_size, [17, 9, 1 + 1, 30], pad)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    ours = run_text(engine, ids, mask)
    assert ours.shape == ref.shape
    diff = (ours - ref)[mask].abs().max().item()
    assert diff < TOL, f"{kind} from {fmt}: max |diff| {diff}"
    assert ref[mask].std() > 0.1  # not a comparison of near-constant outputs


def test_roberta_positions_start_after_padding_id(encoders):
    """HF RoBERTa's table keeps pad_token_id + 1 unused rows; llama.cpp's file cuts them; both
    give position 0 the same vector."""
    _, folder, gguf = encoders("roberta")
    hf, gg = load_engine(folder), load_engine(gguf)
    assert hf.args.position_offset == 2 and gg.args.position_offset == 0
    assert hf.args.context_length == gg.args.context_length == 40
    pos = torch.arange(40)[None]
    assert torch.equal(hf.model.position_embd(pos + 2), gg.model.position_embd(pos))


def test_padded_batch_gives_each_input_its_unpadded_result(encoders):
    _, folder, _ = encoders("bert")
    engine = load_engine(folder)
    lengths = [23, 5, 14, 1 + 2]
    ids, mask = _padded_ids(engine.args.vocab_size, lengths, 0, seed=3)
    batched = run_text(engine, ids, mask)
    for r, n in enumerate(lengths):
        alone = run_text(engine, ids[r:r + 1, :n], mask[r:r + 1, :n])
        diff = (batched[r, :n] - alone[0]).abs().max().item()
        assert diff < 1e-5, f"input {r} ({n} tokens): padded batch differs from alone by {diff}"


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_image_encoder_matches_transformers(encoders, kind):
    ref_model, folder, _ = encoders(kind)
    engine = load_engine(folder)
    args, model = engine.args, engine.model
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, args.image_size, args.image_size, generator=g)
    with torch.inference_mode():
        h = model.embed(pixels)
        step = model.step_inputs(torch.arange(h.shape[1])[None], None)
        normed = engine.executor.encode([h], [step], head=lambda m, x: m.head(x))[0]
        out = ref_model(pixel_values=pixels)
    if kind == "vit-model":
        ref = out.last_hidden_state
        assert (normed - ref).abs().max().item() < TOL
        assert ref.std() > 0.1
        with pytest.raises(ValueError, match="no classifier head"):
            model.classify(normed)
    else:
        logits = model.classify(normed)
        assert logits.shape == out.logits.shape == (3, 7)
        diff = (logits - out.logits).abs().max().item()
        assert diff < TOL, f"{kind}: max |diff| {diff}"
        assert out.logits.std() > 0.1
    assert args.distillation_token == (kind == "deit")


# ---------------------------------------------------------------------------------------------
# Preprocessing and pooling against the reference libraries


def _random_image(mode: str, size=(45, 37), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.mark.parametrize("kind", ["vit", "deit"])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_image_preprocessing_matches_transformers(encoders, kind, mode):
    """Our pixels equal transformers' PIL image processor's for the same config, for colour,
    transparent and grayscale images."""
    import json

    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    from pipeload.encoding.images import preprocess, preprocessing_of_folder

    _, folder, _ = encoders(kind)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.pop("image_processor_type")
    processor = (ViTImageProcessorPil if kind == "vit" else DeiTImageProcessorPil)(**cfg, do_convert_rgb=True)
    image = _random_image(mode)
    ref = torch.as_tensor(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
    ours = preprocess([image], preprocessing_of_folder(folder, 32))
    assert ours.shape == ref.shape == (1, 3, 32, 32)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("mode", ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
                                  ("cls", "mean")])
def test_pooling_matches_sentence_transformers(mode):
    from sentence_transformers.sentence_transformer.modules import Pooling

    from pipeload.encoding.sentence import SentenceConfig, pool

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 9, 16, generator=g)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for r, n in enumerate([9, 3, 6, 1]):
        mask[r, :n] = True
    ref = Pooling(16, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask.long()})
    modes = (mode,) if isinstance(mode, str) else mode
    ours = pool(hidden, mask, SentenceConfig(modes=modes))
    assert torch.allclose(ours, ref["sentence_embedding"], atol=1e-6)


TOKENIZER_TEXTS = ["the quick brown fox", "Hello, World!  Two  spaces\tand a tab\nand a line.", "Ünïcödé café naïve",
                   "numbers 3.14159 and 1,000,000", "  leading and trailing  ", "x"]


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_encoder_tokenizers_match_transformers(encoders, kind):
    """WordPiece (BERT) and unigram (XLM-R) tokenizers, from the HF folder, from the GGUF file
    llama.cpp's converter wrote, and from the GGUF metadata pipeload's exporter writes, give
    transformers' token ids (and the exporter writes llama.cpp's vocabulary)."""
    import transformers as tf

    from pipeload.weights.gguf import read_gguf
    from pipeload.weights.gguf_export import hf_tokenizer_metadata
    from pipeload.tokenizer.from_gguf import tokenizer_from_gguf
    from pipeload.tokenizer.tokenizer import load_hf_tokenizer

    ref_model, folder, gguf = encoders(kind)
    ref = tf.AutoTokenizer.from_pretrained(folder)
    theirs = read_gguf(gguf).metadata
    exported = hf_tokenizer_metadata(folder, ref_model.config.vocab_size)
    n = len(theirs["tokenizer.ggml.tokens"]) - (kind == "xlm-roberta")  # llama.cpp's loses XLM-R's <mask>
    assert exported["tokenizer.ggml.tokens"][:n] == theirs["tokenizer.ggml.tokens"][:n]
    assert exported["tokenizer.ggml.model"] == theirs["tokenizer.ggml.model"]
    tokenizers = {"hf": load_hf_tokenizer(folder), "llama.cpp gguf": tokenizer_from_gguf(theirs),
                  "exported": tokenizer_from_gguf(exported)}
    for text in TOKENIZER_TEXTS:
        want = ref(text)["input_ids"]
        for name, ours in tokenizers.items():
            assert ours.encode(text) == want, (name, text)
    assert len(ref("the quick brown fox")["input_ids"]) > 3


@pytest.fixture(scope="module")
def minilm_reference():
    """200 varied texts (some beyond MiniLM's 256-token limit) and sentence-transformers' vectors."""
    from sentence_transformers import SentenceTransformer

    texts = varied_sentences(200)
    return texts, SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_tensor=True, batch_size=32)


@pytest.mark.skipif(not MINILM.is_dir(), reason="all-minilm-l6-v2 not fetched (../shared/models/fetch.sh)")
@pytest.mark.parametrize("budget", [None, 0.3])
def test_real_minilm_matches_sentence_transformers(minilm_reference, budget):
    """all-MiniLM-L6-v2 through PipelineModel.embed gives sentence-transformers' vectors, fully
    resident and with 30% of its weights' bytes for weights (layers and the token table stream;
    then bit for bit the resident vectors)."""
    from pipeload import PipelineModel

    texts, ref = minilm_reference
    limit = None if budget is None else weights_fraction_budget(MINILM, budget)
    model = PipelineModel.from_pretrained(MINILM, memory_limit=limit)
    try:
        if budget is not None:
            plan = model.plan
            assert plan.streamed and plan.token_rows_on_disk
            assert plan.resident_weight_bytes + plan.ring_bytes < 0.5 * model.engine.index.total_bytes
        with pytest.warns(UserWarning, match="truncated"):
            ours = model.embed(texts, batch_size=32)
        if budget is not None:
            assert model.stats["passes"] < model.stats["chunks"]  # several chunks share each pass
    finally:
        model.close()
    if budget is not None:  # streamed under the budget: the resident run's bits
        assert torch.equal(ours, PipelineModel.from_pretrained(MINILM).embed(texts, batch_size=32))
    cos = torch.nn.functional.cosine_similarity(ours, ref)
    assert cos.min().item() >= 0.99999, cos.min().item()
    assert (ours - ref).abs().max().item() <= 1e-5
