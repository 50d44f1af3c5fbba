"""Forming a cluster and presenting it as an Engine.

`connect_cluster(model, "HOST:PORT", workers=N)` listens on HOST:PORT, waits for N workers
(`pipeload worker --join HOST:PORT --model PATH` on each node), checks their version and model
file, places the layers from their measured speeds and memories, and returns a `ClusterEngine`
that `PipelineModel`, `TokenGenerator`, the CLI and the server use like a local Engine.
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..runtime.executor import PREFILL_CHUNK
from ..runtime.kv_cache import KVCache
from ..runtime.spec import ModelSpec, SpecView, open_model
from .coordinator import Coordinator, RemoteCache
from .placement import (LinkSpec, ModelCost, NodeSpec, Placement, even_out_host_peers, host_limits, place_pipeline,
                        predict_tensor_parallel, replan_without)
from .rendezvous import (ClusterError, check_hello, fingerprint, get_json, host_store, join_store, parse_address,
                         set_json)
from .stage import Assignment

MODES = ("pipeline", "tensor")
RUNTIME_BYTES = 400 << 20  # a worker process before weights (Python, torch): kept out of its node's memory


def model_cost(spec: ModelSpec) -> ModelCost:
    """Per-layer bytes (the file's, as computed on) and the bytes a token puts on the wire."""
    from ..runtime.planner import group_sizes

    args, dtype = spec.args, spec.dtype
    _, spans, _, _ = group_sizes(spec)
    size = torch.empty(0, dtype=dtype).element_size()
    n_kv = getattr(args, "n_kv_heads", getattr(args, "n_heads", 1))
    head_dim = getattr(args, "head_dim", args.dim // max(1, getattr(args, "n_heads", 1)))
    return ModelCost(tuple(spans[f"blk.{i}"] for i in range(args.n_layers)), spans["head"],
                     hidden_bytes=args.dim * size + 16, logits_bytes=args.vocab_size * 4,
                     kv_bytes_per_token=2 * n_kv * head_dim * size)


class _InstantCache:
    def reorder(self, index) -> None:
        pass


class _InstantEngine:
    """Answers every step at once with random logits: what is left is the coordinator's own work."""

    def __init__(self, vocab: int, context: int):
        self.vocab, self.context_length, self.executor = vocab, context, self

    def new_cache(self, batch: int, max_len: int) -> _InstantCache:
        return _InstantCache()

    def forward(self, tokens, positions, cache, logit_index=None, rows=None) -> torch.Tensor:
        return torch.randn(tokens.shape[0], self.vocab)


def client_seconds(vocab: int, steps: int = 12) -> float:
    """Seconds the coordinator spends per generated token of one stream: the generation loop
    (runtime/generation.py) and greedy sampling over `vocab` logits, against an engine that
    answers instantly."""
    from ..runtime.generation import stream_generate
    from ..runtime.sampling import SamplingParams

    engine = _InstantEngine(vocab, steps + 16)
    times, t0 = [], time.perf_counter()
    for _ in stream_generate(engine, None, [[1, 2, 3]], SamplingParams(), max_tokens=steps, ignore_eos=True):
        now = time.perf_counter()
        times.append(now - t0)
        t0 = now
    times = sorted(times[2:])
    return times[len(times) // 2]


def stage_timings(store, ids: list[int], hellos: dict[int, dict], alone_seconds: float = 0.3,
                  together_seconds: float = 0.5, timeout: float = 30.0) -> dict[int, tuple[float, float]]:
    """{worker id: (seconds of its stage's step alone, the same while all stages step at once)}
    for the live pipeline, timed by the workers in wall-clock windows: one per worker alone,
    then one for all (only where workers share a host; elsewhere all at once is alone). Workers
    that do not answer are left out."""
    shared = len({hellos[wid].get("host", "") for wid in ids}) < len(ids)
    start, gap, windows = time.time() + 1.0, 0.2, []  # heartbeats see the windows within 0.2 s
    for wid in (ids if shared else []):
        windows.append({"start": start, "seconds": alone_seconds, "who": [wid]})
        start += alone_seconds + gap
    windows.append({"start": start, "seconds": together_seconds, "who": list(ids)})
    set_json(store, "windows", windows)
    got: dict[int, list] = {}
    deadline = start + together_seconds + timeout
    while len(got) < len(ids) and time.time() < deadline:
        for wid in ids:
            if wid not in got and store.check([f"windows/{wid}"]):
                got[wid] = get_json(store, f"windows/{wid}")
        time.sleep(0.05)
    return {wid: (t[0], t[-1]) for wid, t in got.items() if t and all(t)}


def node_spec(wid: int, h: dict) -> NodeSpec:
    """A NodeSpec from a worker's hello (its calibration and memory)."""
    if h.get("memory_limit"):
        memory = h["memory_limit"] - h.get("rss", RUNTIME_BYTES)
    else:
        memory = int(h.get("free_memory", 8 << 30) * 0.8)
    return NodeSpec(str(wid), memory, h["decode_bandwidth"], h.get("disk_bandwidth", 1e9), 0.0,
                    h.get("host", ""), h.get("cores", 0), h.get("step_overhead", 0.0))


@dataclass
class ClusterExecutor:
    """The Executor interface (forward) over a cluster."""

    coordinator: Coordinator
    n_layers: int
    prefill_chunk: int = PREFILL_CHUNK
    profile: bool = False
    layer_seconds: list = field(default_factory=list)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache, logit_index=None,
                rows=None) -> torch.Tensor:
        """Logits (B, V) with logit_index, else (B, T, V), float32, as Executor.forward."""
        return self.coordinator.forward(tokens, positions, cache, logit_index, rows)


@dataclass
class ClusterEngine(SpecView):
    """An Engine whose layers run on the workers of a cluster (see runtime/engine.py)."""

    spec: ModelSpec
    executor: ClusterExecutor
    coordinator: Coordinator
    summary: dict
    context: int = 0
    plan: Any = None
    io_mode: str | None = None
    model: Any = None

    @property
    def pipeline_depth(self) -> int:
        """Steps that can usefully be in flight at once: the number of pipeline stages (1 in
        tensor parallel, where every step occupies every rank). The server keeps this many
        micro-batches going."""
        plan = self.coordinator.plan
        return len(plan.get("order", ())) if self.coordinator.mode == "pipeline" else 1

    @property
    def stream_stats(self):
        return None

    def new_cache(self, batch: int, max_len: int) -> RemoteCache:
        a = self.args
        n_kv = getattr(a, "n_kv_heads", getattr(a, "n_heads", 1))
        nbytes = KVCache.bytes_needed(a.n_layers, batch, n_kv, getattr(a, "head_dim", a.dim // a.n_heads), max_len,
                                      self.dtype)
        return RemoteCache(self.coordinator, batch, max_len, nbytes)

    @property
    def recoveries(self) -> list[dict]:
        return self.coordinator.recoveries

    def close(self) -> None:
        self.coordinator.close()


def _accept_workers(store, n: int, fp: str, timeout: float, step_timeout: float,
                    token: str | None = None) -> dict[int, dict]:
    """{worker id: hello} of the first n workers whose hello passes and who prove they know the
    join token (cluster/auth.py; without a token, who answer the challenge); refused ones are told
    why. Raises ClusterError when fewer than n pass within `timeout` seconds."""
    import json

    from .. import __version__
    from . import auth

    accepted: dict[int, dict] = {}
    challenged: dict[int, tuple[dict, bytes, str]] = {}  # id -> (hello, its bytes, our nonce)
    refused: list[str] = []
    seen = 0
    deadline = time.monotonic() + timeout

    def refuse(wid: int, reason: str) -> None:
        import sys

        refused.append(reason)
        set_json(store, f"welcome/{wid}", {"error": reason})
        print(f"pipeload: refused a worker: {reason}", file=sys.stderr, flush=True)

    while len(accepted) < n:
        joined = store.add("workers", 0)
        while seen < joined:
            key = f"hello/{seen + 1}"
            if not store.check([key]):
                break
            seen += 1
            raw = store.get(key)
            try:
                h = json.loads(raw.decode())
            except (UnicodeDecodeError, ValueError):
                refuse(seen, f"worker {seen} sent a hello that is not JSON")
                continue
            reason = check_hello(h, __version__, fp, started=False) or auth.refusal_for_hello(token, h)
            if reason:
                refuse(seen, reason)
                continue
            ch, nc = auth.challenge(token, seen, h)
            set_json(store, f"challenge/{seen}", ch)
            challenged[seen] = (h, raw, nc)
        for wid in sorted(challenged):
            if len(accepted) >= n:
                break
            if not store.check([f"proof/{wid}"]):
                continue
            h, raw, nc = challenged.pop(wid)
            try:
                reply = get_json(store, f"proof/{wid}")
            except (UnicodeDecodeError, ValueError):
                reply = {"error": "its proof is not JSON"}
            reason = auth.check_worker_proof(token, wid, h, raw, nc, reply)
            if reason:
                refuse(wid, reason)
            else:
                accepted[wid] = h
                set_json(store, f"welcome/{wid}", {"ok": True, "version": __version__, "fingerprint": fp,
                                                   "step_timeout": step_timeout})
        if len(accepted) >= n:
            break
        if time.monotonic() > deadline:
            raise ClusterError(f"only {len(accepted)} of {n} workers joined within {timeout:.0f} s"
                               + (f"; refused: {'; '.join(refused)}" if refused else "")
                               + "; start them with `pipeload worker --join HOST:PORT --model PATH`"
                               + (" --token-file FILE" if token is not None else ""))
        time.sleep(0.02)
    for wid, (h, _, _) in challenged.items():  # answered too late: the cluster is full
        set_json(store, f"welcome/{wid}", {"error": f"worker {h.get('name')} joined late: the cluster already "
                                                    f"has its {n} workers"})
    return accepted


class _Planner:
    """Makes the plan of every epoch: the first from the workers' figures, the next ones from
    the previous placement without the dead workers."""

    def __init__(self, mode, spec, cost, nodes, link, context, batch, step_timeout, world_size, rank_of):
        self.mode, self.spec, self.args, self.cost = mode, spec, spec.args, cost
        self.nodes, self.link, self.context, self.batch = nodes, link, context, batch
        self.step_timeout, self.world_size, self.rank_of = step_timeout, world_size, rank_of
        self.placement: Placement | None = None
        self.stage_times: dict[int, tuple[float, float]] = {}  # measured on the live pipeline (stage_timings)
        self.names: dict[int, str] = {}
        self.dtype = torch.float32

    def __call__(self, ids: list[int], dead: list[int] = ()) -> dict:
        nodes = [self.nodes[i] for i in ids]
        if self.mode == "pipeline":
            if self.placement is None:
                self.placement = place_pipeline(nodes, self.cost, self.link, self.context, self.batch)
            else:
                self.placement = replan_without(self.placement, {str(i) for i in dead}, list(self.nodes.values()),
                                                self.cost, self.context, self.batch)
            stages = self.placement.stages
            assignments = {s.node: Assignment(s.start, s.stop, k == 0, k == len(stages) - 1).as_dict()
                           for k, s in enumerate(stages)}
            extra = {"order": [self.rank_of[int(s.node)] for s in stages]}
            summary = [f"{self.names[int(s.node)]}: layers {s.start}-{s.stop - 1}"
                       + (" + head" if k == len(stages) - 1 else "") for k, s in enumerate(stages)]
        else:
            from .shard import make_shards

            shards = make_shards(self.spec, [n.decode_bandwidth for n in nodes])
            assignments = {str(i): Assignment(0, self.args.n_layers, True, True, sh).as_dict()
                           for i, sh in zip(ids, shards)}
            extra = {"tp_ranks": [self.rank_of[i] for i in ids]}
            summary = [f"{self.names[i]}: heads {sh.heads[0]}-{sh.heads[1] - 1}, ffn columns {sh.ffn[0]}-{sh.ffn[1] - 1}, "
                       f"vocabulary {sh.vocab[0]}-{sh.vocab[1] - 1}" for i, sh in zip(ids, shards)]
        from .protocol import slot_bytes

        return {"mode": self.mode, "ranks": ids, "rank_of": {str(i): r for i, r in self.rank_of.items()},
                "slot_bytes": slot_bytes(self.args.dim, self.dtype),
                "world_size": self.world_size, "assignments": assignments, "context": self.context,
                "batch": self.batch, "step_timeout": self.step_timeout, "summary": summary, **extra}

    def predictions(self, ids: list[int], link: LinkSpec, streams: list[int], client: float = 0.0,
                    allreduce: float | None = None, tp_layer: float | None = None) -> dict:
        """Predicted decode tokens/s for each stream count, pipeline and tensor parallel."""
        nodes = [self.nodes[i] for i in ids]
        out = {}
        placement = place_pipeline(nodes, self.cost, link, self.context, 1)
        placement.client_seconds = client
        # stages of the live plan: their step as timed on the workers (alone, all at once)
        live = {s.node: (s.start, s.stop) for s in self.placement.stages} if self.placement else {}
        for s in placement.stages:
            timed = self.stage_times.get(int(s.node))
            if timed and live.get(s.node) == (s.start, s.stop):
                extra = self.nodes[int(s.node)].step_overhead
                s.seconds, s.busy_seconds = timed[0] + extra, timed[1] + extra
        limits = host_limits(placement, nodes)
        for k in streams:
            out[f"pipeline_{k}"] = placement.tokens_per_second(k, limits)
            out[f"tensor_{k}"] = predict_tensor_parallel(nodes, self.cost, link, k, client, allreduce, tp_layer)
        return out


def connect_cluster(path: str | Path, address: str, workers: int, mode: str = "pipeline",
                    dtype: torch.dtype | None = None, context: int | None = None, batch: int = 1,
                    join_timeout: float = 120.0, step_timeout: float = 60.0, load_timeout: float = 600.0,
                    link: LinkSpec | None = None, token: str | None = None) -> ClusterEngine:
    """Form a cluster of `workers` workers for the model at `path` and return it as an Engine.
    Only workers that prove they know `token` join (default: $PIPELOAD_CLUSTER_TOKEN; without
    one, anyone who reaches the port may, and a warning says so).
    Raises ClusterError (port in use, workers missing or refused, a worker failing to load)."""
    import sys

    from .auth import load_token, no_token_warning

    if mode not in MODES:
        raise ValueError(f"cluster mode must be one of {MODES}, got {mode!r}")
    if workers < 1:
        raise ValueError(f"a cluster needs at least one worker, got {workers}")
    spec = open_model(path, dtype)
    if spec.is_encoder:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(f"{spec.path} is an encoder ({spec.checkpoint.architecture}): encoders run in "
                                    "one process (with memory_limit to stream), not on a cluster")
    ckpt, args, dtype = spec.checkpoint, spec.args, spec.dtype
    if mode == "tensor":
        from ..runtime.sharding import tensor_parallel_plan

        tensor_parallel_plan(spec)  # refuse an architecture that cannot split before waiting for workers
    context = min(context or args.context_length, args.context_length)
    fp = fingerprint(ckpt.path)
    host, port = parse_address(address)
    token = token if token is not None else load_token()
    store = host_store(host, port, join_timeout)
    if token is None:
        print(no_token_warning(f"{host}:{port}"), file=sys.stderr, flush=True)
    local = "127.0.0.1" if host in ("0.0.0.0", "") else host
    monitor_store = join_store(local, port, join_timeout)
    store.set("ping_rounds", "20")
    hellos = _accept_workers(store, workers, fp, join_timeout, step_timeout, token)
    ids = sorted(hellos)
    rank_of = {wid: r + 1 for r, wid in enumerate(ids)}
    nodes = dict(zip(ids, even_out_host_peers([node_spec(wid, hellos[wid]) for wid in ids])))
    cost = model_cost(spec)
    link = link or LinkSpec()
    planner = _Planner(mode, spec, cost, nodes, link, context, batch, step_timeout, len(ids) + 1, rank_of)
    planner.names, planner.dtype = {wid: h["name"] for wid, h in hellos.items()}, dtype
    coord = Coordinator(store, monitor_store, planner, {wid: h for wid, h in hellos.items()}, mode, fp,
                        step_timeout, load_timeout)
    atexit.register(coord.close)  # workers are told to exit however this process ends its run
    coord.start_epoch(planner(ids), load_timeout)
    if mode == "pipeline":
        planner.stage_times = stage_timings(store, ids, hellos)
    measured = LinkSpec(latency=max(coord.link_latency, 1e-6), bandwidth=link.bandwidth)
    coord.client_seconds = client_seconds(args.vocab_size)
    summary = {"mode": mode, "workers": {wid: h["name"] for wid, h in hellos.items()},
               "plan": coord.plan["summary"], "link_latency": coord.link_latency,
               "client_seconds": coord.client_seconds, "allreduce_seconds": coord.allreduce_seconds,
               "tp_layer_seconds": coord.tp_layer_seconds,
               "predicted": planner.predictions(ids, measured, sorted({1, len(ids)}), coord.client_seconds,
                                                coord.allreduce_seconds, coord.tp_layer_seconds),
               "calibration": {h["name"]: {k: h[k] for k in ("layer_seconds", "step_overhead")}
                               for h in hellos.values()}}
    executor = ClusterExecutor(coord, args.n_layers)
    return ClusterEngine(spec=spec, executor=executor, coordinator=coord, summary=summary, context=context)
