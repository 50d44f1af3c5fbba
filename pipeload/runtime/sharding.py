"""One tensor-parallel rank's part of a layer, cut from the file's bytes (no requantization).

A `ShardSpec` says which query heads (and the key/value heads they need), feed-forward columns
and vocabulary rows a rank holds. Each architecture declares how its matrices split
(`TENSOR_PARALLEL` in models/*.py: {module: ("rows" | "columns", "heads" | "kv" | "ffn" |
"vocab"[, parts])}; other tensors are replicated). Row splits take whole stored rows (of each of
`parts` stacked sub-matrices, such as GPT-2's q/k/v), column splits whole GGML blocks of every
row: the same blocks, scales and integers as the whole matrix, copied out so that the rest of the
layer's read buffer can go. Column-split outputs are partial sums, added across ranks
(cluster/shard.py), their bias once (rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import UnsupportedModelError
from ..weights.index import TensorRef
from ..weights.layout import TensorBytes
from ..weights.tensor_info import TensorInfo

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


def tensor_parallel_plan(spec) -> dict:
    """The architecture's TENSOR_PARALLEL declaration; raises UnsupportedModelError (naming the
    architecture and the way out) when it declares none, or when the checkpoint stores a split
    matrix transposed."""
    plan = getattr(spec.arch, "TENSOR_PARALLEL", None)
    name = spec.arch.__name__.rsplit(".", 1)[-1]
    if not plan:
        why = ("mixture of experts: its experts are placed whole" if getattr(spec.arch, "MIXTURE_OF_EXPERTS", False)
               else getattr(spec.arch, "TENSOR_PARALLEL_NOTE", f"no TENSOR_PARALLEL in pipeload/models/{name}.py"))
        raise UnsupportedModelError(f"{spec.path}: tensor parallel is not supported for the {name} architecture "
                                    f"({why}); use pipeline parallel, which places whole layers")
    for group in spec.index.groups.values():
        for ref in group.tensors:
            module = ref.name.split(".")[-2] if ref.name.count(".") >= 1 else ""
            if module in plan and ref.transform is not None:
                raise UnsupportedModelError(f"{spec.path}: tensor parallel needs {ref.name} untransposed (this checkpoint "
                                            f"stores it transposed): convert it to GGUF first (pipeload convert), "
                                            f"or use pipeline parallel")
    return plan


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


def _rows(ref: TensorRef, raw: torch.Tensor, a: int, b: int, parts: int) -> tuple[TensorRef, torch.Tensor]:
    """Rows a..b of each of the tensor's `parts` stacked sub-matrices, copied out."""
    n = ref.shape[0]
    stored = raw.view(parts, n // parts, -1)  # (parts, rows, row bytes)
    rows = stored[:, a:b].reshape(-1).clone()
    return _sliced(ref, (parts * (b - a), *ref.shape[1:]), rows.numel()), rows


def _columns(ref: TensorRef, raw: torch.Tensor, a: int, b: int) -> tuple[TensorRef, torch.Tensor]:
    n, k = ref.shape
    blk = block_elems(ref.info.dtype)
    if a % blk or b % blk:
        raise UnsupportedModelError(f"{ref.name}: columns {a}..{b} do not fall on {ref.info.dtype} block bounds")
    cols = raw.view(n, k // blk, -1)[:, a // blk:b // blk].contiguous().view(-1)  # (N, blocks) copied out
    return _sliced(ref, (n, b - a), cols.numel()), cols


def shard_tensors(source: TensorBytes, spec: ShardSpec, prefix: str, plan: dict) -> TensorBytes:
    """This rank's part of the tensors under `prefix`, split as the architecture's plan says
    (other tensors as they are). Raises UnsupportedModelError for transposed (HF GPT-2) weights
    or columns off block bounds."""
    out = {}
    for name, (ref, data) in source.items():
        local = name[len(prefix):] if name.startswith(prefix) else name
        module, _, leaf = local.rpartition(".")
        split = plan.get(module)
        if split is None:
            out[name] = (ref, data)
            continue
        if ref.transform is not None:
            raise UnsupportedModelError(f"{name}: tensor parallel needs the matrices untransposed (this checkpoint "
                                        f"stores them transposed): convert it to GGUF first (pipeload convert)")
        how, kind, *parts = split
        a, b = spec.rows(kind)
        if how == "rows":
            out[name] = _rows(ref, data, a, b, parts[0] if parts else 1)
        elif leaf == "bias":
            out[name] = (ref, data if spec.rank == 0 else torch.zeros_like(data))  # the partial sums carry it once
        else:
            out[name] = _columns(ref, data, a, b)
    return out


def shard_bytes(ref: TensorRef, spec: ShardSpec, plan: dict, prefix: str) -> int:
    """Bytes this rank holds of a tensor (the planner's size of a shard)."""
    module = ref.name[len(prefix):].rpartition(".")[0] if ref.name.startswith(prefix) else ref.name.rpartition(".")[0]
    split = plan.get(module)
    if split is None:
        return ref.info.nbytes
    how, kind, *parts = split
    if how == "columns" and ref.name.endswith(".bias"):
        return ref.info.nbytes  # replicated (zeros beyond rank 0)
    a, b = spec.rows(kind)
    whole = ref.shape[0] // (parts[0] if parts else 1) if how == "rows" else ref.shape[1]
    return ref.info.nbytes * (b - a) // whole
