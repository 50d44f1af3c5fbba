"""PipelineModel.embed / classify on tiny encoders: streamed under a budget equals resident bit for
bit, labels and probabilities equal transformers', and bad input gets clear errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeload import PipelineModel
from pipeload.errors import ContextLengthError, UnsupportedModelError

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a", "Ünïcödé café naïve résumé " * 3,
         "numbers 3.14159 and 1,000,000 and more numbers 42", "why is the sky blue?"]


def _load(path, memory_limit=None, **kw):
    """The model, resident or (with memory_limit) with prefetch_depth 1 and O_DIRECT reads: the
    tiny encoders have 3 layers, and a ring of 3 slots, or buffered reads' page cache of a group
    being read, would hold as much as all of them."""
    if memory_limit is not None:
        kw.setdefault("prefetch_depth", 1)
        kw.setdefault("io_mode", "direct")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny folders carry no pooling / preprocessing config
        return PipelineModel.from_pretrained(path, memory_limit=memory_limit, **kw)


def _budgets(path, monkeypatch) -> tuple[int, int]:
    """(the least budget the model runs under: everything streamed, half way to all resident),
    with the runtime counted as 0 bytes so that plans depend on the file alone."""
    from pipeload.runtime.planner import make_plan, smallest_plan
    from pipeload.runtime.spec import open_model

    monkeypatch.setattr("pipeload.runtime.memory.current_rss", lambda: 0)
    spec = open_model(path)
    ctx = spec.args.context_length
    least = smallest_plan(spec, 0, ctx, 32, 1, buffered_reads=False).predicted_peak
    return least, (least + make_plan(spec, None, 0, ctx, 32, 1, buffered_reads=False).predicted_peak) // 2


def _images(folder, n=5, size=(40, 33)):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_streamed_text_encoder_equals_resident(encoders, fmt, monkeypatch):
    """Everything streamed (token rows read from the file), or half resident: the vectors are
    the resident ones bit for bit, and one pass over the streamed layers serves several chunks."""
    _, folder, gguf = encoders("bert")
    path = folder if fmt == "hf" else gguf
    least, half = _budgets(path, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = _load(path).embed(TEXTS * 4, batch_size=3)
        for budget in (least, half):
            model = _load(path, budget)
            try:
                plan = model.plan
                if budget == least:  # every block streams (BERT's head group is empty)
                    assert plan.resident == ["head"] and plan.token_rows_on_disk
                else:
                    assert plan.token_rows_on_disk or plan.streamed
                assert torch.equal(model.embed(TEXTS * 4, batch_size=3), want)
                if plan.streamed:
                    assert model.stats["passes"] < model.stats["chunks"]
                    assert model.stats["stream"]["bytes_read"] >= plan.streamed_bytes
            finally:
                model.close()


def test_streamed_image_encoder_equals_resident(encoders, tmp_path, monkeypatch):
    _, folder, _ = encoders("deit")
    images = _images(tmp_path, 7)
    least, _ = _budgets(folder, monkeypatch)
    resident, streamed = _load(folder), _load(folder, least)
    try:
        # every block streams; the head (1000 labels) is larger than a block and stays resident
        assert streamed.plan.streamed == ["blk.0", "blk.1", "blk.2"]
        # the same batches: the same bits (4 passes of 2 images resident, fewer streamed)
        assert resident.classify(images, top_k=3, batch_size=2) == streamed.classify(images, top_k=3, batch_size=2)
        want = resident.embed(images, batch_size=2)
        assert torch.equal(streamed.embed(images, batch_size=2), want)
        assert streamed.stats["passes"] < streamed.stats["chunks"] == 4
        # other batches: matrix products over other row counts round differently, within float32
        assert torch.allclose(streamed.embed(images, batch_size=32), want, atol=1e-5, rtol=0)
    finally:
        streamed.close()


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_classify_matches_transformers(encoders, kind, tmp_path):
    """Labels (from id2label) and probabilities of the top 3 classes equal transformers' on image
    files preprocessed by transformers' own PIL processor."""
    import json

    from PIL import Image
    from transformers.models.deit.image_processing_pil_deit import DeiTImageProcessorPil
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    ref_model, folder, _ = encoders(kind)
    images = _images(tmp_path, 4)
    cfg = json.loads((folder / "preprocessor_config.json").read_text())
    cfg.pop("image_processor_type")
    processor = (ViTImageProcessorPil if kind == "vit" else DeiTImageProcessorPil)(**cfg)
    pixels = torch.as_tensor(np.asarray(processor([Image.open(p) for p in images], return_tensors="np")["pixel_values"]))
    with torch.no_grad():
        probs = torch.softmax(ref_model(pixel_values=pixels).logits, dim=-1)
    top = probs.topk(3, dim=-1)
    ours = _load(folder).classify(images, top_k=3)
    for answer, values, indices in zip(ours, top.values, top.indices):
        assert [label for label, _ in answer] == [ref_model.config.id2label[int(i)] for i in indices]
        assert np.allclose([p for _, p in answer], values.tolist(), atol=1e-5)
    single = _load(folder).classify(images[0], top_k=2)  # one image in, one answer out
    assert len(single) == 2 and single[0][0] == ours[0][0][0]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_text_inputs(encoders):
    _, folder, _ = encoders("bert")
    model = _load(folder)
    with pytest.raises(ValueError, match="empty"):
        model.embed([])
    with pytest.raises(ValueError, match="input 1 is an empty string"):
        model.embed(["fine", "  "])
    with pytest.raises(ValueError, match="input 0 is a int"):
        model.embed([3])
    long = "word " * 100  # the tiny model has 40 positions
    with pytest.warns(UserWarning, match="1 of 2 inputs were longer than 40 tokens and were truncated"):
        vectors = model.embed(["short", long])
    assert vectors.shape == (2, 64) and torch.isfinite(vectors).all()
    with pytest.raises(ContextLengthError, match="input 1 has 102 tokens, more than the 40"):
        model.embed(["short", long], truncate=False)
    with pytest.raises(UnsupportedModelError, match="encoder .* cannot generate text; use embed"):
        model.generate("hello")
    with pytest.raises(UnsupportedModelError, match="text encoder"):
        model.classify("x.png")


def test_model_without_pooling_config_warns_and_mean_pools(encoders):
    """The tiny folder has no sentence-transformers files: mean pooling, said in a warning."""
    from pipeload.encoding.sentence import SentenceConfig, pool

    _, folder, _ = encoders("bert")
    model = PipelineModel.from_pretrained(folder)
    with pytest.warns(UserWarning, match="no sentence-transformers modules.json; using mean pooling"):
        v = model.embed(["hello world"], normalize=False)
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("hello world")])
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.inference_mode():
        h = model.engine.executor.encode([model.engine.model.embed(ids, torch.arange(ids.shape[1])[None])],
                                         [model.engine.model.step_inputs(None, None)])[0]
    assert torch.equal(v, pool(h, mask, SentenceConfig(modes=("mean",))))


def test_bad_image_inputs(encoders, tmp_path):
    _, folder, _ = encoders("vit")
    model = _load(folder)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"input 1 \(.*notes.txt\) is not an image Pillow can read"):
        model.classify([_images(tmp_path, 1)[0], text])
    with pytest.raises(ValueError, match=r"input 0 \(5 bytes\) is not an image"):
        model.embed([b"hello"])
    with pytest.raises(ValueError, match="no such image file"):
        model.classify(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="empty"):
        model.classify([])
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        model.classify(_images(tmp_path, 1), top_k=0)
    from PIL import Image

    gray = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8), "L")
    rgba = Image.fromarray(np.zeros((20, 30, 4), dtype=np.uint8), "RGBA")  # fully transparent: white
    white = Image.fromarray(np.full((20, 30, 3), 255, dtype=np.uint8), "RGB")
    out = model.classify([gray, rgba, white], top_k=1)
    assert out[1] == out[2]
    _, bare, _ = encoders("vit-model")
    with pytest.raises(ValueError, match="no classifier head"):
        _load(bare).classify(_images(tmp_path, 1))


def test_decoder_refuses_embed(tiny):
    _, folder, _ = tiny("llama2")
    with pytest.raises(UnsupportedModelError, match="decoder: embed needs an encoder"):
        PipelineModel.from_pretrained(folder).embed("hello")
