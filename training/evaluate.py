"""Evaluate and sample pipeload's built-in models.

``eval``    held-out perplexity per token and bits per UTF-8 byte::

                python training/evaluate.py eval /work/cache/builtin-train/main

            The token stream ``<|endoftext|> doc <|endoftext|> doc ...`` of a split is
            scored with a sliding window (context = the model's ``max_position_embeddings``,
            stride = half of it, so every scored token after the first window sees at least
            ctx/2 tokens of context).  Every token except the very first is predicted,
            including the ``<|endoftext|>`` that ends each document.  Bits per byte =
            total NLL in bits / number of UTF-8 bytes those tokens stand for (special
            tokens count 0 bytes), so it can be compared across tokenizers.

``sample``  greedy and sampled continuations through ``transformers``' ``generate``::

                python training/evaluate.py sample /work/cache/builtin-train/main
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_model.py

import numpy as np
import torch

CACHE = Path("/work/cache/builtin-train")
DEFAULT_CORPUS = CACHE / "corpus"

PROMPTS = [
    "def fibonacci(n):",
    "import os\n",
    "class Stack:",
    "def read_config(path):\n    \"\"\"",
    "for i in range(10):",
]


def token_byte_lengths(tokenizer_json: Path) -> np.ndarray:
    """UTF-8 bytes each token id stands for (byte-level BPE: one char = one byte)."""
    tj = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    n = max(max(vocab.values()), max(t["id"] for t in tj["added_tokens"])) + 1
    lens = np.zeros(n, dtype=np.int64)
    for tok, i in vocab.items():
        lens[i] = len(tok)
    for t in tj["added_tokens"]:
        if t["special"]:
            lens[t["id"]] = 0
    return lens


@torch.no_grad()
def evaluate_stream(model, corpus: Path, split: str, ctx: int | None = None,
                    max_tokens: int | None = None, batch: int = 8,
                    tokenizer_json: Path | None = None) -> dict:
    ctx = ctx or model.config.max_position_embeddings
    data = np.fromfile(Path(corpus) / f"{split}.bin", dtype=np.uint16).astype(np.int64)
    if max_tokens:
        data = data[:max_tokens]
    n = len(data)
    stride = ctx // 2
    tokenizer_json = tokenizer_json or (CACHE / "tokenizer" / "tokenizer.json")
    blen = token_byte_lengths(tokenizer_json)

    # windows [begin, begin+ctx); window k scores targets in [score_from, end)
    windows = []
    prev_end = 1  # token 0 is never predicted
    begin = 0
    while prev_end < n:
        end = min(begin + ctx, n)
        windows.append((begin, end, prev_end))
        prev_end = end
        begin += stride
    was_training = model.training
    model.eval()
    nll_sum, n_tok = 0.0, 0
    for i in range(0, len(windows), batch):
        group = windows[i:i + batch]
        L = max(e - b for b, e, _ in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        for r, (b, e, _) in enumerate(group):
            x[r, :e - b] = torch.from_numpy(data[b:e])
        logits = model(input_ids=x).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = x[:, 1:]
        tok_nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # predicts position j+1
        for r, (b, e, s) in enumerate(group):
            # target positions s..e-1 -> rows (s-b-1)..(e-b-2)
            nll_sum += tok_nll[r, s - b - 1:e - b - 1].double().sum().item()
            n_tok += e - s
    if was_training:
        model.train()
    n_bytes = int(blen[data[1:]].sum())
    mean = nll_sum / n_tok
    return {"split": split, "tokens_scored": n_tok, "bytes": n_bytes, "ctx": ctx, "stride": stride,
            "loss": mean, "perplexity": math.exp(mean),
            "bits_per_byte": nll_sum / math.log(2) / n_bytes,
            "bytes_per_token": n_bytes / n_tok}


def load(model_dir: str):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok


@torch.no_grad()
def samples(model, tok, prompts=PROMPTS, max_new_tokens=80, seed=0, n_sampled=1,
            temperature=0.8, top_p=0.95) -> list[dict]:
    out = []
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt")  # adds <|endoftext|> as BOS
        assert enc["input_ids"][0, 0].item() == tok.bos_token_id
        n_in = enc["input_ids"].shape[1]
        g = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)
        rec = {"prompt": prompt, "greedy": tok.decode(g[0, n_in:], skip_special_tokens=False)}
        rec["sampled"] = []
        for k in range(n_sampled):
            torch.manual_seed(seed + k)
            s = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                               temperature=temperature, top_p=top_p, top_k=0,
                               pad_token_id=tok.eos_token_id)
            rec["sampled"].append(tok.decode(s[0, n_in:], skip_special_tokens=False))
        out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("model_dir")
    e.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    e.add_argument("--split", nargs="+", default=["heldout"])
    e.add_argument("--max-tokens", type=int)
    s = sub.add_parser("sample")
    s.add_argument("model_dir")
    s.add_argument("--max-new-tokens", type=int, default=80)
    s.add_argument("--n-sampled", type=int, default=2)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--prompt", action="append", help="(repeatable) default: built-in prompts")
    s.add_argument("--json", help="also write the samples to this file")
    for p in (e, s):
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load(args.model_dir)

    if args.cmd == "eval":
        for split in args.split:
            r = evaluate_stream(model, Path(args.corpus), split, max_tokens=args.max_tokens,
                                tokenizer_json=Path(args.model_dir) / "tokenizer.json")
            print(json.dumps(r))
        return 0

    prompts = [p.encode().decode("unicode_escape") for p in args.prompt] if args.prompt else PROMPTS
    recs = samples(model, tok, prompts, args.max_new_tokens, n_sampled=args.n_sampled,
                   temperature=args.temperature)
    for r in recs:
        print("=" * 72)
        print(f"PROMPT: {r['prompt']!r}")
        print("--- greedy ---")
        print(r["prompt"] + r["greedy"])
        for i, t in enumerate(r["sampled"]):
            print(f"--- sampled #{i} (T={args.temperature}, top_p=0.95, seed={i}) ---")
            print(r["prompt"] + t)
    if args.json:
        Path(args.json).write_text(json.dumps(recs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
