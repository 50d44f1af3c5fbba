"""`pipeload embed` and `pipeload classify`: thin consumers of PipelineModel.embed / classify.

    pipeload embed MODEL [FILE|-] [-o out.jsonl]     text models: one text per line (blank lines skipped)
    pipeload embed MODEL IMAGE... [-o out.jsonl]     image models (ViT): one vector per image
    pipeload classify MODEL IMAGE... [--top-k 5]     image classifiers: labels and probabilities

Each output line is one JSON object: {"index", "input", "embedding"} or {"index", "input", "labels"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .runtime.memory import PREFETCH_DEPTH


def _load(a: argparse.Namespace):
    from .api import PipelineModel

    return PipelineModel.from_pretrained(a.model, memory_limit=a.memory_limit, prefetch_depth=a.prefetch_depth,
                                         dtype=a.dtype, threads=a.threads, batch_size=a.batch_size)


def _read_texts(source: str) -> list[str]:
    """The non-blank lines of a file, or of stdin for '-'; raises ValueError naming an unreadable file."""
    if source == "-":
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{source}: no such file (give a text file with one input per line, or - for stdin)")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise ValueError(f"{'stdin' if source == '-' else source} has no non-blank line to embed")
    return texts


def _output(path: str | None):
    return sys.stdout if path in (None, "-") else open(path, "w", encoding="utf-8")


def _figures(model) -> str:
    from .runtime.memory import format_bytes, peak_rss

    s = model.stats
    return (f"{s['inputs']} inputs in {s['seconds']:.2f} s ({s['inputs_per_s']:.1f}/s), {s['passes']} passes over "
            f"the weights, peak RSS {format_bytes(peak_rss())}")


def cmd_embed(a: argparse.Namespace) -> int:
    model = _load(a)
    try:
        image_model = "image_embeddings" in model.capabilities
        if not image_model and "embeddings" not in model.capabilities:
            raise ValueError(f"{a.model} cannot embed (it can: {', '.join(model.capabilities)})")
        if image_model:
            if not a.inputs:
                raise ValueError("an image model embeds images: give their paths after the model")
            inputs = list(a.inputs)
            vectors = model.embed(inputs, batch_size=a.batch_size or 32)
        else:
            if len(a.inputs) > 1:
                raise ValueError(f"a text model reads one file of texts (one per line) or - for stdin; got "
                                 f"{len(a.inputs)} arguments")
            inputs = _read_texts(a.inputs[0] if a.inputs else "-")
            vectors = model.embed(inputs, batch_size=a.batch_size or 32, truncate=not a.no_truncate,
                                  normalize=False if a.no_normalize else None)
        out = _output(a.output)
        try:
            for i, (item, v) in enumerate(zip(inputs, vectors.tolist())):
                out.write(json.dumps({"index": i, "input": str(item), "embedding": v}) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{vectors.shape[0]} vectors of {vectors.shape[1]} dimensions"
              + (f" written to {a.output}" if a.output not in (None, "-") else "") + "; " + _figures(model),
              file=sys.stderr)
    finally:
        model.close()
    return 0


def cmd_classify(a: argparse.Namespace) -> int:
    model = _load(a)
    try:
        answers = model.classify(list(a.images), top_k=a.top_k, batch_size=a.batch_size or 32)
        out = _output(a.output)
        try:
            for i, (image, labels) in enumerate(zip(a.images, answers)):
                if a.json or a.output not in (None, "-"):
                    out.write(json.dumps({"index": i, "input": image,
                                          "labels": [{"label": k, "probability": p} for k, p in labels]}) + "\n")
                else:
                    out.write(f"{image}: " + ", ".join(f"{k} ({p:.3f})" for k, p in labels) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        print(_figures(model), file=sys.stderr)
    finally:
        model.close()
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import _add_model_options

    _add_model_options(p)
    p.add_argument("--memory-limit", default=None, help="peak memory budget, e.g. 200MB (default: none, all resident)")
    p.add_argument("--prefetch-depth", type=int, default=PREFETCH_DEPTH, help=f"streamed layer groups read ahead (default {PREFETCH_DEPTH})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="inputs per batch; under a memory limit also what one pass over the weights serves (default 32)")
    p.add_argument("-o", "--output", default=None, help="write the JSON lines here (default: stdout)")


def add_parsers(sub) -> None:
    p = sub.add_parser("embed", help="vectors of texts (BERT family) or images (ViT), one JSON line each")
    p.add_argument("model", help="HF folder or GGUF file of an encoder")
    p.add_argument("inputs", nargs="*", help="text model: a file with one text per line, or - for stdin (default); "
                                             "image model: image files")
    p.add_argument("--no-normalize", action="store_true", help="do not normalise the vectors (default: as the "
                                                               "model's sentence-transformers modules.json says)")
    p.add_argument("--no-truncate", action="store_true", help="refuse texts longer than the model takes "
                                                              "(default: cut them, with a warning)")
    _common(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("classify", help="the most likely labels of images (ViT image classifiers)")
    p.add_argument("model", help="HF folder or GGUF file of a ViT / DeiT image classifier")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--json", action="store_true", help="JSON lines instead of text (the default with -o)")
    _common(p)
    p.set_defaults(func=cmd_classify)
