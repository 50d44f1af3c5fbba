"""Running the server: build the registry and app, then uvicorn with a draining shutdown.

On SIGTERM or Ctrl-C the server stops accepting connections, lets every in-flight request finish
(up to `drain_timeout` seconds; a second Ctrl-C forces), then stops the workers and exits with
status 0. Workers ignore SIGINT, so Ctrl-C in a terminal does not kill them under running requests.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Iterator

import uvicorn

from .app import create_app
from .registry import Registry, parse_model_specs
from .security import Keys, Limits, is_loopback


@dataclass
class ServeConfig:
    """Everything `pipeload serve` takes (see `pipeload serve --help`)."""

    models: list[str] = field(default_factory=list)  # path or name=path; empty: the built-in model
    host: str = "127.0.0.1"
    port: int = 8080
    memory_limit: int | None = None   # per model (bytes)
    total_memory: int | None = None   # all models together (bytes); LRU unloading beyond it
    max_batch: int = 8
    max_queue: int = 64
    max_len: int | None = None        # per-slot context (default: the model's)
    exact: bool = True                # batched tokens bit-identical to lone runs
    dtype: str = "auto"
    threads: int | None = None
    preload: bool = False
    drain_timeout: float = 300.0
    log_level: str = "info"
    cluster: dict | None = None       # {"address", "workers", "parallel"}: the model runs on a cluster
    lanes: int | None = None          # batches in flight per model (None: pipeline stages, else 1)
    draft: str | None = None          # speculative decoding for lone greedy requests (PATH, prompt-lookup, builtin)
    draft_tokens: int | str = "auto"
    api_keys: list[str] = field(default_factory=list)      # any of them opens /v1/* (none: open)
    metrics_keys: list[str] = field(default_factory=list)  # open /metrics only
    limits: Limits = field(default_factory=Limits)


class _DrainingServer(uvicorn.Server):
    """uvicorn, minus re-raising the caught signal after the graceful shutdown (so the exit is clean)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            logging.getLogger("pipeload.server").warning(
                "draining: finishing in-flight requests before exit (Ctrl-C again to force)")
        super().handle_exit(sig, frame)


def build_registry(cfg: ServeConfig) -> Registry:
    """The Registry for `cfg`; raises ModelFileError / ValueError for bad model arguments."""
    from ..api import builtin_model_path

    models = cfg.models or [f"pipeload-main={builtin_model_path()}"]
    if cfg.max_batch < 1 or cfg.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0 (got {cfg.max_batch}, {cfg.max_queue})")
    if cfg.lanes is not None and not 1 <= cfg.lanes <= cfg.max_batch:
        raise ValueError(f"--lanes must be between 1 and --max-batch ({cfg.max_batch}), got {cfg.lanes}")
    if cfg.draft not in (None, "prompt-lookup", "builtin") and not Path(cfg.draft).exists():
        raise ValueError(f"--draft {cfg.draft}: no such file or folder (give a GGUF file or HF folder of a small "
                         "model with the target's tokenizer, prompt-lookup, or builtin)")
    from ..runtime.speculative import check_draft_tokens

    check_draft_tokens(cfg.draft_tokens)
    specs = parse_model_specs(models, cfg.memory_limit)
    options = {"max_batch": cfg.max_batch, "max_len": cfg.max_len, "exact": cfg.exact, "dtype": cfg.dtype,
               "threads": cfg.threads, "cluster": cfg.cluster, "lanes": cfg.lanes, "draft": cfg.draft,
               "draft_tokens": cfg.draft_tokens}
    return Registry(specs, options, total_memory=cfg.total_memory, max_queue=cfg.max_queue)


def access_warning(host: str, port: int, keys: Keys) -> str | None:
    """The warning printed at start when the server listens beyond loopback without a key."""
    if keys.required or is_loopback(host):
        return None
    return (f"pipeload serve: warning: listening on {host or 'every address'} without an API key: anyone who can "
            f"reach port {port} can use the models and read /health and /metrics; start with --api-key-file FILE "
            f"(or PIPELOAD_API_KEY) to require a key")


def serve(cfg: ServeConfig) -> int:
    """Run the server until SIGTERM / Ctrl-C; returns the exit status."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # no *_created series: they only clutter the exposition
    registry = build_registry(cfg)
    keys = Keys(cfg.api_keys, cfg.metrics_keys)
    app = create_app(registry, preload=cfg.preload, keys=keys, limits=cfg.limits)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            timeout_graceful_shutdown=cfg.drain_timeout, timeout_keep_alive=5)
    server = _DrainingServer(config)
    names = ", ".join(f"{s.name} ({s.path})" for s in (h.spec for h in registry.handles.values()))
    print(f"pipeload serve: models {names}; http://{cfg.host}:{cfg.port}/"
          + (f" ({len(cfg.api_keys)} API key{'s' * (len(cfg.api_keys) > 1)})" if keys.required else ""),
          file=sys.stderr, flush=True)
    warning = access_warning(cfg.host, cfg.port, keys)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        registry.kill_all()  # only workers that did not stop in time are still alive
    return 0 if server.started else 1
