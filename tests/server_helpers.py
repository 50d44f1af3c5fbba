"""Helpers for the server tests: a tiny chat model with a real tokenizer, and a real server process.

The chat model is a tiny random-weight Llama with a byte-level BPE tokenizer trained here on a few
sentences and a ChatML template, converted to GGUF by pipeload's own converter (which embeds the
tokenizer), so the server sees the same kind of file as the built-in model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "def fibonacci(n): return n if n < 2 else fibonacci(n - 1)",
    "Pipeline parallelism splits the layers of a model over several machines.",
    "Hello, world! How are you today? I am fine, thank you.", "Streaming weights from disk keeps memory small.",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)", "Ünïcödé text: café, naïve, 日本語, emoji 🙂.",
]


def build_chat_model(folder: Path, seed: int = 0, vocab_size: int = 384, context: int = 4096) -> Path:
    """A tiny Llama + BPE tokenizer + chat template as an HF folder and a GGUF file; returns the GGUF path."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeload.convert import convert

    hf = folder / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0], "eos_token": SPECIALS[0],
        "add_bos_token": True, "chat_template": CHATML,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                          "normalized": False, "single_word": False}
                                 for i, t in enumerate(SPECIALS)}}))
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.15)
    model.save_pretrained(hf, safe_serialization=True)
    out = folder / "chat.gguf"
    convert(hf, out, quant="f32")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`pipeload serve ARGS` on a free loopback port, as a real subprocess."""

    def __init__(self, *args: str, startup_timeout: float = 60.0, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log_path = log
        self._log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeload.cli", "serve", *args, "--port", str(self.port),
                                      "--threads", "1", "--log-level", "warning"],
                                     cwd=ROOT, env=env, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at startup: {self.log_text()}")
            try:
                httpx.get(self.url + "/v1/models", timeout=1.0)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"server did not start within {startup_timeout} s: {self.log_text()}")
                time.sleep(0.1)

    def log_text(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path else "(no log)"

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def model(self, name: str) -> dict:
        return self.health()["models"][name]

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> dict:
        """Poll /health until predicate(health) holds; returns that health body."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if predicate(h):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last /health: {h}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (drain), SIGKILL if it hangs; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


_BUILT: dict[int, Path] = {}


def chat_model(seed: int = 0) -> Path:
    """The tiny chat model for `seed`, built once per test session in a temporary folder."""
    import atexit
    import shutil
    import tempfile

    if seed not in _BUILT:
        folder = Path(tempfile.mkdtemp(prefix=f"pipeload-chat{seed}-"))
        atexit.register(shutil.rmtree, folder, True)
        _BUILT[seed] = build_chat_model(folder, seed=seed)
    return _BUILT[seed]
