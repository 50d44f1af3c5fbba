"""Clear errors, never a hang: port in use, unreachable coordinator, workers that do not come,
a worker of another version, with another model file, or joining after the cluster started."""

import socket
import subprocess
import time

import pytest
import torch

from cluster_helpers import connect, free_port, start_worker, workers
from pipeload.bench.synth import LlamaShape, write_synthetic_gguf
from pipeload.cluster.rendezvous import ClusterError, fingerprint, host_store

SHAPE = LlamaShape(dim=128, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=256, vocab=256, context=64)
OLD_VERSION = ("import sys, pipeload; pipeload.__version__ = '0.0.0-old'; "
               "from pipeload.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-errors")
    return (write_synthetic_gguf(root / "a.gguf", SHAPE, "q4_0", seed=1),
            write_synthetic_gguf(root / "b.gguf", SHAPE, "q4_0", seed=2))


def _finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("the worker hung") from None
    return p.returncode, err


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"port {port} .* in use"):
            host_store("127.0.0.1", port, 5)


def test_unreachable_coordinator(two_models):
    t0 = time.monotonic()
    p = start_worker(f"127.0.0.1:{free_port()}", two_models[0], "--join-timeout", "2")
    code, err = _finish(p)
    assert code == 2 and "no coordinator answered at 127.0.0.1" in err, err
    assert time.monotonic() - t0 < 30


def test_workers_missing(two_models):
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match="only 0 of 2 workers joined within 2 s"):
        connect(two_models[0], 2, port=free_port(), join_timeout=2)
    assert time.monotonic() - t0 < 10


def test_fingerprint_tells_files_apart(two_models):
    a, b = two_models
    assert fingerprint(a) == fingerprint(a) != fingerprint(b)


def test_refused_workers(two_models):
    """Another version and another model file are refused at once; a late joiner too."""
    a, b = two_models
    port = free_port()
    address = f"127.0.0.1:{port}"
    old = start_worker(address, a, code=OLD_VERSION)
    other = start_worker(address, b)
    with workers(address, a, 1):
        m = connect(a, 1, port=port)
        try:
            late = start_worker(address, a)
            code, err = _finish(late)
            assert code == 2 and "joined late" in err, err
            assert m.logits([1, 2, 3]).shape == (3, SHAPE.vocab)
        finally:
            m.close()
    code, err = _finish(old)
    assert code == 2 and "version mismatch" in err and "0.0.0-old" in err, err
    code, err = _finish(other)
    assert code == 2 and "model mismatch" in err, err


def test_idle_longer_than_the_step_timeout_is_not_a_failure(two_models):
    """A cluster that waits for its next request longer than a step may take (a server between
    clients) answers it without a re-plan: idle receives do not time out, steps still do."""
    port = free_port()
    with workers(f"127.0.0.1:{port}", two_models[0], 2):
        m = connect(two_models[0], 2, port=port, step_timeout=2.0)
        try:
            first = m.logits([1, 2, 3])
            time.sleep(3.5)
            assert torch.equal(m.logits([1, 2, 3]), first)
            assert m.engine.recoveries == []
        finally:
            m.close()


def test_close_after_a_failed_start_tells_nobody_and_raises_nothing():
    """A cluster whose first epoch failed to start (a worker died while loading, after the
    process group formed) has no plan: close() (run at exit) must not fail on the missing ranks."""
    from pipeload.cluster.coordinator import Coordinator

    class Store(dict):
        def set(self, key, value):
            self[key] = value

    class Channel:
        sent = []

        def send(self, message, rank):
            self.sent.append(rank)

    for mode in ("tensor", "pipeline"):
        store = Store()
        coord = Coordinator(store, store, None, {1: {}, 2: {}}, mode, "fp")
        coord.channel = Channel()
        assert coord.entry_ranks == [] and coord.exit_ranks == []
        coord.close(timeout=0.1)
        assert coord.closed and store["shutdown"] == "1" and Channel.sent == []
