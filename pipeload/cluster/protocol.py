"""Messages between the coordinator and the stages, over torch.distributed point-to-point.

Every message is one send of a fixed size on one tag: a header (int64[HEADER_LEN]) and an inline
slot for a small payload (a decode step); a larger payload (a prompt, logits) follows as a second
send of `nbytes` bytes. A payload holds the message's tensors back to back.
Control messages (new/free/reorder a KV cache, stop) travel down the pipeline in band, in order
with the data, so every stage applies them between the same two steps.

    header: op, step, cache, B, T, flags, row_start, row_stop, dtype, width, nbytes, aux, epoch, ...

    coordinator -> first stage (or every tensor-parallel rank)
      FORWARD     payload: tokens (B, T) int64, positions (B, T) int64,
                           [logit_index (B,) int64], [row spans (B, 2) int64]
    stage -> next stage
      FORWARD     payload: hidden (B, T, D) in the compute dtype, positions, [logit_index], [spans]
    last stage (every tensor-parallel rank) -> coordinator
      LOGITS      payload: logits (B, V) or (B, T, V) float32 (a tensor-parallel rank: its vocab slice)
      DONE        a replayed step (no head) went through; no payload
      ERROR       payload: utf-8 message of an exception a stage raised for this step
    control, down the pipeline: NEW_CACHE (aux = batch, width = max_len), FREE_CACHE, REORDER
      (payload: int64 index), MOVE_ROW (aux = src, width = dst, row_stop = length), STOP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .trace import TRACE

HEADER_LEN = 16
TAG = 7

# ops
FORWARD, LOGITS, DONE, ERROR, NEW_CACHE, FREE_CACHE, REORDER, MOVE_ROW, STOP = range(1, 10)
OP_NAMES = {FORWARD: "forward", LOGITS: "logits", DONE: "done", ERROR: "error", NEW_CACHE: "new_cache",
            FREE_CACHE: "free_cache", REORDER: "reorder", MOVE_ROW: "move_row", STOP: "stop"}
# flags
HAS_CACHE, HAS_LOGIT_INDEX, NO_HEAD, HAS_SPANS, IS_TOKENS = 1, 2, 4, 8, 16

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int64: 3, torch.uint8: 4}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass
class Message:
    """One protocol message: the header fields and the tensors of its payload."""

    op: int
    step: int = 0
    cache: int = 0
    B: int = 0
    T: int = 0
    flags: int = 0
    row_start: int = 0
    row_stop: int = 0
    dtype: int = 0
    width: int = 0
    aux: int = 0
    epoch: int = 0
    tensors: list[torch.Tensor] = field(default_factory=list)

    def header(self, nbytes: int) -> torch.Tensor:
        h = torch.zeros(HEADER_LEN, dtype=torch.int64)
        h[:13] = torch.tensor([self.op, self.step, self.cache, self.B, self.T, self.flags, self.row_start,
                               self.row_stop, self.dtype, self.width, nbytes, self.aux, self.epoch])
        return h

    @classmethod
    def from_header(cls, h: torch.Tensor) -> tuple["Message", int]:
        """(message without tensors, payload bytes) from a received header; raises ValueError on garbage."""
        v = h.tolist()
        if v[0] not in OP_NAMES:
            raise ValueError(f"received a message with unknown op {v[0]} (a peer of another pipeload version?)")
        m = cls(op=v[0], step=v[1], cache=v[2], B=v[3], T=v[4], flags=v[5], row_start=v[6], row_stop=v[7],
                dtype=v[8], width=v[9], aux=v[11], epoch=v[12])
        return m, v[10]


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous uint8 tensor holding the tensors' bytes back to back."""
    if not tensors:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack(payload: torch.Tensor, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
    """The tensors (dtype, shape) laid back to back in `payload`; raises ValueError if sizes differ."""
    out, at = [], 0
    for dtype, shape in specs:
        n = torch.empty(shape, dtype=dtype, device="meta").numel() * torch.empty(0, dtype=dtype).element_size()
        if at + n > payload.numel():
            raise ValueError(f"payload of {payload.numel()} bytes is too short for {specs}")
        out.append(payload[at:at + n].view(dtype).view(shape))
        at += n
    if at != payload.numel():
        raise ValueError(f"payload of {payload.numel()} bytes does not match {specs} ({at} bytes)")
    return out


def forward_specs(m: Message, hidden_width: int = 0) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The payload layout of a FORWARD message (tokens or hidden first)."""
    B, T = m.B, m.T
    first = (torch.int64, (B, T)) if m.flags & IS_TOKENS else (CODE_DTYPES[m.dtype], (B, T, m.width))
    specs = [first, (torch.int64, (B, T))]
    if m.flags & HAS_LOGIT_INDEX:
        specs.append((torch.int64, (B,)))
    if m.flags & HAS_SPANS:
        specs.append((torch.int64, (B, 2)))
    return specs


class Channel:
    """Sends and receives Messages with one process group; every wait is bounded by the group's
    timeout, and a peer that dies closes the connection, which raises at once (RuntimeError).

    A message whose payload fits the slot of its pair of ranks travels as one send of exactly
    HEADER_LEN * 8 + slot bytes; a larger one as that send plus a second with the payload. Between
    two workers the slot holds a decode step's hidden state (`slot`); to and from the coordinator
    (rank 0: tokens in, logits out) it is SMALL_SLOT. Both ends follow the same rule."""

    def __init__(self, pg, slot: int = 0):
        self.pg, self.hidden_slot = pg, slot
        self.bytes_sent = 0
        self.messages_sent = 0

    def send(self, m: Message, dst: int) -> None:
        """Send m to rank dst and wait until it is delivered; raises RuntimeError if dst is gone."""
        self.send_async(m, dst).wait()

    def send_async(self, m: Message, dst: int) -> "Sending":
        """Start sending m to rank dst; `.wait()` on the result returns once it is delivered (gloo
        hands a message over only when the receiver has posted its receive) and raises
        RuntimeError if dst is gone. The sender may compute the next message meanwhile."""
        t0 = time.perf_counter()
        payload = pack(m.tensors)
        n = payload.numel()
        slot = self._slot(dst)
        first = torch.zeros(HEADER_LEN * 8 + slot, dtype=torch.uint8)
        first[:HEADER_LEN * 8] = m.header(n).view(torch.uint8)
        inline = n <= slot
        if inline:
            first[HEADER_LEN * 8:HEADER_LEN * 8 + n] = payload
        t1 = time.perf_counter()
        works = [self.pg.send([first], dst, TAG)]
        TRACE.add("pack", "serialise", t0, t1, step=m.step, op=m.op, dst=dst)
        self.bytes_sent += first.numel()
        self.messages_sent += 1
        if not inline:
            works.append(self.pg.send([payload], dst, TAG))
            self.bytes_sent += n
            self.messages_sent += 1
        return Sending(works, (first, payload))

    def _slot(self, peer: int) -> int:
        return SMALL_SLOT if peer == 0 or self.pg.rank() == 0 else self.hidden_slot

    def recv(self, src: int) -> tuple[Message, torch.Tensor]:
        """(message without tensors, raw payload) from rank src; raises RuntimeError on a dead peer
        or after the group's timeout."""
        slot = self._slot(src)
        t0 = time.perf_counter()
        first = torch.empty(HEADER_LEN * 8 + slot, dtype=torch.uint8)
        self.pg.recv([first], src, TAG).wait()
        t1 = time.perf_counter()
        m, nbytes = Message.from_header(first[:HEADER_LEN * 8].view(torch.int64))
        if nbytes > slot:
            payload = torch.empty(nbytes, dtype=torch.uint8)
            self.pg.recv([payload], src, TAG).wait()
        else:
            payload = first[HEADER_LEN * 8:HEADER_LEN * 8 + nbytes]
        if TRACE.enabled:  # the wait, then the header's decoding (and a second payload's receive)
            TRACE.add("recv", "recv", t0, t1, step=m.step, op=m.op, src=src)
            TRACE.add("unpack", "serialise", t1, time.perf_counter(), step=m.step, op=m.op, src=src)
        return m, payload


class Sending:
    """Sends in flight; keeps their buffers alive until `wait()` has returned."""

    def __init__(self, works: list, buffers: tuple):
        self.works, self.buffers = works, buffers

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works, self.buffers = [], ()


# The point-to-point group's timeout. A stage (and the coordinator's receiver) waits for the next
# step for as long as the cluster sits idle, so its receives must not time out like a step does:
# a dead peer closes its connections (noticed at once) and stops beating (noticed by the monitor),
# and a step that takes too long is caught by the coordinator's own `step_timeout`.
IDLE_TIMEOUT_SECONDS = 7 * 24 * 3600

SMALL_SLOT = 256  # a decode step's tokens and positions for a few sequences


def slot_bytes(dim: int, dtype: torch.dtype) -> int:
    """The inline slot for a model: one token's hidden state with its positions and indices."""
    return dim * torch.empty(0, dtype=dtype).element_size() + 4 * 8
