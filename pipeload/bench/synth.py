"""Synthetic models: real architectures (Llama shapes) with random weights, written as GGUF fast.

Quantized tensors are generated directly as valid blocks (random quants, scales chosen so that
weights have a standard deviation of about `std`), so a 30 GB Q4_K_M file takes as long as writing
30 GB of random bytes. Tensors are written layer by layer, as llama.cpp's converter does.
Used by the tests (a model several times larger than the memory budget) and `pipeload bench`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFWriter

from ..weights.gguf_export import add_value


@dataclass(frozen=True)
class LlamaShape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab: int
    context: int = 4096

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SHAPES = {
    "tiny-256": LlamaShape(256, 4, 4, 2, 704, 4096, 1024),
    "1b": LlamaShape(2048, 22, 32, 4, 5632, 32000, 2048),        # TinyLlama 1.1B
    "7b": LlamaShape(4096, 32, 32, 32, 11008, 32000, 4096),      # Llama 2 7B
    "13b": LlamaShape(5120, 40, 40, 40, 13824, 32000, 4096),     # Llama 2 13B
    "70b": LlamaShape(8192, 80, 64, 8, 28672, 32000, 4096),      # Llama 2 70B (use n_layers to size it)
}

# llama.cpp's Q4_K_M and Q5_K_M mixes, simplified: attn_v and ffn_down in Q6_K for the first, last
# and every third layer (use_more_bits), everything else Q4_K (Q5_K); output Q6_K; token_embd as
# the rest. The other mixes are one type throughout.
_BASE = {"q4_k_m": T.Q4_K, "q5_k_m": T.Q5_K, "q8_0": T.Q8_0, "f16": T.F16, "bf16": T.BF16, "q4_0": T.Q4_0,
         "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K,
         "q2_k": T.Q2_K, "q3_k": T.Q3_K}
MIXES = set(_BASE)


def tensor_types(shape: LlamaShape, mix: str) -> dict[str, T]:
    """GGML type of each tensor name of the model for the given mix."""
    L = shape.n_layers

    def more_bits(i: int) -> bool:
        return i < L // 8 or i >= 7 * L // 8 or (i - L // 8) % 3 == 2

    types = {}
    base = _BASE[mix]
    types["token_embd.weight"] = base
    for i in range(L):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            t = base
            if mix in ("q4_k_m", "q5_k_m") and name in ("attn_v", "ffn_down") and more_bits(i):
                t = T.Q6_K
            types[f"blk.{i}.{name}.weight"] = t
        types[f"blk.{i}.attn_norm.weight"] = T.F32
        types[f"blk.{i}.ffn_norm.weight"] = T.F32
    types["output_norm.weight"] = T.F32
    types["output.weight"] = T.Q6_K if mix in ("q4_k_m", "q5_k_m") else base
    return types


def tensor_shapes(s: LlamaShape) -> dict[str, tuple[int, ...]]:
    """Torch-order shapes, in llama.cpp's writing order (embeddings, layer by layer, head)."""
    shapes = {"token_embd.weight": (s.vocab, s.dim)}
    kv = s.n_kv_heads * s.head_dim
    for i in range(s.n_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (s.dim,), f"blk.{i}.attn_q.weight": (s.dim, s.dim),
            f"blk.{i}.attn_k.weight": (kv, s.dim), f"blk.{i}.attn_v.weight": (kv, s.dim),
            f"blk.{i}.attn_output.weight": (s.dim, s.dim), f"blk.{i}.ffn_norm.weight": (s.dim,),
            f"blk.{i}.ffn_gate.weight": (s.ffn_dim, s.dim), f"blk.{i}.ffn_up.weight": (s.ffn_dim, s.dim),
            f"blk.{i}.ffn_down.weight": (s.dim, s.ffn_dim)})
    shapes["output_norm.weight"] = (s.dim,)
    shapes["output.weight"] = (s.vocab, s.dim)
    return shapes


def _f16(x: float) -> np.ndarray:
    return np.array([x], dtype=np.float16).view(np.uint8)


def random_tensor(rng: np.random.Generator, qtype: T, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Valid GGML bytes (or float array) of random weights with about this standard deviation."""
    n = int(np.prod(shape))
    if qtype == T.F32:
        return np.ones(shape, dtype=np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * std
    if qtype == T.F16:
        return (rng.standard_normal(shape, np.float32) * std).astype(np.float16)
    if qtype == T.BF16:  # the top half of float32 (truncated: a random weight needs no rounding)
        bits = (rng.standard_normal(shape, np.float32) * std).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(*shape[:-1], -1)
    block, size = GGML_QUANT_SIZES[qtype]
    nb = n // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    if qtype == T.Q8_0:           # q uniform in [-128, 127]: std ~ 74 d
        raw[:, 0:2] = _f16(std / 74)
    elif qtype in (T.Q4_0, T.Q5_0):  # (q - 8) or (q - 16) uniform: std ~ 4.6 d or 9.2 d
        raw[:, 0:2] = _f16(std / (4.6 if qtype == T.Q4_0 else 9.2))
    elif qtype in (T.Q4_1, T.Q5_1):  # d q + m, centred by m = -7.5 d (-15.5 d)
        spread, mid = (4.6, 7.5) if qtype == T.Q4_1 else (9.2, 15.5)
        raw[:, 0:2] = _f16(std / spread)
        raw[:, 2:4] = _f16(-mid * std / spread)
    elif qtype in (T.Q4_K, T.Q5_K):  # d*sc*q - dmin*m with sc = m = 32 + noise: centred
        spread, mid = (4.6, 7.5) if qtype == T.Q4_K else (9.2, 15.5)
        d = std / (spread * 40)
        raw[:, 0:2] = _f16(d)
        raw[:, 2:4] = _f16(mid * d)
        sc = rng.integers(32, 48, size=(nb, 8), dtype=np.uint8)
        raw[:, 4:8] = sc[:, :4]                                  # low 6 bits of sc 0-3, top bits 0
        raw[:, 8:12] = sc[:, :4]                                 # m 0-3 = sc 0-3
        raw[:, 12:16] = (sc[:, 4:] & 15) | ((sc[:, 4:] & 15) << 4)  # sc/m 4-7 low nibbles (high bits 0)
    elif qtype == T.Q6_K:         # d * sc * (q - 32), q uniform in 0..63: std ~ 18.5 d sc
        raw[:, 192:208] = rng.integers(8, 16, size=(nb, 16), dtype=np.uint8)
        raw[:, 208:210] = _f16(std / (18.5 * 12))
    elif qtype == T.Q2_K:         # d*sc*q - dmin*m, q in 0..3, sc = m in 8..15: centred by dmin = 1.5 d
        sc = rng.integers(8, 16, size=(nb, 16), dtype=np.uint8)
        raw[:, 0:16] = sc | (sc << 4)
        d = std / (1.12 * 11.5)
        raw[:, 80:82] = _f16(d)
        raw[:, 82:84] = _f16(1.5 * d)
    elif qtype == T.Q3_K:         # d * sc * (q - 4), q in 0..7: six-bit scales 40..47 (sc 8..15)
        lo = rng.integers(8, 16, size=(nb, 8), dtype=np.uint8)
        raw[:, 96:104] = lo | (lo << 4)
        raw[:, 104:108] = 0xAA                                   # top two bits 2 for every scale
        raw[:, 108:110] = _f16(std / (2.29 * 11.5))
    else:
        raise ValueError(f"no random generator for {qtype.name}")
    return raw.reshape(*shape[:-1], -1)


def write_synthetic_gguf(path: str | os.PathLike, shape: LlamaShape, mix: str = "q4_k_m", seed: int = 0,
                         std: float = 0.02, progress=None) -> Path:
    """Write a Llama-architecture GGUF with random weights; returns its path (written atomically)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes, types = tensor_shapes(shape), tensor_types(shape, mix)
    w = GGUFWriter(None, "llama")
    w.add_name(f"synthetic-{shape.dim}x{shape.n_layers}-{mix}")
    meta = {"context_length": shape.context, "embedding_length": shape.dim, "block_count": shape.n_layers,
            "feed_forward_length": shape.ffn_dim, "attention.head_count": shape.n_heads,
            "attention.head_count_kv": shape.n_kv_heads, "attention.layer_norm_rms_epsilon": 1e-5,
            "rope.freq_base": 10000.0, "rope.dimension_count": shape.head_dim}
    for k, v in meta.items():
        add_value(w, f"llama.{k}", v)
    add_value(w, "llama.vocab_size", shape.vocab)  # without a tokenizer, llama.cpp sizes its vocabulary from this
    add_value(w, "tokenizer.ggml.model", "none")
    tensors = {name: (shp, types[name]) for name, shp in shapes.items()}
    return write_random_tensors(w, path, tensors, lambda name, shp, qt: random_tensor(rng, qt, shp, std), progress)


def write_random_tensors(w: GGUFWriter, path: Path, tensors: dict, make, progress=None) -> Path:
    """Declare `tensors` (name -> (shape, GGML type)) in `w`, whose metadata is already added, and
    write the file atomically (a .partial file renamed into place), each tensor's bytes from
    make(name, shape, qtype), in order."""
    for name, (shp, qt) in tensors.items():
        block, size = GGML_QUANT_SIZES[qt]
        w.add_tensor_info(name, shp, np.dtype(np.float32), int(np.prod(shp)) // block * size, raw_dtype=qt)
    tmp = path.with_name(path.name + ".partial")
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for k, (name, (shp, qt)) in enumerate(tensors.items()):
            w.write_tensor_data(make(name, shp, qt))
            if progress:
                progress(k + 1, len(tensors))
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        if tmp.exists():
            tmp.unlink()
    return path
