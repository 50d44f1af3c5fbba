"""One tensor-parallel rank's part of a layer, cut from the file's bytes (no requantization).

A `ShardSpec` says which query heads (and the key/value heads they need), feed-forward columns
and vocabulary rows a rank holds. Row splits (q/k/v, gate/up, output) take whole stored rows: a
view of the bytes. Column splits (attn_output, ffn_down) take whole GGML blocks of every row:
the rank's columns copied out, the same blocks, scales and integers as the whole matrix. Their
partial outputs are summed across ranks (cluster/shard.py), the bias added once (rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedModelError
from ..weights.index import TensorRef
from ..weights.layout import TensorBytes
from ..weights.tensor_info import TensorInfo

ROW_SPLIT = {"attn_q": "heads", "attn_k": "kv", "attn_v": "kv", "ffn_gate": "ffn", "ffn_up": "ffn", "output": "vocab"}
COL_SPLIT = {"attn_output": "heads", "ffn_down": "ffn"}


@dataclass(frozen=True)
class ShardSpec:
    """The part of every layer one tensor-parallel rank holds (ranges of heads, kv heads, columns, vocab)."""

    rank: int
    ranks: int
    heads: tuple[int, int]
    kv: tuple[int, int]
    ffn: tuple[int, int]
    vocab: tuple[int, int]
    head_dim: int

    def rows(self, kind: str) -> tuple[int, int]:
        """Row (or column) range of a matrix split by `kind` ("heads", "kv", "ffn", "vocab")."""
        a, b = getattr(self, kind)
        hd = self.head_dim if kind in ("heads", "kv") else 1
        return a * hd, b * hd

    def as_dict(self) -> dict:
        return {"rank": self.rank, "ranks": self.ranks, "heads": list(self.heads), "kv": list(self.kv),
                "ffn": list(self.ffn), "vocab": list(self.vocab), "head_dim": self.head_dim}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardSpec":
        return cls(d["rank"], d["ranks"], tuple(d["heads"]), tuple(d["kv"]), tuple(d["ffn"]), tuple(d["vocab"]),
                   d["head_dim"])


def block_elems(dtype: str) -> int:
    """Values per storage block of a tensor type (1 for plain floats)."""
    if dtype in GGMLQuantizationType.__members__:
        return GGML_QUANT_SIZES[GGMLQuantizationType[dtype]][0]
    return 1


def local_args(args, spec: ShardSpec):
    """ModelArgs of the shard's block: its heads, kv heads and feed-forward columns."""
    return replace(args, n_heads=spec.heads[1] - spec.heads[0], n_kv_heads=spec.kv[1] - spec.kv[0],
                   ffn_dim=spec.ffn[1] - spec.ffn[0])


def _sliced(ref: TensorRef, shape: tuple[int, ...], nbytes: int) -> TensorRef:
    info = ref.info
    return TensorRef(ref.name, TensorInfo(info.name, info.path, info.offset, nbytes, shape, info.dtype), None)


def _rows(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> tuple[TensorRef, torch.Tensor]:
    rows = raw.view(ref.shape[0], -1)[a:b].reshape(-1)  # whole stored rows: a view
    return _sliced(ref, (b - a, *ref.shape[1:]), rows.numel()), rows


def _columns(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> tuple[TensorRef, torch.Tensor]:
    n, k = ref.shape
    blk = block_elems(ref.info.dtype)
    if a % blk or b % blk:
        raise UnsupportedModelError(f"{ref.name}: columns {a}..{b} do not fall on {ref.info.dtype} block bounds")
    cols = raw.view(n, k // blk, -1)[:, a // blk:b // blk].contiguous().view(-1)  # (N, blocks) copied out
    return _sliced(ref, (n, b - a), cols.numel()), cols


def shard_tensors(source: TensorBytes, spec: ShardSpec, prefix: str) -> TensorBytes:
    """This rank's part of the tensors under `prefix` (other tensors as they are). Raises
    UnsupportedModelError for transposed (GPT-2 style) weights or columns off block bounds."""
    out = {}
    for name, (ref, data) in source.items():
        local = name[len(prefix):] if name.startswith(prefix) else name
        module, _, leaf = local.rpartition(".")
        if module in ROW_SPLIT or module in COL_SPLIT:
            if ref.transform is not None:
                raise UnsupportedModelError(f"{name}: tensor parallel needs untransposed weights (GGUF or Llama HF)")
        if module in ROW_SPLIT:
            out[name] = _rows(ref, data, *spec.rows(ROW_SPLIT[module]))
        elif module in COL_SPLIT and leaf == "bias":
            out[name] = (ref, data if spec.rank == 0 else torch.zeros_like(data))  # the partial sums carry it once
        elif module in COL_SPLIT:
            out[name] = _columns(ref, data, *spec.rows(COL_SPLIT[module]))
        else:
            out[name] = (ref, data)
    return out
