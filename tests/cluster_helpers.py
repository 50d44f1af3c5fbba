"""Starting cluster workers for the tests: `pipeload worker` processes on loopback, always killed."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from contextlib import contextmanager

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TORCH_CPP_LOG_LEVEL": "ERROR"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port P with P and P + 1 both free, below the kernel's ephemeral range, for launches that
    listen on two neighbouring ports (torchrun's store on P, pipeload's coordinator on P + 1).
    A port from bind(0) lies inside the ephemeral range, where the launch's own client sockets
    can take P + 1 before the coordinator binds it (seen in CI: "port ... is in use")."""
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low - 2), 200):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two neighbouring free ports below the ephemeral range")


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
