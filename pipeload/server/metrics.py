"""Prometheus metrics of a server (its own CollectorRegistry, so several servers can live in one process).

Counted as requests are answered: requests (by model, endpoint, status), prompt and completion
tokens, time to first token, sequences per pass over the weights. Read at scrape time from the
workers' latest figures: queue length, running batch size, tokens/s over the last 10 seconds,
peak RSS, model state and restarts.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from .handle import WorkerHandle
    from .registry import Registry

STATES = ("unloaded", "loading", "loaded", "unloading", "dead", "error")
WINDOW_SECONDS = 10.0


class Metrics:
    def __init__(self, models: "Registry"):
        self.models = models
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pipeload_requests", "HTTP requests answered", ["model", "endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("pipeload_prompt_tokens", "prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("pipeload_completion_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("pipeload_time_to_first_token_seconds", "time from request to first token", ["model"],
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.batch = Histogram("pipeload_pass_batch_size", "sequences served by one pass over the weights", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self._recent: dict[str, deque] = {}
        r.register(_WorkerCollector(self))
        for h in models.handles.values():
            h.on_events = self.observe_pass

    def observe_pass(self, handle: "WorkerHandle", events: list[dict]) -> None:
        """Record one pass over the weights (called with the events a worker sent for it)."""
        if not events:
            return
        # sequences, not events: a speculative round gives one sequence several tokens in one pass
        self.batch.labels(handle.name).observe(len({e.get("id") for e in events}))
        self.completion_tokens.labels(handle.name).inc(len(events))
        self._recent.setdefault(handle.name, deque()).append((time.monotonic(), len(events)))

    def tokens_per_second(self, name: str) -> float:
        """Tokens generated per second by model `name` over the last WINDOW_SECONDS."""
        recent = self._recent.get(name)
        if not recent:
            return 0.0
        cutoff = time.monotonic() - WINDOW_SECONDS
        while recent and recent[0][0] < cutoff:
            recent.popleft()
        return sum(n for _, n in recent) / WINDOW_SECONDS

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _WorkerCollector:
    """Gauges read from each worker's latest stats at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        queue = GaugeMetricFamily("pipeload_queue_length", "requests waiting for a slot", labels=["model"])
        batch = GaugeMetricFamily("pipeload_batch_size", "sequences in the running batch", labels=["model"])
        tps = GaugeMetricFamily("pipeload_tokens_per_second", f"tokens generated per second (last "
                                f"{WINDOW_SECONDS:.0f} s)", labels=["model"])
        rss = GaugeMetricFamily("pipeload_peak_rss_bytes", "peak resident memory of the model's worker",
                                labels=["model"])
        state = GaugeMetricFamily("pipeload_model_state", "1 for the model's current state", labels=["model", "state"])
        restarts = GaugeMetricFamily("pipeload_worker_restarts", "times the worker died and was restarted",
                                     labels=["model"])
        proposed = GaugeMetricFamily("pipeload_draft_tokens_proposed", "draft tokens checked by speculative passes "
                                     "(--draft)", labels=["model"])
        accepted = GaugeMetricFamily("pipeload_draft_tokens_accepted", "draft tokens the target agreed with",
                                     labels=["model"])
        acceptance = GaugeMetricFamily("pipeload_draft_acceptance_rate", "accepted / proposed draft tokens",
                                       labels=["model"])
        spec_passes = GaugeMetricFamily("pipeload_speculative_passes", "target passes that checked drafts",
                                        labels=["model"])
        for name, h in m.models.handles.items():
            queue.add_metric([name], h.stats.get("waiting", 0))
            batch.add_metric([name], h.stats.get("active", 0))
            tps.add_metric([name], m.tokens_per_second(name))
            rss.add_metric([name], h.stats.get("peak_rss") or 0)
            for s in STATES:
                state.add_metric([name, s], 1.0 if h.state == s else 0.0)
            restarts.add_metric([name], h.restarts)
            p, a = h.stats.get("draft_proposed", 0), h.stats.get("draft_accepted", 0)
            proposed.add_metric([name], p)
            accepted.add_metric([name], a)
            acceptance.add_metric([name], a / p if p else 0.0)
            spec_passes.add_metric([name], h.stats.get("speculative_passes", 0))
        yield from (queue, batch, tps, rss, state, restarts, proposed, accepted, acceptance, spec_passes)
