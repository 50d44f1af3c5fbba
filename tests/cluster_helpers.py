"""Starting cluster workers for the tests: `pipeload worker` processes on loopback, always killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_command(address: str, model, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeload.cli", "worker", "--join", address, "--model", str(model), "--threads", "1",
            "--join-timeout", "30", *extra]


def start_worker(address: str, model, *extra: str, code: str | None = None) -> subprocess.Popen:
    """A worker process (or `python -c code` with the same arguments in sys.argv)."""
    cmd = worker_command(address, model, *extra)
    if code is not None:
        cmd = [sys.executable, "-c", code, *cmd[3:]]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextmanager
def workers(address: str, model, n: int, *extra: str):
    """n workers joining `address`; killed (SIGKILL) on the way out whatever happened."""
    procs = [start_worker(address, model, *extra, "--name", f"w{k}") for k in range(n)]
    try:
        yield procs
    finally:
        for p in procs:  # a closed cluster tells them to exit; the tests do not wait for Python's teardown
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            p.stdout.close()
            p.stderr.close()


def connect(model, n: int, parallel: str = "pipeline", port: int | None = None, join_timeout: float = 30.0,
            **kw):
    """A PipelineModel on a cluster of n workers joining 127.0.0.1:port (use inside `workers(...)`);
    every wait is bounded."""
    from pipeload import PipelineModel
    from pipeload.cluster.launch import connect_cluster

    kw = {"step_timeout": 30.0, "load_timeout": 60.0, **kw}
    engine = connect_cluster(model, f"127.0.0.1:{port}", n, parallel, join_timeout=join_timeout, **kw)
    return PipelineModel(engine, engine.spec.load_tokenizer(), {"cluster": port})
