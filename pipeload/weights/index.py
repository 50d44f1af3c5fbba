"""The weights index: for each layer group, its tensors, byte ranges, dtypes and shapes.

Groups are "embed" (token/position embeddings, rope tables), "blk.0" ... "blk.N-1" and "head"
(final norm and output matrix). The planner decides per group what stays resident and what
streams; the loader reads a group's byte ranges; `pipeload inspect` prints them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ModelFileError, UnsupportedModelError
from .checkpoint import Checkpoint
from .naming import compile_rules, rename
from .tensor_info import TensorInfo

_BLOCK = re.compile(r"blk\.(\d+)\.")
# the first part of the names of tensors outside the blocks, by group (an architecture may declare
# its own: models/*.py EMBED_NAMES / HEAD_NAMES)
EMBED_NAMES = ("token_embd", "position_embd", "rope_freqs", "token_types")
HEAD_NAMES = ("output_norm", "output")


@dataclass(frozen=True)
class TensorRef:
    """A tensor under its GGUF name, where its bytes are, and how to turn them into the weight."""

    name: str
    info: TensorInfo
    transform: str | None = None  # None or "transpose"

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.info.shape
        return tuple(reversed(s)) if self.transform == "transpose" else s


@dataclass
class LayerGroup:
    name: str
    tensors: list[TensorRef] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.info.nbytes for t in self.tensors)

    @property
    def dtypes(self) -> list[str]:
        """Distinct storage types in this group, most bytes first."""
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.info.dtype] = by_type.get(t.info.dtype, 0) + t.info.nbytes
        return sorted(by_type, key=by_type.get, reverse=True)

    @property
    def byte_span(self) -> tuple[int, int] | None:
        """(start, end) if all tensors sit back to back in one file (one read), else None."""
        infos = sorted((t.info for t in self.tensors), key=lambda i: (str(i.path), i.offset))
        if not infos or len({i.path for i in infos}) != 1:
            return None
        gaps = sum(b.offset - a.end for a, b in zip(infos, infos[1:]))
        return (infos[0].offset, infos[-1].end) if gaps <= 64 * len(infos) else None


@dataclass
class WeightsIndex:
    groups: dict[str, LayerGroup]
    n_layers: int

    def block(self, i: int) -> LayerGroup:
        return self.groups[f"blk.{i}"]

    @property
    def total_bytes(self) -> int:
        """Bytes in the file; a tied output matrix is counted once."""
        seen = {(t.info.path, t.info.offset): t.info.nbytes for g in self.groups.values() for t in g.tensors}
        return sum(seen.values())

    def tensor(self, name: str) -> TensorRef:
        for g in self.groups.values():
            for t in g.tensors:
                if t.name == name:
                    return t
        raise KeyError(name)


def group_of(name: str, embed_names: tuple[str, ...] = EMBED_NAMES, head_names: tuple[str, ...] = HEAD_NAMES) -> str:
    """The layer group a GGUF tensor name belongs to."""
    m = _BLOCK.match(name)
    if m:
        return f"blk.{int(m.group(1))}"
    root = name.split(".", 1)[0]
    if root in embed_names:
        return "embed"
    if root in head_names:
        return "head"
    raise UnsupportedModelError(f"tensor {name!r} belongs to no known layer group")


def build_index(ckpt: Checkpoint, n_layers: int, hf_rules, tie_embeddings: bool,
                embed_names: tuple[str, ...] = EMBED_NAMES, head_names: tuple[str, ...] = HEAD_NAMES) -> WeightsIndex:
    """Index the checkpoint's tensors under GGUF names (`hf_rules`: the architecture's plain-data
    HF_NAME_RULES, for HF folders); raises on tensors the architecture does not know."""
    hf_rules = compile_rules(hf_rules)
    refs: dict[str, TensorRef] = {}
    for file_name, info in ckpt.tensors.items():
        if ckpt.format == "gguf":
            name, transform = file_name, None
        else:
            renamed = rename(file_name, hf_rules)
            if renamed is None:
                raise UnsupportedModelError(
                    f"{ckpt.path}: tensor {file_name!r} is not part of the {ckpt.architecture} architecture as "
                    f"pipeload knows it; this model variant is not supported")
            name, transform = renamed
            if name is None:
                continue
        refs[name] = TensorRef(name, info, transform)
    if tie_embeddings and "output.weight" not in refs:
        if "token_embd.weight" not in refs:
            raise ModelFileError(f"{ckpt.path}: no token_embd.weight tensor")
        refs["output.weight"] = TensorRef("output.weight", refs["token_embd.weight"].info, refs["token_embd.weight"].transform)
    groups = {"embed": LayerGroup("embed")}
    groups.update({f"blk.{i}": LayerGroup(f"blk.{i}") for i in range(n_layers)})
    groups["head"] = LayerGroup("head")
    for name, ref in refs.items():
        g = group_of(name, embed_names, head_names)
        if g not in groups:
            raise ModelFileError(f"{ckpt.path}: tensor {name!r} is beyond the {n_layers} layers the metadata declares")
        groups[g].tensors.append(ref)
    for g in groups.values():
        g.tensors.sort(key=lambda t: (str(t.info.path), t.info.offset))
    return WeightsIndex(groups=groups, n_layers=n_layers)
