"""Tiny random encoders (BERT, RoBERTa, XLM-R, ViT, DeiT) saved as HF folders, and GGUF files of
them written by llama.cpp's own converter.

The converter (`convert_hf_to_gguf.py` with its gguf-py) comes from the llama-cpp-python 0.3.36
source package, fetched once with `pip download` into ~/.cache/pipeload/llama-cpp-src
($PIPELOAD_LLAMA_CPP_SRC) and run as a subprocess: none of its code is in this repository.

BERT and RoBERTa folders carry all-MiniLM-L6-v2's WordPiece vocabulary (the converter recognises
its tokenizer; a random one it refuses), so their vocabulary has 30522 rows.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

LLAMA_CPP_VERSION = "0.3.36"
MINILM = Path(os.environ.get("PIPELOAD_MODELS") or Path.home() / ".cache" / "pipeload" / "models") / "all-minilm-l6-v2"
TEXT_KINDS = ["bert", "roberta", "xlm-roberta"]
IMAGE_KINDS = ["vit", "vit-model", "deit"]


def _text_config(kind: str, **kw):
    import transformers as tf

    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                max_position_embeddings=40, layer_norm_eps=1e-12)
    base.update(kw)
    if kind == "bert":
        return tf.BertConfig(vocab_size=30522, type_vocab_size=2, **base)
    if kind == "roberta":  # positions start at pad + 1 = 2; one token type
        return tf.RobertaConfig(vocab_size=30522, type_vocab_size=1, pad_token_id=1,
                                **{**base, "max_position_embeddings": base["max_position_embeddings"] + 2})
    if kind == "xlm-roberta":
        return tf.XLMRobertaConfig(vocab_size=kw.pop("vocab_size", 252), type_vocab_size=1, pad_token_id=1,
                                   **{**base, "max_position_embeddings": base["max_position_embeddings"] + 2})
    raise ValueError(kind)


def _randomise(model, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():  # larger-than-init weights so that outputs differ clearly between inputs
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("LayerNorm" in name or "layernorm" in name):
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)


def build_text_encoder(kind: str, folder: Path, seed: int = 0, **config):
    """A tiny random BertModel / RobertaModel / XLMRobertaModel saved in `folder` with a tokenizer;
    returns the transformers model (eval mode, eager float32)."""
    import transformers as tf

    cfg = _text_config(kind, **config)
    cls = {"bert": tf.BertModel, "roberta": tf.RobertaModel, "xlm-roberta": tf.XLMRobertaModel}[kind]
    model = cls(cfg).eval()
    _randomise(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    folder = Path(folder)
    if kind == "xlm-roberta":
        _write_unigram_tokenizer(folder)
    else:
        for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(MINILM / name, folder / name)
        if kind == "bert":
            shutil.copy(MINILM / "tokenizer.json", folder / "tokenizer.json")
        # RoBERTa: WordPiece through vocab.txt only, so the converter takes its BERT vocabulary
        # path (with a tokenizer.json it would ask for a byte-level BPE it recognises)
    return model


def _write_unigram_tokenizer(folder: Path) -> None:
    """A SentencePiece unigram model (sentencepiece.bpe.model, as XLM-R ships it) trained on a
    few sentences, and the tokenizer.json transformers derives from it."""
    import sentencepiece as spm
    import transformers as tf

    text = folder / "train.txt"
    docs = [line for mod in (collections, json, os, re)  # their docstrings: varied English
            for obj in [mod, *(getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_"))]
            for line in (getattr(obj, "__doc__", None) or "").splitlines() if line.strip()]
    text.write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sentencepiece.bpe"), vocab_size=250,
                                   hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
                                   minloglevel=2)  # ids as XLM-R's own: <unk> 0, <s> 1, </s> 2
    text.unlink()
    (folder / "sentencepiece.bpe.vocab").unlink()
    tf.AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # tokenizer.json (fairseq id order)


def build_image_encoder(kind: str, folder: Path, seed: int = 0, **config):
    """A tiny random ViTForImageClassification ("vit"), ViTModel ("vit-model") or
    DeiTForImageClassificationWithTeacher ("deit") with its preprocessor_config.json; returns the
    transformers model (eval, float32)."""
    import transformers as tf

    base = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, image_size=32,
                patch_size=8, layer_norm_eps=1e-12, num_labels=7,
                id2label={i: f"class {i}" for i in range(7)}, label2id={f"class {i}": i for i in range(7)})
    base.update(config)
    if kind == "vit":
        model = tf.ViTForImageClassification(tf.ViTConfig(**base))
        prep = {"do_resize": True, "size": {"height": base["image_size"], "width": base["image_size"]},
                "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "ViTImageProcessor"}
    elif kind == "vit-model":
        model = tf.ViTModel(tf.ViTConfig(**base))
        prep = None
    elif kind == "deit":
        model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**base))
        s = base["image_size"]
        prep = {"do_resize": True, "size": {"height": s + 8, "width": s + 8}, "resample": 3, "do_center_crop": True,
                "crop_size": {"height": s, "width": s}, "do_rescale": True, "rescale_factor": 1 / 255,
                "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                "image_processor_type": "DeiTImageProcessor"}
    else:
        raise ValueError(kind)
    model = model.eval()
    _randomise(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    if prep is not None:
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(prep), encoding="utf-8")
    return model


# ---------------------------------------------------------------------------------------------
# llama.cpp's converter


def llama_cpp_source() -> Path:
    """The vendored llama.cpp folder of the llama-cpp-python source package (fetched once)."""
    root = Path(os.environ.get("PIPELOAD_LLAMA_CPP_SRC") or Path.home() / ".cache" / "pipeload" / "llama-cpp-src")
    src = root / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    root.mkdir(parents=True, exist_ok=True)
    for cmd in ([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(root)],
                ["tar", "xzf", str(root / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"), "-C", str(root)]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-2000:]}")
    return src


def llama_cpp_convert(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """`out`, written by llama.cpp's convert_hf_to_gguf.py from the HF `folder`; raises
    RuntimeError with the converter's output when it refuses."""
    src = llama_cpp_source()
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"llama.cpp's converter failed on {folder}:\n{(done.stdout + done.stderr)[-3000:]}")
    return Path(out)


# ---------------------------------------------------------------------------------------------
# Texts for the real MiniLM

_HANDWRITTEN = [
    "The cat sat on the mat.", "A man is playing a guitar on the street.", "It's raining cats and dogs!",
    "Quantum entanglement links particles across distance.", "How do I reset my password?",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "the quick brown fox jumps over the lazy dog",
    "Café, naïve, résumé, jalapeño and Zürich.", "日本語のテキストです。東京は大きい都市です。", "中文文本测试，你好世界！",
    "한국어 텍스트 안녕하세요", "Ελληνικά και русский текст в одном предложении.", "مرحبا بالعالم",
    "Emoji 😀🎉👍🏽 and more emoji 🦙🚀", "Prices rose 3.5% to $1,234.56 on 2024-03-17.", "a", "?", "OK",
    "def quicksort(xs): return xs if len(xs) < 2 else quicksort([x for x in xs[1:] if x < xs[0]])",
    "Visit https://example.com/path?query=1&x=y#frag for details.", "e-mail me at someone@example.org",
    "Tabs\tand\tnewlines\nin\none text.", "   leading and trailing spaces   ", "!!!??? ... --- ***",
    "I like apples. I like oranges. I like bananas. I do not like grapes.",
    "To be, or not to be, that is the question.", "Machine learning models can be compressed by quantization.",
    "The Eiffel Tower is in Paris.", "Paris is the capital of France.", "Berlin is the capital of Germany.",
]


def varied_sentences(n: int = 200) -> list[str]:
    """n texts of every kind: handwritten ones (several scripts, emoji, numbers, code, URLs, one
    character), first lines of the standard library's docstrings, paragraphs joined from them, and
    a few longer than MiniLM's 256-token limit (to compare truncation too). Deterministic."""
    import random

    docs = [line.strip() for mod in (collections, json, os, re)
            for obj in [mod, *(getattr(mod, name) for name in sorted(dir(mod)) if not name.startswith("_"))]
            for line in (getattr(obj, "__doc__", None) or "").splitlines() if len(line.strip()) > 20]
    docs = list(dict.fromkeys(docs))  # unique, in order
    rng = random.Random(0)
    texts = list(_HANDWRITTEN)
    paragraphs = [" ".join(rng.sample(docs, rng.randint(2, 12))) for _ in range(40)]
    long_ones = [" ".join(rng.sample(docs, 40)) for _ in range(4)]  # ~600 tokens each
    single = rng.sample(docs, n - len(texts) - len(paragraphs) - len(long_ones))
    texts += paragraphs + long_ones + single
    rng.shuffle(texts)
    return texts[:n]


def weights_fraction_budget(path, fraction: float, batch: int = 32, ctx: int | None = None) -> int:
    """A memory_limit leaving `fraction` of the weights' bytes for weights, beside what this
    process already uses (runtime/planner.py budget_for_weights)."""
    from pipeload.runtime.memory import current_rss
    from pipeload.runtime.planner import budget_for_weights
    from pipeload.runtime.spec import open_model

    spec = open_model(path)
    return budget_for_weights(spec, fraction, current_rss(), min(ctx or spec.args.context_length,
                                                                 spec.args.context_length), batch)
