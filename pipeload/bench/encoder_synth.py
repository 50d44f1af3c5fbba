"""Synthetic encoders for `pipeload bench encoders`: BERT-base and ViT-Base/16 shapes with random
weights, saved as Hugging Face folders (float32 safetensors, as those models are published).

The BERT folder carries all-MiniLM-L6-v2's WordPiece tokenizer (BERT-base's uncased vocabulary,
30522 tokens) and a sentence-transformers mean-pooling configuration; the ViT folder has 1000
classes and transformers' ViT preprocessing (224 x 224, mean = std = 0.5).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _finish(model, folder: Path, seed: int) -> Path:
    """Randomise `model` and save it beside `folder` (FOLDER.partial, renamed by the caller when complete)."""
    torch.manual_seed(seed)
    with torch.no_grad():  # trained-like spread: LayerNorms near 1, matrices N(0, 0.02)
        for name, p in model.named_parameters():
            if p.dim() == 1 and "layernorm" in name.lower():
                p.uniform_(0.9, 1.1)
            else:
                p.normal_(0.0, 0.02)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    return tmp


def write_bert_base_shape(folder: Path, minilm: Path, seed: int = 0) -> Path:
    """A BERT-base-shaped BertModel (768 wide, 12 layers, 110M parameters) with random weights in
    `folder` (written once; an existing folder is kept)."""
    import transformers as tf

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    tmp = _finish(tf.BertModel(tf.BertConfig(), add_pooling_layer=False).eval(), folder, seed)
    for name in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm / name, tmp / name)
    (tmp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 768,
                                                              "pooling_mode_mean_tokens": True}))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    tmp.rename(folder)
    return folder


def write_vit_base_shape(folder: Path, seed: int = 0) -> Path:
    """A ViT-Base/16-shaped ViTForImageClassification (224 x 224, 1000 classes, 86M parameters)
    with random weights in `folder` (written once)."""
    import transformers as tf

    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return folder
    labels = {i: f"class {i}" for i in range(1000)}
    cfg = tf.ViTConfig(num_labels=1000, id2label=labels, label2id={v: k for k, v in labels.items()})
    tmp = _finish(tf.ViTForImageClassification(cfg).eval(), folder, seed)
    (tmp / "preprocessor_config.json").write_text(json.dumps({
        "do_resize": True, "size": {"height": 224, "width": 224}, "resample": 2, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "ViTImageProcessor"}))
    tmp.rename(folder)
    return folder
