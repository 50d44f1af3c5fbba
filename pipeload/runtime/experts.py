"""Expert-level streaming: routed experts read on demand, after the router has chosen, into a
cache sized by the memory budget (docs/DESIGN.md, "use expert sparsity").

The dense part of a mixture-of-experts layer (attention, norms, router, shared experts) is planned
like any weights (resident when it fits, else streamed through the prefetch ring). Its routed
experts are not: each block asks the `ExpertCache` (an ExpertSource, models/moe.py) for the
experts its router picked for the step's tokens (the union over the batch: each read once).

- An expert is three byte ranges of the stored tensors (weights/experts.py: rows of the stacked
  GGUF tensors), read into one slot of a pool of page-aligned slots (O_DIRECT, or buffered reads
  dropped from the page cache: the budget holds everything the process is charged for).
- Hits come out first, as one group; misses are read by several threads at once and handed to
  the block as they complete, so compute on some experts overlaps the reads of the others.
- Before computing, the next layer's router (with its feed-forward norm) is applied to this
  layer's hidden state: its top experts are a guess of what the next layer will pick, and their
  reads start now, behind this layer's misses. How often the guess is right is counted.
- Which expert leaves the cache when a slot is needed: one of the layer holding the most (so
  every layer keeps its share; see LayerBalanced), chosen within it by the policy: "lru" (least
  recently routed) or "lfu" (least often routed over the whole run, ties by recency). Experts
  in use or being read, and guesses not yet checked, are never evicted.
Results do not depend on any of this: the block sums expert outputs in a fixed order.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator

import torch
from torch import nn

from ..models.moe import EXPERT_PARTS, ExpertWeights, route, router_logits
from ..quant.ops import GGMLWeight
from ..weights.experts import ExpertPiece, expert_pieces, layer_expert_refs
from ..weights.io import ALIGN, RangeReader, aligned_buffer
from .moe_blocks import expert_weights

POLICIES = ("lru", "lfu")


def _span(piece: ExpertPiece) -> tuple[int, int]:
    """(aligned start, aligned length) of the read that covers a piece."""
    start = piece.offset // ALIGN * ALIGN
    return start, -(-(piece.offset + piece.nbytes) // ALIGN) * ALIGN - start


@dataclass
class ExpertGeometry:
    """Every routed expert's pieces, and the slots that hold them.

    A slot holds one expert of a layer: its three pieces side by side (`regions`). Layers may
    store experts in different types (a Q4_K_M file keeps some layers' down matrices in Q6_K:
    experts of 114 MB beside 99 MB in a Mixtral), so each layer has its own slot size, and a
    cache keeps a pool of slots per size (`carve`) rather than sizing every slot for the largest."""

    pieces: dict[int, list[dict[str, ExpertPiece]]]  # layer -> expert -> part -> piece
    regions: dict[int, dict[str, int]]                # layer -> part -> offset of its region in a slot
    layer_slot_bytes: dict[int, int]                  # layer -> the slot that holds any of its experts

    @property
    def n_experts(self) -> int:
        return sum(len(v) for v in self.pieces.values())

    @property
    def slot_bytes(self) -> int:
        """The largest slot (one that holds an expert of any layer)."""
        return max(self.layer_slot_bytes.values())

    @cached_property
    def _expert_sizes(self) -> dict[tuple[int, int], int]:
        # asked for every routed expert of every step: summed once
        return {(i, e): sum(p.nbytes for p in parts.values()) for i, layer in self.pieces.items()
                for e, parts in enumerate(layer)}

    def expert_bytes(self, layer: int, e: int) -> int:
        """File bytes of one expert (what routing it costs; reads add at most 8 KiB of alignment)."""
        return self._expert_sizes[(layer, e)]

    def read_bytes(self, layer: int, e: int) -> int:
        """Bytes actually read for one expert (its aligned spans)."""
        return sum(_span(p)[1] for p in self.pieces[layer][e].values())

    def carve(self, nbytes: int, top_k: int, extra: int = 0) -> dict[int, int]:
        """{slot size: count} of the slots `nbytes` holds, each slot costing `extra` bytes beside
        its size (float copies in the exact mode). Every layer gets the same number of slots, as the
        eviction keeps them (LayerBalanced), the bytes left over one more slot for as many layers
        as fit, the smallest first. Each pool must hold a layer's experts and the next layer's
        guesses (2 top_k slots); a budget too small for that in every pool gets slots of the
        largest size only, one pool as before."""
        size = {i: b + extra for i, b in self.layer_slot_bytes.items()}
        per_layer = nbytes // sum(size.values())
        counts: dict[int, int] = {}
        for i in size:
            counts[size[i]] = counts.get(size[i], 0) + per_layer
        left = nbytes - per_layer * sum(size.values())
        for i in sorted(size, key=lambda i: (size[i], i)):
            if size[i] <= left:
                counts[size[i]] += 1
                left -= size[i]
        if len(counts) > 1 and min(counts.values()) < 2 * top_k:
            largest = max(size.values())
            counts = {largest: nbytes // largest}
        # never more slots than the experts that use them (one pool serves every layer)
        if len(counts) == 1:
            users = {b: self.n_experts for b in counts}
        else:
            users = {}
            for i, b in size.items():
                users[b] = users.get(b, 0) + len(self.pieces[i])
        return {b - extra: min(n, users[b]) for b, n in counts.items() if n}


def expert_geometry(spec) -> ExpertGeometry:
    """The pieces of every routed expert of an MoE ModelSpec and the slot size of each layer;
    raises ModelFileError on inconsistent expert tensors."""
    n = spec.args.n_experts
    pieces = {i: expert_pieces(layer_expert_refs(spec.index.block(i).tensors), n, i) for i in range(spec.args.n_layers)}
    regions, sizes = {}, {}
    for i, layer in pieces.items():
        regions[i], at = {}, 0
        for part in EXPERT_PARTS:
            regions[i][part] = at
            at += max(_span(p[part])[1] for p in layer)
        sizes[i] = at
    return ExpertGeometry(pieces, regions, sizes)


class LRU:
    """Evict the expert routed least recently."""

    def __init__(self):
        self.order: OrderedDict = OrderedDict()

    def insert(self, key) -> None:
        self.order[key] = None

    def use(self, key) -> None:
        self.order.move_to_end(key)

    def remove(self, key) -> None:
        del self.order[key]

    def victims(self) -> Iterator:
        """Keys in eviction order, walked lazily over the live order (a copy of the whole cache
        per miss cost more than the read's bookkeeping): stop at the first key taken (removing
        it ends the walk)."""
        return iter(self.order)


class LFU:
    """Evict the expert routed least often so far in the run (counts outlive eviction), the
    least recent among equals."""

    def __init__(self):
        self.counts: dict = {}
        self.buckets: dict[int, OrderedDict] = {}

    def insert(self, key) -> None:
        self.buckets.setdefault(self.counts.get(key, 0), OrderedDict())[key] = None

    def use(self, key) -> None:
        c = self.counts.get(key, 0)
        del self.buckets[c][key]
        if not self.buckets[c]:
            del self.buckets[c]
        self.counts[key] = c + 1
        self.buckets.setdefault(c + 1, OrderedDict())[key] = None

    def remove(self, key) -> None:
        c = self.counts.get(key, 0)
        del self.buckets[c][key]
        if not self.buckets[c]:
            del self.buckets[c]

    def victims(self) -> Iterator:
        for c in sorted(self.buckets):  # lazily, as LRU.victims
            yield from self.buckets[c]


class LayerBalanced:
    """Evict from the layer holding the most cached experts (the layer asking, among equals), by
    `policy` (LRU or LFU) within that layer.

    Layers are visited in a fixed cycle. A cache-wide LRU evicts the experts of the layer that
    was visited longest ago, which is the layer visited next: with uniformly random routing (no
    expert more likely than another, so any cached expert is as good as any other) it then
    holds mostly experts of the layers just done, and hits less than its share of the experts
    (simulated, Mixtral-shaped 8 layers x 8 experts, top 2, 25 slots: 26% against 39%). Equal
    shares per layer hit 37%; skewed routers gain too (41% -> 51%: the popular experts of each
    layer stay)."""

    def __init__(self, policy: type):
        self.policy = policy
        self.layers: dict[int, LRU | LFU] = {}
        self.sizes: dict[int, int] = {}

    def insert(self, key) -> None:
        layer = key[0]
        if layer not in self.layers:
            self.layers[layer], self.sizes[layer] = self.policy(), 0
        self.layers[layer].insert(key)
        self.sizes[layer] += 1

    def use(self, key) -> None:
        self.layers[key[0]].use(key)

    def remove(self, key) -> None:
        self.layers[key[0]].remove(key)
        self.sizes[key[0]] -= 1

    def victims(self, layer: int) -> Iterator:
        """Keys in eviction order for a slot `layer` needs, lazily (see LRU.victims): the layer
        holding the most first (the asking one among equals, else the first such layer), then the
        others by size. Sorting every layer for every miss cost more than the read's bookkeeping;
        the first layer almost always has a victim."""
        if not self.sizes:
            return
        top = max(self.sizes.values())
        first = layer if self.sizes.get(layer) == top else next(i for i, n in self.sizes.items() if n == top)
        yield from self.layers[first].victims()
        for held in sorted(self.sizes, key=lambda i: (-self.sizes[i], i != layer)):
            if held != first:
                yield from self.layers[held].victims()


@dataclass
class ExpertStats:
    """What the cache did: expert uses split into hits (already cached), guess hits (read early
    because the previous layer's guess named them) and misses (read when asked); the guesses'
    accuracy; bytes of the experts routed and bytes read."""

    hits: int = 0
    guess_hits: int = 0
    misses: int = 0
    routed_bytes: int = 0            # file bytes of every expert a step used (one count per layer and step)
    read_bytes: int = 0              # bytes read for experts (aligned spans), guesses included
    guess_reads: int = 0             # experts read because of a guess
    guessed: int = 0                 # experts guessed (over layers that had a guess)
    guessed_right: int = 0           # of those, experts the layer then used
    routed_after_guess: int = 0      # experts used by layers that had a guess
    wait_seconds: float = 0.0        # compute thread waiting for expert reads
    evictions: int = 0
    by_layer: dict = field(default_factory=dict)  # layer -> [hits, guess_hits, misses]

    @property
    def uses(self) -> int:
        return self.hits + self.guess_hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Expert uses served from the cache without a read at the time of asking, guesses included."""
        return (self.hits + self.guess_hits) / self.uses if self.uses else float("nan")

    @property
    def guess_recall(self) -> float:
        """Share of the experts a layer used that the previous layer's guess had named."""
        return self.guessed_right / self.routed_after_guess if self.routed_after_guess else float("nan")

    @property
    def guess_precision(self) -> float:
        """Share of the guessed experts the layer then used."""
        return self.guessed_right / self.guessed if self.guessed else float("nan")

    def as_dict(self) -> dict:
        keys = ("hits", "guess_hits", "misses", "routed_bytes", "read_bytes", "guess_reads", "guessed",
                "guessed_right", "routed_after_guess", "wait_seconds", "evictions")
        out = {k: getattr(self, k) for k in keys}
        out.update(uses=self.uses, hit_rate=self.hit_rate, guess_recall=self.guess_recall,
                   guess_precision=self.guess_precision)
        return out


@dataclass
class _Entry:
    slot: int
    future: Future | None = None        # the read in flight, None once done
    weights: ExpertWeights | None = None
    pins: int = 0                       # uses in progress (never evicted while > 0)
    guess: bool = False                 # named by a guess not yet checked against the routing (kept)
    by_guess: bool = False              # read because of that guess (its first use is a guess hit)


class ExpertCache:
    """The routed experts of every layer, read on demand into reused slots (an ExpertSource for
    every MoE block of the model). `slots` is {slot size: count} (ExpertGeometry.carve: a pool of
    slots per size, each layer drawing on the smallest pool its experts fit)."""

    def __init__(self, spec, geometry: ExpertGeometry, slots: dict[int, int], policy: str = "lru",
                 io_mode: str = "direct", read_threads: int = 4,
                 guides: dict[int, tuple[nn.Module, nn.Module]] | None = None, stream_stats=None, guess: bool = True):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy must be one of {POLICIES}, got {policy!r}")
        if sum(slots.values()) < 1:
            raise ValueError(f"an expert cache needs at least one slot, got {slots}")
        self.spec, self.geometry, self.io_mode = spec, geometry, io_mode
        self.top_k, self.n_layers = spec.args.top_k, spec.args.n_layers
        self.n_slots, self.policy_name = sum(slots.values()), policy
        # each layer's pool: the smallest slot size that holds its experts
        self.pool_of = {}
        for layer, need in geometry.layer_slot_bytes.items():
            fits = [size for size, n in slots.items() if size >= need and n > 0]
            if not fits:
                raise ValueError(f"expert cache: no slot holds layer {layer}'s experts ({need} bytes; slots {slots})")
            self.pool_of[layer] = min(fits)
        self.slot_at: list[tuple[int, int]] = []  # slot -> (offset in the arena, size)
        self.free: dict[int, deque[int]] = {}     # pool (slot size) -> its free slots
        at = 0
        for size, n in sorted(slots.items()):
            self.free[size] = deque(range(len(self.slot_at), len(self.slot_at) + n))
            self.slot_at += [(at + j * size, size) for j in range(n)]
            at += n * size
        self.arena = aligned_buffer(sum(size * n for size, n in slots.items()))  # one mapping for every slot
        self.entries: dict[tuple[int, int], _Entry] = {}
        # eviction within a pool: a layer's slots can only be taken from layers of its pool
        self.policies = {size: LayerBalanced(LRU if policy == "lru" else LFU) for size in slots}
        self.pool_slots = dict(slots)
        self.guides = guides or {}            # layer -> (feed-forward norm, router) for guessing
        self.guess = guess                     # guessing on; it needs guides (set by the engine)
        self.guesses: dict[int, set[int]] = {}  # layer -> experts guessed for its next use
        self.stats = ExpertStats()
        self.stream_stats = stream_stats       # the run's StreamStats (bytes_read shared with the ring)
        self.reader = RangeReader()
        self.pool = ThreadPoolExecutor(read_threads, thread_name_prefix="pipeload-experts")
        self.file_sizes = {p.ref.info.path: p.ref.info.path.stat().st_size
                           for layer in geometry.pieces.values() for p in layer[0].values()}
        self.where = f"{spec.path}: experts"
        self.lock = threading.Lock()
        self._layouts: dict[tuple[int, int], list] = {}  # (layer, expert) -> where its matrices sit in a slot

    @property
    def nbytes(self) -> int:
        return sum(size * n for size, n in self.pool_slots.items())

    def _policy(self, layer: int) -> LayerBalanced:
        return self.policies[self.pool_of[layer]]

    # -- reading --------------------------------------------------------------------------------

    def _slot(self, slot: int) -> torch.Tensor:
        at, size = self.slot_at[slot]
        return self.arena[at:at + size]

    def _read(self, layer: int, e: int, slot: int) -> int:
        """Read expert e of `layer` into `slot` (on a pool thread); returns the bytes read."""
        buf, total = self._slot(slot), 0
        for part in EXPERT_PARTS:
            piece = self.geometry.pieces[layer][e][part]
            start, length = _span(piece)
            path = piece.ref.info.path
            if self.io_mode != "direct":
                length = min(length, self.file_sizes[path] - start)
            at = self.geometry.regions[layer][part]
            self.reader.read_into(path, start, buf[at:at + length], self.io_mode == "direct")
            total += length
        # counted when read, used or not (a wrong guess's read costs as much as a miss)
        with self.lock:
            self.stats.read_bytes += total
        if self.stream_stats is not None:
            with self.stream_stats.lock:
                self.stream_stats.bytes_read += total
        return total

    def _views(self, layer: int, e: int, slot: int) -> ExpertWeights:
        """The expert's (gate, up, down) over its slot. Built and checked through expert_weights
        the first time; later reads of the same expert reuse that layout (where each matrix sits
        in the slot, its type and shape) and only make the views."""
        layout = self._layouts.get((layer, e))
        if layout is not None:
            base = self.slot_at[slot][0]
            return tuple(GGMLWeight.trusted_view(qtype, shape, self.arena[base + at:base + at + n].view(shape[0], -1),
                                                 name) for at, n, qtype, shape, name in layout)
        buf, pieces, raw = self._slot(slot), self.geometry.pieces[layer][e], []
        for part in EXPERT_PARTS:
            piece = pieces[part]
            at = self.geometry.regions[layer][part] + piece.offset - _span(piece)[0]
            raw.append(buf[at:at + piece.nbytes])
        weights = expert_weights(pieces, raw, self.spec.args.expert_ffn_dim, self.spec.args.dim, self.spec.exact,
                                 self.where)
        # reusable only where every matrix is the slot's own bytes (not a materialized float copy)
        if all(w.blocks.data_ptr() == r.data_ptr() and w.blocks.numel() == r.numel() for w, r in zip(weights, raw)):
            self._layouts[(layer, e)] = [(r.data_ptr() - buf.data_ptr(), r.numel(), w.qtype, w.shape, w.name)
                                         for w, r in zip(weights, raw)]
        return weights

    def _take_slot(self, layer: int) -> int | None:
        """A free slot for an expert of `layer`, evicting by the policy if needed; None when
        every slot is in use."""
        pool = self.pool_of[layer]
        if self.free[pool]:
            return self.free[pool].popleft()
        policy = self.policies[pool]
        for key in policy.victims(layer):
            entry = self.entries[key]
            # a read in flight is never evicted; a finished one nobody used (a wrong guess) may be,
            # and a read error of it goes with it (it would be raised on use)
            if entry.pins == 0 and not entry.guess and (entry.future is None or entry.future.done()):
                policy.remove(key)
                del self.entries[key]
                self.stats.evictions += 1
                return entry.slot
        return None

    def _start(self, layer: int, e: int, guess: bool = False) -> _Entry | None:
        """Begin reading an expert into a slot; None when no slot can be had."""
        slot = self._take_slot(layer)
        if slot is None:
            return None
        entry = _Entry(slot, self.pool.submit(self._read, layer, e, slot), guess=guess, by_guess=guess)
        self.entries[(layer, e)] = entry
        self._policy(layer).insert((layer, e))
        return entry

    def _finish(self, layer: int, e: int, entry: _Entry) -> None:
        """The read of an entry is done: build its weights (re-raises read errors)."""
        entry.future.result()
        entry.future = None
        entry.weights = self._views(layer, e, entry.slot)

    # -- guessing the next layer -----------------------------------------------------------------

    def _guess(self, layer: int, hidden: torch.Tensor, limit: int) -> None:
        """Apply layer+1's router to `hidden` (N, D) and start reading its top experts."""
        nxt = layer + 1
        if not self.guess or nxt >= self.n_layers or nxt not in self.guides or limit <= 0:
            return
        norm, router = self.guides[nxt]
        weights, chosen = route(router_logits(router, norm(hidden)), self.top_k, False)  # (N, k)
        score = torch.zeros(self.spec.args.n_experts).index_add_(0, chosen.reshape(-1), weights.reshape(-1))
        scores = score.tolist()
        picked = [e for e in torch.argsort(score, descending=True, stable=True).tolist() if scores[e] > 0][:limit]
        self.guesses.setdefault(nxt, set()).update(picked)  # several calls per layer in a step add up
        for e in picked:
            entry = self.entries.get((nxt, e))
            if entry is not None:
                entry.guess = True  # keep it until the next layer has routed
            elif self._start(nxt, e, guess=True) is not None:
                self.stats.guess_reads += 1

    # -- ExpertSource ---------------------------------------------------------------------------

    def fetch(self, layer: int, experts: list[int], hidden: torch.Tensor) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """Each of `experts` of `layer` with its weights, in groups: the cached ones first, the
        rest as their reads complete (see the module docstring); re-raises read errors."""
        st = self.stats
        guessed = self.guesses.pop(layer, set())
        if guessed:
            st.guessed += len(guessed)
            st.guessed_right += len(guessed.intersection(experts))
            st.routed_after_guess += len(experts)
        ready, reading, todo = [], {}, deque()
        per_layer = st.by_layer.setdefault(layer, [0, 0, 0])
        for e in experts:
            key = (layer, e)
            st.routed_bytes += self.geometry.expert_bytes(layer, e)
            entry = self.entries.get(key)
            if entry is None:
                todo.append(e)
                continue
            kind = 1 if entry.by_guess else 0
            st.guess_hits += kind
            st.hits += 1 - kind
            per_layer[kind] += 1
            entry.pins += 1
            self._policy(layer).use(key)
            if entry.future is not None:
                reading[entry.future] = e
            else:
                ready.append(e)
        for e in guessed:  # checked: guesses are ordinary cache entries from now on
            entry = self.entries.get((layer, e))
            if entry is not None:
                entry.guess = entry.by_guess = False
        st.misses += len(todo)
        per_layer[2] += len(todo)
        guessed_now = False
        try:
            while ready or reading or todo:
                while todo:
                    entry = self._start(layer, todo[0])
                    if entry is None:
                        break
                    e = todo.popleft()
                    entry.pins += 1
                    self._policy(layer).use((layer, e))
                    reading[entry.future] = e
                if not guessed_now and not todo:  # after this layer's own reads, so they come first
                    guessed_now = True
                    self._guess(layer, hidden, self._guess_limit(layer, hidden.shape[0]))
                if not ready:
                    if not reading:
                        raise RuntimeError(f"expert cache of {self.pool_slots[self.pool_of[layer]]} slots of "
                                           f"{self.pool_of[layer]} bytes cannot hold what layer {layer} needs")
                    t0 = time.perf_counter()
                    done, _ = wait(list(reading), return_when=FIRST_COMPLETED)
                    st.wait_seconds += time.perf_counter() - t0
                    for fut in done:
                        e = reading.pop(fut)
                        entry = self.entries[(layer, e)]
                        if entry.future is fut:  # a guess read another use of this layer already finished
                            self._finish(layer, e, entry)
                        ready.append(e)
                group, ready = ready, []
                entries = [self.entries[(layer, e)] for e in group]
                try:
                    for e, entry in zip(group, entries):
                        if entry.future is not None:
                            self._finish(layer, e, entry)
                    yield [(e, entry.weights) for e, entry in zip(group, entries)]
                finally:
                    for entry in entries:
                        entry.pins -= 1
        finally:
            for fut, e in reading.items():  # the consumer stopped early: let the reads land, keep them
                entry = self.entries[(layer, e)]
                if entry.future is fut:
                    self._finish(layer, e, entry)
                entry.pins -= 1
            for e in ready:
                self.entries[(layer, e)].pins -= 1

    def _guess_limit(self, layer: int, rows: int) -> int:
        """At most this many experts are guessed: the next layer's k per row (a few rows), and
        never more than a third of the next layer's pool (guesses must not crowd out the cache)."""
        return min(self.top_k * min(rows, 4), self.pool_slots[self.pool_of[min(layer + 1, self.n_layers - 1)]] // 3)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.reader.close()


class _Guide(nn.Module):
    """A layer's feed-forward norm and router, held apart from the layer (it streams)."""

    def __init__(self, norm: nn.Module, router: nn.Module):
        super().__init__()
        self.ffn_norm, self.ffn_gate_inp = norm, router


def router_guides(spec, blocks: dict[int, nn.Module], reader: RangeReader, io_mode: str) -> dict[int, tuple]:
    """{layer: (feed-forward norm, router)} of every layer, for guessing its experts from the
    previous layer: the resident blocks' own modules, or for streamed layers those two tensors
    read once (the plan counts them as guide_bytes)."""
    from .blocks import attach
    from .moe_plan import guide_layout
    from .streaming import read_resident

    out = {}
    for i in range(spec.args.n_layers):
        if i in blocks:
            out[i] = (blocks[i].ffn_norm, blocks[i].ffn_gate_inp)
            continue
        skeleton = spec.arch.Block(spec.args, i)
        guide = _Guide(skeleton.ffn_norm, skeleton.ffn_gate_inp)
        attach(guide, read_resident(guide_layout(spec.index.block(i)), reader, io_mode), f"blk.{i}.", spec.dtype,
               f"{spec.path}: layer {i} router", exact=spec.exact)
        out[i] = (guide.ffn_norm, guide.ffn_gate_inp)
    return out
