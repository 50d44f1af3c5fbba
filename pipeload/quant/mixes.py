"""Which GGML type each tensor gets: uniform types and llama.cpp's mixed "K_M" recipes.

The rules follow llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp) for dense models:

- Q4_K_M: Q4_K everywhere, except `attn_v` and `ffn_down` of the "more bits" layers (the first
  and last eighth of the layers and every third one in between) and the output matrix (or the
  token embeddings when the output is tied to them), which get Q6_K; a fused `attn_qkv` gets Q5_K.
- A K-quant needs rows that are a multiple of 256 values; where they are not, llama.cpp falls
  back Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (and to F16 when the row is not even a multiple
  of 32), and so does this module. Uniform types fall back to F16, as `pipeload convert` always did.
- Norms, biases, 1-D tensors and position embeddings are not quantized (F32, position
  embeddings F16).
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

# --quant names of the uniform types -> GGML type name of 2-D weight matrices
UNIFORM = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
           "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}
MIXES = {"q4_k_m": "Q4_K"}  # mix name -> its base type (what llama.cpp's LLAMA_FTYPE_* defaults to)
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_of(name: str) -> int | None:
    if not name.startswith("blk."):
        return None
    return int(name.split(".")[1])


def _fits(type_name: str, row: int) -> bool:
    return row % GGML_QUANT_SIZES[T[type_name]][0] == 0


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama.cpp would quantize this tensor (2-D `.weight`, not a norm or position table)."""
    return (len(shape) >= 2 and name.endswith(".weight") and not name.endswith("_norm.weight")
            and not name.startswith(("position_embd.", "token_types.")))


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, has_output: bool = True) -> str:
    """GGML type name for tensor `name` of torch shape `shape` (row length last) under `quant`.

    `quant` is a uniform name (UNIFORM) or a mix (MIXES); `has_output` is False when the output
    matrix is tied to the token embeddings (which then take the output's type). Raises ValueError
    for an unknown quant."""
    if quant not in UNIFORM and quant not in MIXES:
        raise ValueError(f"unknown quant {quant!r}; choose from {', '.join([*UNIFORM, *MIXES])}")
    if len(shape) < 2 or not name.endswith(".weight") or name.endswith("_norm.weight") or quant == "f32":
        return "F32"
    float_type = UNIFORM.get(quant) if quant in ("f16", "bf16") else "F16"
    if not quantizable(name, shape):  # position tables stay float, as llama.cpp keeps them
        return float_type
    row = shape[-1]
    if quant in UNIFORM:
        wanted = UNIFORM[quant]
        return wanted if _fits(wanted, row) else "F16"
    wanted = _mix_type(name, quant, n_layers, has_output, row)
    if _fits(wanted, row):
        return wanted
    fallback = K_FALLBACK.get(wanted, "F16")
    return fallback if _fits(fallback, row) else "F16"


def _mix_type(name: str, quant: str, n_layers: int, has_output: bool, row: int) -> str:
    base = MIXES[quant]
    if name == "output.weight" or (not has_output and name == "token_embd.weight"):
        return "Q6_K" if row % 256 == 0 else "Q8_0"
    i = _layer_of(name)
    if i is None:
        return base
    leaf = name.split(".")[2]
    if quant == "q4_k_m":
        if leaf in ("attn_v", "ffn_down") and use_more_bits(i, n_layers):
            return "Q6_K"
        if leaf == "attn_qkv":
            return "Q5_K"
    return base


# llama.cpp's general.file_type numbers (LLAMA_FTYPE_*)
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q4_k": 15, "q5_k": 17,
              "q6_k": 18, "bf16": 32, "q4_k_m": 15}
