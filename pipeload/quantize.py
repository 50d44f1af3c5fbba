"""`pipeload quantize`: write a quantized GGUF file, round to nearest or calibrated (GPTQ).

Methods:
- any `pipeload convert --quant` name (q8_0, q4_0, q4_k_m, ...): round to nearest, tensor by tensor.
- "gptq4": llama.cpp's Q4_K_M type mix (Q6_K for the output and the sensitive attn_v/ffn_down),
  with every 4-bit matrix of the blocks quantized by GPTQ on calibration text. Matrices whose
  rows are not a multiple of 256 take Q4_0 (still 4 bits; llama.cpp's mix would take Q5_0).
- "gptq4_0": every matrix Q4_0 (as `--quant q4_0`), the blocks' matrices (and an untied output
  matrix) by GPTQ.
- "rtn4": exactly the types of "gptq4", round to nearest: the baseline GPTQ must beat.

The calibrated methods work layer by layer like the executor (docs/DESIGN.md, "sources -> executor"): the calibration
sequences' hidden states go through one block at a time; each block is read from the source,
its linears quantized in the order they run (q/k/v, then the attention output, then gate/up,
then down: each sees inputs computed with the already quantized ones), its outputs computed
with the quantized weights become the next block's inputs, and the block is written and
dropped. Peak memory is one layer in float32 plus the calibration activations.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from .convert import QUANT_TYPES, RoundToNearest, convert, encode_tensor
from .errors import UnsupportedModelError
from .quant.gptq import GPTQ_TYPES, SPAN, HessianAccumulator, gptq_quantize, inverse_hessian_factor, output_error
from .quant.mixes import tensor_type
from .runtime.blocks import assign_values, float_weight

CALIBRATED = {"gptq4": "q4_k_m", "gptq4_0": "q4_0", "rtn4": "q4_k_m"}  # method -> mix its types follow
METHODS = [*CALIBRATED, *QUANT_TYPES]


@dataclass
class QuantizeReport:
    path: Path
    method: str
    bytes_written: int
    seconds: float
    peak_rss: int
    calibration_tokens: int = 0
    layers: list[dict] = field(default_factory=list)  # per GPTQ matrix: name, type, gptq_error, rtn_error


def method_types(method: str, n_layers: int, has_output: bool) -> Callable[[str, tuple[int, ...]], str]:
    """GGML type name per tensor for a calibrated method (see the module docstring)."""
    mix = CALIBRATED[method]

    def types(name: str, shape: tuple[int, ...]) -> str:
        t = tensor_type(name, shape, mix, n_layers, has_output)
        return "Q4_0" if t == "Q5_0" and mix == "q4_k_m" else t  # keep the K-quant fallback at 4 bits

    return types


def _values(encoded: np.ndarray, gtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 weight a stored tensor decodes to."""
    from .quant import dequantize

    if gtype in ("F32", "F16"):
        return torch.from_numpy(np.ascontiguousarray(encoded)).float().reshape(shape)
    return dequantize(torch.from_numpy(np.ascontiguousarray(encoded)), GGMLQuantizationType[gtype], shape)


def _consumer(block: nn.Module, linear_name: str) -> nn.Module:
    """The module whose forward takes `linear_name`'s input: the Fused group it belongs to
    (models/common.py: q/k/v, gate/up run as one pass), else the linear itself."""
    from .models.common import Fused

    linear = block.get_submodule(linear_name)
    return next((m for m in block.modules() if isinstance(m, Fused) and any(p is linear for p in m.parts)), linear)


class _StopForward(Exception):
    """Raised by a hook once the inputs it needed were collected."""


class GPTQEncoder:
    """A convert.GroupEncoder that quantizes each block with GPTQ on calibration activations."""

    def __init__(self, arch, args, tokens: torch.Tensor, use_gptq: bool = True, damp: float = 0.01,
                 batch: int = 8, act_order: bool = True, progress: Callable[[str], None] | None = None):
        self.arch, self.args, self.tokens = arch, args, tokens  # tokens (n, T)
        self.use_gptq, self.damp, self.batch, self.act_order = use_gptq, damp, batch, act_order
        self.model = arch.Model(args)
        self.h: torch.Tensor | None = None  # (n, T, D) hidden states entering the next block
        self.layers: list[dict] = []
        self.progress = progress
        T = tokens.shape[1]
        self.positions = torch.arange(T)[None]  # (1, T)

    # -- helpers --------------------------------------------------------------------------------

    def _batches(self):
        for s in range(0, self.tokens.shape[0], self.batch):
            yield slice(s, s + self.batch)

    def _step(self, rows: int):
        return self.model.step_inputs(self.positions.expand(rows, -1), None)

    def _rtn(self, tensors, types) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor]]:
        encoded = RoundToNearest().encode_group("", tensors, types)
        return encoded, {n: _values(encoded[n], types[n], tuple(t.shape)) for n, t in tensors.items()}

    def _gptq_able(self, name: str, t: torch.Tensor, types: dict[str, str]) -> bool:
        gtype = types.get(name)
        return (self.use_gptq and gtype in GPTQ_TYPES and t.dim() == 2 and t.shape[1] % SPAN[gtype] == 0
                and not name.startswith("token_embd."))

    # -- the groups -----------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_group(self, group: str, tensors: dict[str, torch.Tensor], types: dict[str, str]) -> dict[str, np.ndarray]:
        if group == "embed":
            encoded, values = self._rtn(tensors, types)
            self._assign(self.model, values, "")
            self.h = torch.cat([self.model.embed(self.tokens[b], self.positions.expand(self.tokens[b].shape[0], -1))
                                for b in self._batches()]).float()
            return encoded
        if group.startswith("blk."):
            return self._encode_block(int(group[4:]), tensors, types)
        return self._encode_head(tensors, types)

    def _assign(self, module: nn.Module, values: dict[str, torch.Tensor], prefix: str) -> None:
        assign_values(module, values, prefix, torch.float32)

    def _encode_block(self, i: int, tensors, types) -> dict[str, np.ndarray]:
        prefix = f"blk.{i}."
        block = self.arch.Block(self.args, i)
        gptq_names = [n for n, t in tensors.items() if self._gptq_able(n, t, types)]
        plain = {n: t for n, t in tensors.items() if n not in gptq_names}
        encoded, values = self._rtn(plain, types)
        self._assign(block, {**values, **{n: tensors[n].float() for n in gptq_names}}, prefix)
        if gptq_names:
            for stage in self._stages(block, prefix, gptq_names):
                encoded.update(self._quantize_stage(block, prefix, stage, tensors, types))
        self.h = torch.cat([block(self.h[b], self._step(self.h[b].shape[0]), None) for b in self._batches()])
        if self.progress:
            self.progress(f"layer {i}")
        return encoded

    def _stages(self, block: nn.Module, prefix: str, names: list[str]) -> list[list[str]]:
        """The GPTQ matrices grouped by shared input, in the order the block runs them."""
        consumers: dict[nn.Module, list[str]] = {}  # the module that takes each matrix's input
        for n in names:
            consumers.setdefault(_consumer(block, n[len(prefix):].rpartition(".")[0]), []).append(n)
        for m, ns in consumers.items():  # a fused pass computes its parts in their order (q, k, v)
            parts = getattr(m, "parts", [m])
            ns.sort(key=lambda n: [p is block.get_submodule(n[len(prefix):].rpartition(".")[0]) for p in parts].index(True))
        calls: list[tuple[str, int, tuple]] = []

        def record(names_in):
            return lambda mod, args: calls.extend((n, args[0].data_ptr(), tuple(args[0].shape)) for n in names_in)

        hooks = [m.register_forward_pre_hook(record(ns)) for m, ns in consumers.items()]
        try:
            x = self.h[:1]
            block(x, self._step(1), None)
        finally:
            for hook in hooks:
                hook.remove()
        stages: list[list[str]] = []
        last = None
        for n, ptr, shape in calls:
            if n in (s for stage in stages for s in stage):
                continue
            if last is not None and (ptr, shape) == last:
                stages[-1].append(n)
            else:
                stages.append([n])
            last = (ptr, shape)
        return stages

    def _collect_hessian(self, run: Callable[[torch.Tensor], None], module: nn.Module, k: int) -> torch.Tensor:
        acc = HessianAccumulator(k)

        def hook(mod, args):
            acc.add(args[0])
            raise _StopForward

        handle = module.register_forward_pre_hook(hook)
        try:
            for b in self._batches():
                try:
                    run(self.h[b])
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return acc.H

    def _quantize_stage(self, block, prefix, stage, tensors, types) -> dict[str, np.ndarray]:
        first = _consumer(block, stage[0][len(prefix):].rpartition(".")[0])
        k = tensors[stage[0]].shape[1]
        H = self._collect_hessian(lambda x: block(x, self._step(x.shape[0]), None), first, k)
        return self._gptq(block, prefix, stage, tensors, types, H)

    def _gptq(self, module, prefix, names, tensors, types, H) -> dict[str, np.ndarray]:
        U = None if self.act_order else inverse_hessian_factor(H, self.damp)  # shared by the stage's matrices
        out = {}
        for name in names:
            W = tensors[name].float()
            result = gptq_quantize(W, H, types[name], damp=self.damp, act_order=self.act_order, Hinv=U)
            rtn = _values(encode_tensor(W, types[name]), types[name], tuple(W.shape))
            self.layers.append({"name": name, "type": types[name], "gptq_error": result.error,
                                "rtn_error": output_error(W, rtn, H)})
            owner = module.get_submodule(name[len(prefix):].rpartition(".")[0])
            owner.weight = float_weight(result.values.float())
            out[name] = result.packed
        return out

    def _encode_head(self, tensors, types) -> dict[str, np.ndarray]:
        gptq_names = [n for n, t in tensors.items() if self._gptq_able(n, t, types)]
        encoded, values = self._rtn({n: t for n, t in tensors.items() if n not in gptq_names}, types)
        if gptq_names:
            self._assign(self.model, values, "")
            H = HessianAccumulator(self.args.dim)
            for b in self._batches():
                H.add(self.model.output_norm(self.h[b]))
            encoded.update(self._gptq(self.model, "", gptq_names, tensors, types, H.H))
        return encoded


def quantize_model(src: str | os.PathLike, out: str | os.PathLike, method: str = "gptq4", calibration_data=None,
                   tokenizer=None, n_samples: int = 64, seq_len: int = 256, damp: float = 0.01, batch: int = 8,
                   act_order: bool = True, progress: Callable[[int, int], None] | None = None,
                   log: Callable[[str], None] | None = None) -> QuantizeReport:
    """Write `src` quantized with `method` (see the module docstring) to the GGUF file `out`.

    calibration_data: see quant.calibration.calibration_tokens (None: the built-in corpus), of
    which n_samples windows of seq_len tokens are used; act_order: see quant.gptq.gptq_quantize;
    tokenizer: the model's (loaded from `src` when None and the method needs calibration).
    Raises UnsupportedModelError for an unknown method."""
    from .runtime.memory import peak_rss
    from .runtime.spec import open_model

    t0 = time.perf_counter()
    if method not in METHODS:
        raise UnsupportedModelError(f"unknown quantization method {method!r}; choose from {', '.join(METHODS)}")
    if method not in CALIBRATED:
        report = convert(src, out, quant=method, progress=progress)
        return QuantizeReport(path=report.path, method=method, bytes_written=report.bytes_written,
                              seconds=time.perf_counter() - t0, peak_rss=report.peak_rss)
    spec = open_model(src)
    arch, args = spec.arch, spec.args
    has_output = not args.tie_embeddings or getattr(arch, "GGUF_WRITES_TIED_OUTPUT", False)
    use_gptq = method != "rtn4"
    tokens = torch.zeros(1, 1, dtype=torch.long)
    if use_gptq:
        from .quant.calibration import calibration_tokens

        if tokenizer is None and not isinstance(calibration_data, torch.Tensor):
            tokenizer = spec.load_tokenizer()
        tokens = calibration_tokens(calibration_data, tokenizer, n_samples, min(seq_len, args.context_length))
        if int(tokens.max()) >= args.vocab_size:
            raise ValueError(f"calibration token id {int(tokens.max())} is outside the vocabulary ({args.vocab_size})")
    encoder = GPTQEncoder(arch, args, tokens, use_gptq, damp, batch, act_order, log)
    types = method_types(method, args.n_layers, has_output)
    report = convert(src, out, quant=CALIBRATED[method], progress=progress, encoder=encoder if use_gptq else None,
                     types=types)
    return QuantizeReport(path=report.path, method=method, bytes_written=report.bytes_written,
                          seconds=time.perf_counter() - t0, peak_rss=peak_rss(),
                          calibration_tokens=tokens.numel() if use_gptq else 0, layers=encoder.layers)
