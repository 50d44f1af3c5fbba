"""Where each routed expert's matrices are in the file: byte ranges of the stored tensors.

A GGUF MoE layer stores its experts stacked: `blk.i.ffn_gate_exps.weight` of torch shape
(E, F, D) is E matrices of F rows back to back, so expert e of it is rows e*F .. (e+1)*F of the
(E*F, D) matrix: one contiguous run of bytes (likewise `ffn_up_exps`, `ffn_down_exps` (E, D, F),
and llama.cpp's fused `ffn_gate_up_exps` (E, 2F, D), gate rows first). Hugging Face folders keep
one tensor per expert (`blk.i.ffn_gate_exps.<e>.weight` after renaming), or the stacked form
transformers 5 uses in memory. Either way an expert is three `ExpertPiece`s (gate, up, down),
each a row range of one stored tensor: the runtime reads only the pieces a token's router chose
(runtime/experts.py), or, for resident layers, takes views of the layer's bytes (runtime/blocks.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ModelFileError
from .index import TensorRef
from .tensor_info import TensorInfo

_EXPERT_TENSOR = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down|gate_up)_exps(?:\.(\d+))?\.weight")
PARTS = ("gate", "up", "down")


def is_routed_expert(name: str) -> bool:
    """Whether a GGUF-named tensor holds routed experts (stacked, or one expert of an HF folder)."""
    return _EXPERT_TENSOR.fullmatch(name) is not None


@dataclass(frozen=True)
class ExpertPiece:
    """Rows r0..r1 of a stored tensor viewed as (rows, K): one expert's gate, up or down matrix."""

    ref: TensorRef
    r0: int
    r1: int

    @property
    def row_bytes(self) -> int:
        return self.ref.info.nbytes // _rows(self.ref)

    @property
    def offset(self) -> int:
        """Absolute file offset of the piece's first byte."""
        return self.ref.info.offset + self.r0 * self.row_bytes

    @property
    def nbytes(self) -> int:
        return (self.r1 - self.r0) * self.row_bytes

    def as_ref(self) -> TensorRef:
        """The piece as a tensor of its own (shape (rows, K)), for the block builder."""
        info = self.ref.info
        shape = (self.r1 - self.r0, self.ref.shape[-1])
        return TensorRef(f"{self.ref.name}[{self.r0}:{self.r1}]",
                         TensorInfo(info.name, info.path, self.offset, self.nbytes, shape, info.dtype))

    def view(self, data: torch.Tensor) -> torch.Tensor:
        """The piece's bytes inside the whole tensor's bytes `data` (uint8, a view)."""
        start = self.r0 * self.row_bytes
        return data[start:start + self.nbytes]


def _rows(ref: TensorRef) -> int:
    n = 1
    for s in ref.shape[:-1]:
        n *= s
    return n


def expert_pieces(refs: list[TensorRef], n_experts: int, layer: int) -> list[dict[str, ExpertPiece]]:
    """[{"gate", "up", "down": ExpertPiece}] of each expert of one layer from its routed-expert
    tensors; raises ModelFileError when an expert or a part is missing or a shape does not fit
    `n_experts`."""
    experts: list[dict[str, ExpertPiece]] = [{} for _ in range(n_experts)]
    for ref in refs:
        if ref.transform is not None:
            raise ModelFileError(f"{ref.name}: transposed expert matrices are not supported")
        m = _EXPERT_TENSOR.fullmatch(ref.name)
        if m is None or int(m.group(1)) != layer:
            raise ModelFileError(f"{ref.name} is not a routed expert tensor of layer {layer}")
        part, single = m.group(2), m.group(3)
        if single is not None:  # one expert's (N, K) matrix
            e = int(single)
            if e >= n_experts or len(ref.shape) != 2:
                raise ModelFileError(f"{ref.name}: expert {e} of shape {list(ref.shape)} does not fit {n_experts} experts")
            experts[e][part] = ExpertPiece(ref, 0, ref.shape[0])
            continue
        if len(ref.shape) != 3 or ref.shape[0] != n_experts:
            raise ModelFileError(f"{ref.name} has shape {list(ref.shape)}, not {n_experts} stacked experts")
        n = ref.shape[1]
        for e in range(n_experts):
            if part == "gate_up":
                half = n // 2
                experts[e]["gate"] = ExpertPiece(ref, e * n, e * n + half)
                experts[e]["up"] = ExpertPiece(ref, e * n + half, (e + 1) * n)
            else:
                experts[e][part] = ExpertPiece(ref, e * n, (e + 1) * n)
    for e, pieces in enumerate(experts):
        missing = [p for p in PARTS if p not in pieces]
        if missing:
            raise ModelFileError(f"layer {layer}: expert {e} has no {', '.join(missing)} matrix")
    return experts


def layer_expert_refs(group_tensors: list[TensorRef]) -> list[TensorRef]:
    """The routed-expert tensors among a layer group's tensors."""
    return [r for r in group_tensors if is_routed_expert(r.name)]
