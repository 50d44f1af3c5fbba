"""Train the byte-level BPE tokenizer of pipeload's built-in models, then encode the corpus.

* Model: BPE over bytes (GPT-2 style ``ByteLevel`` pre-tokenizer and decoder,
  ``add_prefix_space=False``, GPT-2 split regex), vocabulary 4096 by default.
* Special tokens, with fixed ids: ``<|endoftext|>`` = 0 (BOS, EOS and document
  separator), ``<|im_start|>`` = 1 and ``<|im_end|>`` = 2 (ChatML).
* ``tokenizer.json`` has a post-processor that prepends ``<|endoftext|>`` when special
  tokens are requested (HF "add_bos_token" behaviour, like Llama 3 tokenizers), and
  ``tokenizer_config.json`` says so (``add_bos_token: true``) and carries a ChatML
  ``chat_template``.
* Trained on the *train* split only.  The BPE trainer of ``tokenizers`` is
  deterministic for a fixed input order (checked by ``--check-determinism``).

Then the corpus is encoded as one token stream per split,
``<|endoftext|> doc1 <|endoftext|> doc2 ... <|endoftext|>``, stored as uint16 arrays
(``train.bin`` / ``heldout.bin`` in the corpus directory) with ``tokens.json`` holding
counts and bytes/token.

Usage:  python training/train_tokenizer.py [--corpus DIR] [--out DIR] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_CORPUS = "/work/cache/builtin-train/corpus"
DEFAULT_OUT = "/work/cache/builtin-train/tokenizer"

EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIALS = [EOT, IM_START, IM_END]

# ChatML.  Like Llama 3 templates it emits the BOS token itself, so render it and
# tokenize with add_special_tokens=False (which is what transformers'
# apply_chat_template does).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_docs(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def train(corpus: Path, vocab_size: int, min_frequency: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIALS,  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes
        show_progress=False,
    )
    tok.train_from_iterator(read_docs(corpus / "train.jsonl"), trainer=trainer)
    eot_id = tok.token_to_id(EOT)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2], "special token ids moved"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{EOT} $A",
            pair=f"{EOT} $A {EOT} $B:1",
            special_tokens=[(EOT, eot_id)],
        ),
    ])
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    added = {}
    for i, s in enumerate(SPECIALS):
        added[str(i)] = {"content": s, "lstrip": False, "rstrip": False, "normalized": False,
                         "single_word": False, "special": True}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": None,
        "pad_token": EOT,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
    }


def encode_split(tok: Tokenizer, jsonl: Path, out_bin: Path) -> dict:
    eot = tok.token_to_id(EOT)
    docs = list(read_docs(jsonl))
    stream = [eot]
    nbytes = 0
    for enc, text in zip(tok.encode_batch(docs, add_special_tokens=False), docs):
        stream.extend(enc.ids)
        stream.append(eot)
        nbytes += len(text.encode("utf-8"))
    arr = np.asarray(stream, dtype=np.uint16)
    arr.tofile(out_bin)
    n_text_tokens = len(stream) - len(docs) - 1
    return {"docs": len(docs), "bytes": nbytes, "tokens": int(arr.size),
            "text_tokens": n_text_tokens, "bytes_per_text_token": nbytes / n_text_tokens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=DEFAULT_CORPUS)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--min-frequency", type=int, default=2)
    ap.add_argument("--model-max-length", type=int, default=512)
    ap.add_argument("--check-determinism", action="store_true", help="train twice and compare")
    args = ap.parse_args(argv)
    corpus, out = Path(args.corpus), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    tok = train(corpus, args.vocab_size, args.min_frequency)
    js = tok.to_str(pretty=True)
    if args.check_determinism:
        js2 = train(corpus, args.vocab_size, args.min_frequency).to_str(pretty=True)
        assert js == js2, "BPE training is not deterministic"
        print("determinism check: two trainings gave identical tokenizer.json")
    (out / "tokenizer.json").write_text(js + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(args.model_max_length), indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
        "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")
    print(f"vocab size {tok.get_vocab_size()}  sha256(tokenizer.json)="
          f"{hashlib.sha256(js.encode()).hexdigest()[:16]}")

    stats = {"vocab_size": tok.get_vocab_size()}
    for split in ("train", "heldout"):
        stats[split] = encode_split(tok, corpus / f"{split}.jsonl", corpus / f"{split}.bin")
        s = stats[split]
        print(f"{split:8s} docs={s['docs']:4d} bytes={s['bytes']:,} tokens={s['tokens']:,} "
              f"bytes/token={s['bytes_per_text_token']:.3f}")
    (corpus / "tokens.json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
