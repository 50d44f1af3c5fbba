"""Where a layer group's bytes are, as reads: its aligned byte ranges and where each tensor lands.

A group ("embed", "blk.i", "head") is read as few large reads as the file allows: a GGUF
layer's tensors are written back to back, so the whole layer is one range; a safetensors file
keeps a layer's tensors together too (one range per file of a sharded folder). Each range is
widened to 4096-byte bounds (what O_DIRECT needs) and read whole into a buffer; the tensors are
views into that buffer at their offsets. Nothing is converted or copied on the way: the bytes a
group computes on are the bytes the file holds (docs/DESIGN.md, "the file's own bytes").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .index import LayerGroup, TensorRef, WeightsIndex
from .io import ALIGN, RangeReader, read_span

MERGE_GAP = 1 << 20  # tensors closer than this in one file are read as one range (the gap read too)

TensorBytes = dict[str, tuple[TensorRef, torch.Tensor]]  # GGUF name -> (where it came from, uint8 bytes)


@dataclass(frozen=True)
class Extent:
    """One aligned read: `nbytes` bytes of `path` from `offset`, placed at `at` in the group's buffer."""

    path: Path
    offset: int
    nbytes: int
    at: int
    file_size: int


@dataclass
class GroupLayout:
    """A group's reads (extents, back to back in one buffer) and each tensor's place in that buffer."""

    name: str
    extents: list[Extent]
    places: list[tuple[TensorRef, int]]  # (tensor, offset of its bytes in the buffer)
    shared: list[TensorRef] = field(default_factory=list)  # tensors whose bytes another group holds

    @property
    def nbytes(self) -> int:
        """Bytes read for the group (a multiple of 4096): its size in memory once loaded."""
        return sum(e.nbytes for e in self.extents)


def group_layouts(index: WeightsIndex, routed_experts: bool = True) -> dict[str, GroupLayout]:
    """The layout of every group. A tensor whose bytes the "embed" group holds (a tied output
    matrix is the token embedding) is not read again: the group lists it as `shared`. With
    routed_experts=False, a mixture-of-experts layer's routed experts are left out (they are read
    expert by expert: runtime/experts.py)."""
    held = {(r.info.path, r.info.offset) for r in index.groups["embed"].tensors}
    groups = index.groups if routed_experts else {name: without_routed_experts(g) for name, g in index.groups.items()}
    return {name: group_layout(g, frozenset() if name == "embed" else held) for name, g in groups.items()}


def without_routed_experts(group: LayerGroup) -> LayerGroup:
    """The group without its routed-expert tensors (attention, norms, router, shared experts)."""
    from .experts import is_routed_expert

    return LayerGroup(group.name, [t for t in group.tensors if not is_routed_expert(t.name)])


def group_layout(group: LayerGroup, skip: frozenset = frozenset()) -> GroupLayout:
    """The reads of `group`'s tensors, except those whose (path, offset) is in `skip`."""
    shared = [r for r in group.tensors if (r.info.path, r.info.offset) in skip]
    refs = sorted((r for r in group.tensors if (r.info.path, r.info.offset) not in skip),
                  key=lambda r: (str(r.info.path), r.info.offset))
    runs: list[list[TensorRef]] = []
    for ref in refs:
        last = runs[-1][-1].info if runs else None
        if last is not None and last.path == ref.info.path and ref.info.offset - last.end <= MERGE_GAP:
            runs[-1].append(ref)
        else:
            runs.append([ref])
    extents, places, at = [], [], 0
    sizes: dict[Path, int] = {}
    for run in runs:
        path = run[0].info.path
        size = sizes.setdefault(path, path.stat().st_size)
        start = run[0].info.offset // ALIGN * ALIGN
        end = -(-max(r.info.end for r in run) // ALIGN) * ALIGN
        extents.append(Extent(path, start, end - start, at, size))
        places.extend((r, at + r.info.offset - start) for r in run)
        at += end - start
    return GroupLayout(group.name, extents, places, shared)


def read_group(layout: GroupLayout, out: torch.Tensor, reader: RangeReader, mode: str,
               pool: ThreadPoolExecutor | None = None) -> None:
    """Fill `out` (uint8, at least layout.nbytes, page-aligned for mode "direct") with the
    group's extents. The last extent of a file may reach past its end: only what exists is read."""
    for e in layout.extents:
        n = e.nbytes if mode == "direct" else min(e.nbytes, e.file_size - e.offset)
        read_span(reader, e.path, e.offset, out[e.at:e.at + n], mode, pool)


def tensor_views(layout: GroupLayout, buf: torch.Tensor, held: TensorBytes | None = None) -> TensorBytes:
    """{GGUF name: (ref, uint8 view of its bytes in buf)}, the shared tensors' bytes taken from
    `held` (the views of the group that holds them); nothing is copied."""
    out = {ref.name: (ref, buf[at:at + ref.info.nbytes]) for ref, at in layout.places}
    if layout.shared:
        by_place = {(r.info.path, r.info.offset): data for r, data in (held or {}).values()}
        for ref in layout.shared:
            out[ref.name] = (ref, by_place[(ref.info.path, ref.info.offset)])
    return out
