"""Rendezvous through torch's TCPStore: who joins, with what, and whether they may.

The coordinator hosts the store on HOST:PORT. A worker connects (bounded wait), takes a worker
id from a counter, writes its hello (pipeload version, model fingerprint, measured speed, memory)
and waits for a welcome or a refusal. The coordinator refuses a worker of another pipeload
version, one whose model file differs (fingerprint), and one that arrives after the cluster has
started; the worker prints the reason and exits. Keys:

    workers          counter of joined workers (ids 1, 2, ...)
    hello/<id>       worker -> coordinator, JSON
    welcome/<id>     coordinator -> worker, JSON {"ok": true} or {"error": "..."}
    epoch            the current plan number; plan/<epoch> its JSON
    ready/<e>/<id>   a worker holds its part of plan e (JSON figures)
    hb/<id>          heartbeat: time of the worker's last beat
    errors, error/<id>  a worker saw a peer fail (counter, message)
    shutdown         the coordinator is done: workers exit
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..errors import PipeloadError

FINGERPRINT_SAMPLES = 64
SAMPLE_BYTES = 64 << 10


class ClusterError(PipeloadError):
    """The cluster cannot form or go on (names the worker, address or setting at fault)."""


def parse_address(address: str, default_port: int = 29500) -> tuple[str, int]:
    """(host, port) of "HOST:PORT", "HOST" or ":PORT"; raises ClusterError on a bad port."""
    host, _, port = address.rpartition(":") if ":" in address else (address, "", str(default_port))
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise ClusterError(f"bad cluster address {address!r}: expected HOST:PORT") from None


def fingerprint(path: str | Path) -> str:
    """A checksum of a model file or folder: sha256 over its size, its first megabyte (the header
    and tensor table) and 64 samples spread through the data. Cheap for a 40 GB file, and any two
    different model files differ in it."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in (".gguf", ".safetensors", ".json")) \
        if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(FINGERPRINT_SAMPLES):
                fh.seek(size * k // FINGERPRINT_SAMPLES)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]


def host_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """The coordinator's store, listening on host:port; raises ClusterError if the port is taken."""
    try:
        return dist.TCPStore(host, port, None, True, timeout=timedelta(seconds=timeout), wait_for_workers=False,
                             multi_tenant=False)
    except (RuntimeError, OSError) as e:  # torch raises DistNetworkError (a RuntimeError)
        if "address already in use" in str(e).lower() or "errno: 98" in str(e).lower():
            raise ClusterError(f"port {port} on {host} is in use (another coordinator or program): "
                               f"pick another with --cluster {host}:PORT") from None
        raise ClusterError(f"cannot listen on {host}:{port}: {e}") from None


def join_store(host: str, port: int, timeout: float) -> dist.TCPStore:
    """A worker's connection to the coordinator's store; raises ClusterError when nothing answers
    within `timeout` seconds."""
    t0 = time.monotonic()
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as e:
        raise ClusterError(f"coordinator address {host!r} does not resolve: {e}") from None
    try:
        return dist.TCPStore(host, port, None, False, timeout=timedelta(seconds=timeout))
    except (RuntimeError, OSError) as e:
        raise ClusterError(f"no coordinator answered at {host}:{port} within {time.monotonic() - t0:.0f} s "
                           f"({str(e).splitlines()[0][:160]}); is `pipeload run/serve --cluster {host}:{port}` "
                           f"running there, and is the port open?") from None


def get_json(store: dist.TCPStore, key: str) -> dict:
    return json.loads(store.get(key).decode())


def set_json(store: dist.TCPStore, key: str, value: dict) -> None:
    store.set(key, json.dumps(value))


def wait_key(store: dist.TCPStore, key: str, timeout: float, poll: float = 0.05, alive=None) -> bytes:
    """The value of `key` once set; raises TimeoutError after `timeout` seconds, or early when
    `alive()` returns a reason string (the thing we wait for is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        if store.check([key]):
            return store.get(key)
        if alive is not None:
            reason = alive()
            if reason:
                raise ClusterError(reason)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{key!r} was not set within {timeout:.0f} s")
        time.sleep(poll)


def hello(worker_name: str, model_fingerprint: str, figures: dict) -> dict:
    from .. import __version__

    return {"version": __version__, "fingerprint": model_fingerprint, "name": worker_name, "pid": os.getpid(),
            "host": socket.gethostname(), **figures}


def check_hello(h: dict, version: str, model_fingerprint: str, started: bool) -> str | None:
    """Why a worker's hello is refused, or None to welcome it."""
    if h.get("version") != version:
        return (f"version mismatch: worker {h.get('name')} runs pipeload {h.get('version')}, the coordinator "
                f"{version}; install the same version on every node")
    if h.get("fingerprint") != model_fingerprint:
        return (f"model mismatch: worker {h.get('name')}'s model file has checksum {h.get('fingerprint')}, the "
                f"coordinator's {model_fingerprint}; every node needs a copy of the same file")
    if started:
        return (f"worker {h.get('name')} joined late: the cluster already started; restart the coordinator "
                f"with --workers counting it to use it")
    return None
