"""Encoder passes: texts or images in, sentence vectors, image vectors or class probabilities out
(for encoders what generation.py is for decoders).

Inputs are sorted by length and cut into chunks of at most `batch_size` inputs and ENCODE_CHUNK
padded tokens. A pass over the weights takes as many chunks as the plan's activation room holds
(plan.batch inputs of up to plan.context tokens, whose hidden states wait between layers), and
the executor runs every chunk of the pass through layer i before it asks for layer i + 1: under a
budget, one read of the streamed layers serves the whole pass. A resident model runs one pass per
chunk (holding more gains nothing). Padding is exact: each chunk carries its key mask, so an
input's vector does not depend on what it is batched with (within float rounding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..encoding.images import ImagePreprocessing, preprocess, preprocessing_of_folder, preprocessing_of_gguf
from ..encoding.sentence import SentenceConfig, pool, sentence_config_of_folder, sentence_config_of_gguf
from ..encoding.text import TextBatch, check_texts, make_batches, tokenize
from ..errors import NoTokenizerError
from .executor import ENCODE_CHUNK


@dataclass
class EncodeStats:
    """Figures of one embed / classify call."""

    inputs: int = 0
    tokens: int = 0           # real tokens (image models: patches + CLS per image)
    padded_tokens: int = 0    # tokens computed, padding included
    chunks: int = 0           # pieces computed through a layer at once
    passes: int = 0           # passes over the weights (each serves one or more chunks)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["inputs_per_s"] = self.inputs / self.seconds if self.seconds > 0 else float("nan")
        return d


def group_passes(chunk_sizes: list[tuple[int, int]], plan) -> list[list[int]]:
    """Chunk indices grouped into passes: one chunk per pass without a plan or with nothing
    streamed; else as many chunks as hold at most plan.batch inputs and plan.batch * plan.context
    tokens (chunk_sizes: (inputs, padded tokens) of each chunk)."""
    if plan is None or not plan.streamed:
        return [[c] for c in range(len(chunk_sizes))]
    max_inputs, max_tokens = plan.batch, plan.batch * plan.context
    passes, current, inputs, tokens = [], [], 0, 0
    for c, (n, t) in enumerate(chunk_sizes):
        if current and (inputs + n > max_inputs or tokens + t > max_tokens):
            passes.append(current)
            current, inputs, tokens = [], 0, 0
        current.append(c)
        inputs, tokens = inputs + n, tokens + t
    return passes + ([current] if current else [])


def _chunk_limit(plan, batch_size: int, tokens_per_input: int) -> tuple[int, int]:
    """(inputs, padded tokens) a chunk may hold: batch_size and ENCODE_CHUNK, and no more than the
    plan reserved activations for."""
    max_tokens = ENCODE_CHUNK if plan is None else min(ENCODE_CHUNK, plan.batch * plan.context)
    inputs = batch_size if plan is None else min(batch_size, plan.batch)
    return max(1, inputs), max(max_tokens, tokens_per_input)


class TextEncoder:
    """Sentence vectors from a BERT-family engine, pooled as sentence-transformers does."""

    def __init__(self, engine, tokenizer, sentence: SentenceConfig):
        if tokenizer is None:
            raise NoTokenizerError(f"{engine.spec.path} has no tokenizer: a text encoder needs one to embed text")
        self.engine, self.tokenizer, self.sentence = engine, tokenizer, sentence
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else engine.args.pad_token_id

    @property
    def max_tokens(self) -> int:
        """The longest input in tokens: the position table (or the plan's context), or
        sentence-transformers' max_seq_length if smaller."""
        limit = self.engine.context_length
        return min(limit, self.sentence.max_tokens) if self.sentence.max_tokens else limit

    def embed(self, texts, batch_size: int = 32, truncate: bool = True,
              normalize: bool | None = None) -> tuple[torch.Tensor, EncodeStats]:
        """(vectors (N, D) float32, figures) for a string or a list of strings; raises
        ValueError for an empty list or string, ContextLengthError for a text longer than the
        model takes when truncate=False."""
        t0 = time.perf_counter()
        texts = check_texts(texts)
        config = self.sentence if normalize is None else replace(self.sentence, normalize=bool(normalize))
        ids = tokenize(self.tokenizer, texts, self.max_tokens, truncate=truncate, lowercase=config.lowercase)
        plan = self.engine.plan
        n_inputs, max_tokens = _chunk_limit(plan, batch_size, max(map(len, ids)))
        chunks = make_batches(ids, n_inputs, self.pad_id, max_tokens)
        stats = EncodeStats(inputs=len(texts), tokens=sum(map(len, ids)),
                            padded_tokens=sum(b.ids.numel() for b in chunks), chunks=len(chunks))
        out: torch.Tensor | None = None
        model, executor = self.engine.model, self.engine.executor
        for members in group_passes([(b.ids.shape[0], b.ids.numel()) for b in chunks], plan):
            batch: list[TextBatch] = [chunks[c] for c in members]
            with torch.inference_mode():
                hidden = [model.embed(b.ids, b.positions) for b in batch]
                steps = [model.step_inputs(b.positions, b.key_mask) for b in batch]
                final = executor.encode(hidden, steps)
            for b, h in zip(batch, final):
                vectors = pool(h, b.mask, config)                       # (B, D')
                if out is None:
                    out = torch.empty(len(texts), vectors.shape[1], dtype=torch.float32)
                out[b.order] = vectors
            stats.passes += 1
        stats.seconds = time.perf_counter() - t0
        return out, stats


class ImageEncoder:
    """Image vectors and class probabilities from a ViT engine."""

    def __init__(self, engine, steps: ImagePreprocessing):
        self.engine, self.steps = engine, steps

    def _run(self, images, batch_size: int, head) -> tuple[list[torch.Tensor], EncodeStats]:
        t0 = time.perf_counter()
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise ValueError("the list of images is empty; pass at least one image")
        args, plan = self.engine.args, self.engine.plan
        n_inputs, _ = _chunk_limit(plan, batch_size, args.n_tokens)
        n_inputs = min(n_inputs, max(1, ENCODE_CHUNK // args.n_tokens))
        spans = [(s, min(len(images), s + n_inputs)) for s in range(0, len(images), n_inputs)]
        stats = EncodeStats(inputs=len(images), tokens=len(images) * args.n_tokens,
                            padded_tokens=len(images) * args.n_tokens, chunks=len(spans))
        results: list[torch.Tensor] = []
        model, executor = self.engine.model, self.engine.executor
        for members in group_passes([(b - a, (b - a) * args.n_tokens) for a, b in spans], plan):
            pixels = [preprocess(list(images[a:b]), self.steps, args.n_channels) for a, b in (spans[c] for c in members)]
            with torch.inference_mode():
                hidden = [model.embed(p.to(self.engine.dtype)) for p in pixels]
                steps = [model.step_inputs(torch.arange(h.shape[1]).expand(h.shape[0], -1), None) for h in hidden]
                results.extend(executor.encode(hidden, steps, head=head))
            stats.passes += 1
        stats.seconds = time.perf_counter() - t0
        return results, stats

    def embed(self, images, batch_size: int = 32) -> tuple[torch.Tensor, EncodeStats]:
        """(vectors (N, D) float32: each image's CLS token after the final norm, figures)."""
        out, stats = self._run(images, batch_size, lambda m, h: m.head(h)[:, 0].float())
        return torch.cat(out), stats

    def classify(self, images, top_k: int = 5, batch_size: int = 32) -> tuple[list[list[tuple[str, float]]], EncodeStats]:
        """(for each image its top_k (label, probability) pairs, most likely first; figures).
        Raises ValueError for a model without a classifier head or top_k < 1."""
        labels = self.engine.args.labels
        if not labels:
            raise ValueError(f"{self.engine.spec.path} has no classifier head (a ViTModel checkpoint): it can embed "
                             "images but not classify them")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        out, stats = self._run(images, batch_size, lambda m, h: m.classify(m.head(h)).float())
        probs = torch.softmax(torch.cat(out), dim=-1)                      # (N, n_labels)
        top = probs.topk(min(top_k, probs.shape[1]), dim=-1)
        return [[(labels[i], p) for p, i in zip(ps.tolist(), idx.tolist())]
                for ps, idx in zip(top.values, top.indices)], stats


def capabilities(arch, args, chat_template: bool) -> list[str]:
    """What a model of architecture module `arch` with ModelArgs `args` can do: "completion"
    (and "chat" with a chat template) for decoders; "embeddings" (of texts) for the BERT family;
    "image_embeddings" (and "classification" with a classifier head) for ViT."""
    from .. import models

    if arch.__name__.rsplit(".", 1)[-1] not in models.ENCODERS:
        return ["completion", "chat"] if chat_template else ["completion"]
    if hasattr(args, "image_size"):
        return ["image_embeddings", "classification"] if getattr(args, "labels", ()) else ["image_embeddings"]
    return ["embeddings"]


def encoder_for(engine, tokenizer) -> TextEncoder | ImageEncoder:
    """The encoder runner of an encoder engine, with the pooling (sentence-transformers files or
    GGUF pooling_type) or image preprocessing (preprocessor_config.json, or the GGUF's copy of it)
    its checkpoint declares; warns where it declares none and a default is used."""
    ckpt = engine.checkpoint
    if hasattr(engine.args, "image_size"):
        if ckpt.format == "gguf":
            steps = preprocessing_of_gguf(ckpt.architecture, ckpt.config, engine.args.image_size)
        else:
            steps = preprocessing_of_folder(ckpt.path, engine.args.image_size)
        return ImageEncoder(engine, steps)
    if ckpt.format == "gguf":
        sentence = sentence_config_of_gguf(ckpt.architecture, ckpt.config)
    else:
        sentence = sentence_config_of_folder(ckpt.path)
    return TextEncoder(engine, tokenizer, sentence)
