"""Placement: which node runs which layers, and how fast that will be. Pure functions, no I/O.

A pipeline gives each node a contiguous range of layers. With one stream a token visits every
stage in turn, so its time is the sum of the stage times plus one network hop per stage; with K
streams in flight the stages work on different streams at once, so throughput is limited by the
slowest stage (and by K over the round trip). The planner therefore picks the ranges that
minimise the slowest stage (ties: the smallest sum), by dynamic programming over the layers.

A stage's time per token is its compute (bytes / the node's decode bandwidth, measured) and,
when its layers do not fit its memory, the reading of the layers that stream (bytes / disk
bandwidth), overlapped with compute. Nodes on one host share that host's cores.

Tensor parallel splits every layer's heads and feed-forward columns over all nodes in
proportion to their speed and pays two all-reduces per layer on the link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..runtime.memory import PREFETCH_DEPTH

INF = float("inf")


@dataclass(frozen=True)
class NodeSpec:
    """What placement knows about one node (from `pipeload probe` or a live worker's calibration)."""

    name: str
    memory_bytes: int            # for this node's weights and KV cache (after the runtime itself)
    decode_bandwidth: float      # bytes/s of weights the decode kernels get through (measured)
    disk_bandwidth: float = 1e9  # bytes/s of streamed reads (O_DIRECT or buffered, the faster)
    layer_overhead: float = 0.0  # seconds per layer beyond the bytes (dispatch, attention)
    host: str = ""               # nodes with the same host share its cores
    host_cores: int = 0          # cores of that host (0: not shared)
    step_overhead: float = 0.0   # seconds per step of a stage beyond its layers (masks, rope tables, messages)


@dataclass(frozen=True)
class LinkSpec:
    """The network between nodes (one-way latency, bytes/s)."""

    latency: float = 100e-6
    bandwidth: float = 125e6


@dataclass(frozen=True)
class ModelCost:
    """What one token costs, per layer, in the format the kernels use."""

    layer_bytes: tuple[int, ...]
    head_bytes: int
    hidden_bytes: int            # one token's hidden state on the wire
    logits_bytes: int            # one token's logits back to the coordinator
    kv_bytes_per_token: int      # one layer's K and V for one position of one sequence

    @property
    def n_layers(self) -> int:
        return len(self.layer_bytes)


@dataclass
class Stage:
    node: str
    start: int
    stop: int
    resident_bytes: int = 0
    streamed_bytes: int = 0
    seconds: float = 0.0         # per token at batch 1
    busy_seconds: float = 0.0    # the same while every stage works (measured on a live cluster, where
                                 # co-hosted stages share the host; else as seconds)

    @property
    def layers(self) -> range:
        return range(self.start, self.stop)


@dataclass
class Placement:
    """A pipeline plan: stages in order, each a node's contiguous layer range (head on the last)."""

    stages: list[Stage]
    hop_seconds: float           # one hop of a token's hidden state
    notes: list[str] = field(default_factory=list)
    client_seconds: float = 0.0  # the coordinator's own work per token (sampling, the generation loop)
    return_seconds: float = 0.0  # the logits' way back from the last stage to the coordinator

    @property
    def bottleneck(self) -> float:
        return max(s.seconds for s in self.stages)

    def round_trip(self) -> float:
        """Seconds for one token of one stream: every stage plus a hop into and out of each."""
        return (sum(s.seconds for s in self.stages) + len(self.stages) * self.hop_seconds + self.return_seconds
                + self.client_seconds)

    def tokens_per_second(self, streams: int = 1, host_limits: dict[str, float] | None = None) -> float:
        """Predicted decode tokens/s of `streams` independent streams in flight. One stream keeps
        one stage busy at a time; several keep stages busy together, which on a shared host
        runs each at its measured busy speed."""
        rate = min(streams / self.round_trip(), 1.0 / self.bottleneck)
        if streams > 1 and all(s.busy_seconds for s in self.stages):
            busy_trip = self.round_trip() + sum(s.busy_seconds - s.seconds for s in self.stages)
            rate = min(streams / busy_trip, 1.0 / max(s.busy_seconds for s in self.stages))
        if self.client_seconds:
            rate = min(rate, 1.0 / self.client_seconds)
        for limit in (host_limits or {}).values():
            rate = min(rate, limit)
        return rate

    def as_dict(self) -> dict:
        return {"stages": [vars(s) for s in self.stages], "hop_seconds": self.hop_seconds, "notes": self.notes}


def stage_cost(node: NodeSpec, cost: ModelCost, start: int, stop: int, context: int, batch: int,
               with_head: bool, prefetch_depth: int = PREFETCH_DEPTH) -> tuple[float, int, int]:
    """(seconds per token, resident bytes, streamed bytes) of `node` running layers start..stop-1
    (and the head); seconds is inf when not even a streaming ring fits its memory."""
    sizes = list(cost.layer_bytes[start:stop]) + ([cost.head_bytes] if with_head else [])
    if not sizes:
        return 0.0, 0, 0
    total = sum(sizes)
    kv = cost.kv_bytes_per_token * (stop - start) * context * batch
    compute = total / node.decode_bandwidth + node.layer_overhead * len(sizes) + node.step_overhead
    room = node.memory_bytes - kv
    if total <= room:
        return compute, total, 0
    ring = (prefetch_depth + 1) * max(sizes)
    if room - ring <= 0:
        return INF, 0, total
    # the largest groups stay resident first: fewer bytes to stream per pass
    resident = 0
    for size in sorted(sizes, reverse=True):
        if resident + size <= room - ring:
            resident += size
    streamed = total - resident
    return max(compute, streamed / node.disk_bandwidth), resident, streamed


def hop_seconds(cost: ModelCost, link: LinkSpec, batch: int = 1) -> float:
    """One message of a token's hidden state over the link (one send: header and inline payload)."""
    return link.latency + batch * cost.hidden_bytes / link.bandwidth


def return_seconds(cost: ModelCost, link: LinkSpec, batch: int = 1) -> float:
    """The logits back to the coordinator (two sends: header, then the logits)."""
    return 2 * link.latency + batch * cost.logits_bytes / link.bandwidth


def place_pipeline(nodes: list[NodeSpec], cost: ModelCost, link: LinkSpec, context: int, batch: int = 1,
                   prefetch_depth: int = PREFETCH_DEPTH, every_node: bool = True) -> Placement:
    """Contiguous layer ranges for the nodes, in their order, minimising the slowest stage (then
    the sum). With every_node, each node gets at least one layer (when there are enough layers);
    else a node that cannot make the pipeline faster gets none. Raises ValueError if no
    assignment fits the memories."""
    if not nodes:
        raise ValueError("placement needs at least one node")
    L, N = cost.n_layers, len(nodes)
    least = 1 if every_node and L >= N else 0
    # best[j][i]: (slowest, sum) for layers 0..i-1 over nodes 0..j-1; cut[j][i]: where node j-1 starts
    best = [[(INF, INF)] * (L + 1) for _ in range(N + 1)]
    cut = [[0] * (L + 1) for _ in range(N + 1)]
    best[0][0] = (0.0, 0.0)
    for j in range(1, N + 1):
        for i in range(L + 1):
            for k in range(i + 1 - least):
                prev = best[j - 1][k]
                if prev[0] == INF:
                    continue
                # the segment that ends the model carries the head
                secs, _, _ = stage_cost(nodes[j - 1], cost, k, i, context, batch, with_head=(i == L and k < i),
                                        prefetch_depth=prefetch_depth)
                cand = (max(prev[0], secs), prev[1] + secs)
                if cand < best[j][i]:
                    best[j][i], cut[j][i] = cand, k
    ranges, i = [], L
    for j in range(N, 0, -1):
        k = cut[j][i]
        ranges.append((k, i))
        i = k
    ranges.reverse()
    if best[N][L][0] == INF:
        raise ValueError(f"the model's {L} layers do not fit the nodes' memories even when streamed: "
                         + ", ".join(f"{n.name} {n.memory_bytes / 1e9:.2f} GB" for n in nodes))
    used = [(n, r) for n, r in zip(nodes, ranges) if r[1] > r[0]]
    stages = []
    for idx, (node, (start, stop)) in enumerate(used):
        secs, res, streamed = stage_cost(node, cost, start, stop, context, batch, with_head=idx == len(used) - 1,
                                         prefetch_depth=prefetch_depth)
        if secs == INF:
            raise ValueError(f"node {node.name} cannot hold layers {start}..{stop - 1} and the head even streamed")
        stages.append(Stage(node.name, start, stop, res, streamed, secs, secs))
    placement = Placement(stages, hop_seconds(cost, link, batch), return_seconds=return_seconds(cost, link, batch))
    for node, (start, stop) in zip(nodes, ranges):
        if stop == start:
            placement.notes.append(f"{node.name} gets no layers: the others are faster without it")
    for s in stages:
        if s.streamed_bytes:
            placement.notes.append(f"{s.node} streams {s.streamed_bytes / 1e6:.0f} MB per token (more layers "
                                   f"than its memory holds is still the fastest plan)")
    return placement


def host_limits(placement: Placement, nodes: list[NodeSpec]) -> dict[str, float]:
    """tokens/s ceilings of hosts whose cores several stages share: cores / their compute per token."""
    by_name = {n.name: n for n in nodes}
    per_host: dict[str, float] = {}
    for s in placement.stages:
        node = by_name[s.node]
        if node.host and node.host_cores:
            per_host[node.host] = per_host.get(node.host, 0.0) + s.seconds
    cores = {h: max(n.host_cores for n in nodes if n.host == h) for h in per_host}
    return {h: cores[h] / secs for h, secs in per_host.items() if secs > 0}


def replan_without(placement: Placement, dead: set[str], nodes: list[NodeSpec], cost: ModelCost,
                   context: int, batch: int = 1) -> Placement:
    """The placement after the nodes `dead` are gone: survivors keep the layers they hold and each
    lost range goes to its neighbours (split where the slower of the two is fastest).
    Raises ValueError when no node survives."""
    by_name = {n.name: n for n in nodes}
    alive = [Stage(s.node, s.start, s.stop) for s in placement.stages if s.node not in dead]
    if not alive:
        raise ValueError("no worker survives: the cluster cannot continue")
    # the gaps the dead stages left: extend survivors over them
    for idx, s in enumerate(alive):
        nxt = alive[idx + 1] if idx + 1 < len(alive) else None
        gap_start, gap_stop = s.stop, (nxt.start if nxt else cost.n_layers)
        if idx == 0:
            s.start = 0
        if gap_stop <= gap_start:
            continue
        if nxt is None:
            s.stop = gap_stop
            continue
        best = None
        for split in range(gap_start, gap_stop + 1):
            a = stage_cost(by_name[s.node], cost, s.start, split, context, batch, False)[0]
            b = stage_cost(by_name[nxt.node], cost, split, nxt.stop, context, batch, nxt is alive[-1])[0]
            key = (max(a, b), a + b)
            if best is None or key < best[0]:
                best = (key, split)
        s.stop = nxt.start = best[1]
    out = [s for s in alive if s.stop > s.start] or alive[:1]
    for idx, s in enumerate(out):
        s.seconds, s.resident_bytes, s.streamed_bytes = stage_cost(by_name[s.node], cost, s.start, s.stop, context,
                                                                   batch, idx == len(out) - 1)
    return Placement(out, placement.hop_seconds, [f"re-planned without {', '.join(sorted(dead))}"],
                     placement.client_seconds, placement.return_seconds)


# ---------------------------------------------------------------------------------------------
# Tensor parallel


def proportional_split(units: int, weights: list[float], minimum: int = 1) -> list[tuple[int, int]]:
    """Contiguous (start, stop) ranges of `units` in proportion to `weights` (largest remainder),
    each with at least `minimum` units. Raises ValueError if there are too few units."""
    n = len(weights)
    if units < minimum * n:
        raise ValueError(f"{units} units cannot give {n} ranks at least {minimum} each")
    total = sum(weights)
    raw = [minimum + (units - minimum * n) * w / total for w in weights]
    counts = [math.floor(r) for r in raw]
    for i in sorted(range(n), key=lambda i: raw[i] - counts[i], reverse=True)[:units - sum(counts)]:
        counts[i] += 1
    out, at = [], 0
    for c in counts:
        out.append((at, at + c))
        at += c
    return out


def predict_tensor_parallel(nodes: list[NodeSpec], cost: ModelCost, link: LinkSpec, streams: int = 1,
                            client_seconds: float = 0.0, allreduce_seconds: float | None = None,
                            layer_seconds: float | None = None) -> float:
    """Predicted decode tokens/s of tensor parallelism over `nodes`: every rank reads its share of
    each layer (in proportion to its speed), then two all-reduces per layer; a step occupies all
    ranks, so streams overlap only the coordinator's own work. `layer_seconds`: a decode step
    measured on the live ranks, per layer (compute and both all-reduces, all ranks at once), else
    compute from the node speeds plus `allreduce_seconds` (measured, else a ring's 2(N-1)
    latency-bound rounds) twice per layer."""
    speed = sum(n.decode_bandwidth for n in nodes)
    overhead = max(n.step_overhead for n in nodes)
    N = len(nodes)
    if layer_seconds is not None:
        layers = layer_seconds * cost.n_layers + cost.head_bytes / speed + max(n.layer_overhead for n in nodes)
    else:
        if allreduce_seconds is None:
            allreduce_seconds = 0.0 if N == 1 else (2 * (N - 1) * link.latency
                                                    + 2 * (N - 1) / N * cost.hidden_bytes * 2 / link.bandwidth)
        total = sum(cost.layer_bytes) + cost.head_bytes
        layers = (total / speed + max(n.layer_overhead for n in nodes) * (cost.n_layers + 1)
                  + 2 * cost.n_layers * allreduce_seconds)
    step = (layers + overhead + hop_seconds(cost, link)
            + 2 * link.latency + cost.logits_bytes / N / link.bandwidth)
    rate = min(streams / (step + client_seconds), 1.0 / step)
    return min(rate, 1.0 / client_seconds) if client_seconds else rate


def even_out_host_peers(nodes: list[NodeSpec], tolerance: float = 0.2) -> list[NodeSpec]:
    """Nodes of one host whose measured speeds differ by less than `tolerance` get their median
    speed: the same cores measured at slightly different moments differ by noise (workers that
    calibrate at once disturb each other), and splitting layers or heads on noise makes the
    slower-measured node the one with more to do."""
    out = list(nodes)
    hosts: dict[str, list[int]] = {}
    for k, n in enumerate(nodes):
        if n.host:
            hosts.setdefault(n.host, []).append(k)
    for members in hosts.values():
        speeds = sorted(nodes[k].decode_bandwidth for k in members)
        if len(members) > 1 and speeds[-1] <= (1 + tolerance) * speeds[0]:
            median = speeds[len(speeds) // 2]
            for k in members:
                out[k] = replace(nodes[k], decode_bandwidth=median)
    return out
