"""Record llama.cpp's reference values for the real-model tests (tests/test_real_models.py).

For each GGUF of the small set (`../shared/models/fetch.sh DEST small`) this writes
tests/data/real_models/<file stem>.json with, all computed by llama.cpp (llama-cpp-python):

- `tokenization`: the token ids of a fixed corpus (code, prose, unicode, runs of spaces and
  newlines, special tokens), tokenized with special tokens parsed and no BOS added;
- `scoring`: the token ids of a fixed ~450-token text, and per position the argmax and the
  log-probability of the actual next token (so top-1 agreement and perplexity can be compared);
- `chats`: three conversations, their prompt ids (rendered by transformers' apply_chat_template
  from the GGUF's tokenizer.chat_template, tokenized by llama.cpp), the first 16 greedy tokens
  and llama.cpp's top-two logit margin at each of those positions, both as it decodes token by
  token and as it scores the prompt and answer in one pass.

    PYTHONPATH=$PWD python scripts/record_llama_cpp_reference.py [--models DIR]

Rerun it only when the corpus or the model set changes; the test re-checks a slice live against
llama.cpp when llama-cpp-python is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np

MODELS = ["smollm2-135m-instruct-q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "real_models"
GREEDY_TOKENS = 16

CORPUS = [
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. It wasn't the dog's fault; they'd both been up late.",
    "Café naïve façade — 日本語のテキスト, 中文字符, Ελληνικά, русский текст, العربية, emoji 🙂👍🏽🚀.",
    "a    b\n\n\n\tc   \n    \n\n\n\n        x  \t\t y",
    "   leading spaces and trailing spaces   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after an end token",
    "3.14159 1234567890 2026-12-03 0x1F $12,345.67 100% i++ a->b && c || !d",
    "https://example.com/path?q=1&r=two#frag user@example.org",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
]

SCORING_TEXT = '''import json
from pathlib import Path


def load_config(path: str) -> dict:
    """Read a JSON configuration file and fill in the defaults."""
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config.setdefault("batch_size", 32)
    config.setdefault("learning_rate", 3e-4)
    return config


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, word):
        self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, k=10):
        return sorted(self.counts.items(), key=lambda item: -item[1])[:k]


if __name__ == "__main__":
    counter = Counter()
    for line in Path("words.txt").read_text().splitlines():
        for word in line.split():
            counter.add(word.lower())
    print(counter.most_common(5))

The history of the bicycle begins in the early nineteenth century, when inventors in Europe
built wooden machines that riders pushed along with their feet. Pedals attached to the front
wheel came decades later, and the chain drive that turns the rear wheel made the modern design
possible. By the end of the century, bicycles had become cheap enough for ordinary workers, and
they changed how people lived: a worker could live farther from the factory, and young people
could travel to nearby towns without a horse. Cycling clubs campaigned for better roads long
before cars arrived, and many of the first paved country roads were built because of them.
Today, cities around the world are building protected bike lanes again, because a bicycle is
still one of the most efficient ways to move a person over short distances.
'''

CHATS = [
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Explain what a hash table is to a beginner."}],
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of (T, V) logits, in float64."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def render_chats(path: Path) -> list[str]:
    """The prompts transformers' apply_chat_template renders from the GGUF's chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) for messages in CHATS]


def greedy(llm, prompt_ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """llama.cpp's first n greedy tokens after prompt_ids (fewer if it ends the answer) and its
    top-two logit margin at each step."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt_ids)
    tokens, margins = [], []
    for _ in range(n):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)  # (V,)
        top2 = np.argsort(logits)[-2:]
        tokens.append(int(top2[1]))
        margins.append(round(float(logits[top2[1]] - logits[top2[0]]), 4))
        if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm._model.model), tokens[-1]):
            break  # an end-of-generation token: pipeload stops there too
        llm.eval([tokens[-1]])
    return tokens, margins


def batch_margins(llm, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """llama.cpp's top-two logit margin at each greedy position when the prompt and the answer
    are scored in one pass instead of token by token. llama.cpp's two paths round differently
    (8-bit activations, f16 KV cache), and where they disagree by more than the margin, even
    llama.cpp does not settle which token is first."""
    llm.reset()
    llm.eval(prompt_ids + tokens[:-1])
    logits = np.array(llm.scores[len(prompt_ids) - 1:len(prompt_ids) - 1 + len(tokens)], dtype=np.float64)
    top2 = np.sort(logits, axis=-1)[:, -2:]                                     # (n, 2)
    return [round(float(v), 4) for v in top2[:, 1] - top2[:, 0]]


def record(path: Path) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=os.cpu_count() or 2,
                          seed=0)
    tokenize = lambda text: llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # noqa: E731
    tokenization = [{"text": text, "ids": tokenize(text)} for text in CORPUS]

    ids = tokenize(SCORING_TEXT)
    llm.reset()
    llm.eval(ids)
    logp = log_softmax(np.array(llm.scores[:len(ids)]))                       # (T, V)
    target = np.array(ids[1:])
    target_logprob = logp[np.arange(len(ids) - 1), target]                      # (T-1,)
    scoring = {"text": SCORING_TEXT, "ids": ids,
               "argmax": logp[:-1].argmax(-1).tolist(),
               "target_logprob": [round(float(v), 5) for v in target_logprob],
               "perplexity": float(np.exp(-target_logprob.mean()))}

    chats = []
    for messages, prompt in zip(CHATS, render_chats(path)):
        prompt_ids = tokenize(prompt)
        tokens, margins = greedy(llm, prompt_ids, GREEDY_TOKENS)
        chats.append({"messages": messages, "prompt": prompt, "prompt_ids": prompt_ids,
                      "greedy": tokens, "top2_margin": margins,
                      "top2_margin_one_pass": batch_margins(llm, prompt_ids, tokens)})
    return {"model": path.name, "sha256": sha256(path), "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_settings": "n_ctx=1024, default f16 KV cache, no BOS added, special tokens parsed",
            "tokenization": tokenization, "scoring": scoring, "chats": chats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=os.environ.get("PIPELOAD_MODELS")
                        or str(Path.home() / ".cache" / "pipeload" / "models"))
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        data = record(Path(args.models) / name)
        out = OUT / (Path(name).stem + ".json")
        out.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        print(f"{out}: {len(data['scoring']['ids'])} scored tokens, ppl {data['scoring']['perplexity']:.4f}, "
              f"{out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
