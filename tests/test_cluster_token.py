"""The cluster join token: workers with a wrong or no token are refused (both sides say why) while
the cluster forms with the right ones; a worker with a token refuses a coordinator without one;
the exchange itself (cluster/auth.py) never puts the token in the store and cannot be replayed."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster_helpers import connect, free_port, start_worker, workers
from pipeload.bench.synth import LlamaShape, write_synthetic_gguf
from pipeload.cluster import auth
from pipeload.cluster.rendezvous import ClusterError

SHAPE = LlamaShape(dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=128, vocab=128, context=64)
TOKEN, OTHER = "a" * 24 + "-right-token", "b" * 24 + "-wrong-token"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-token")
    (root / "right.token").write_text(TOKEN + "\n")
    (root / "wrong.token").write_text(OTHER + "\n")
    return write_synthetic_gguf(root / "m.gguf", SHAPE, "q4_0", seed=3), root


def _finish(p: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise AssertionError("the worker hung") from None
    return p.returncode, err


def test_wrong_and_missing_tokens_are_refused_and_the_cluster_forms_with_the_right_ones(setup, capfd):
    model, root = setup
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ThreadPoolExecutor(1) as pool:  # the coordinator waits for its 2 workers meanwhile
        forming = pool.submit(connect, model, 2, port=port, token=TOKEN, join_timeout=90)
        wrong = start_worker(address, model, "--token-file", str(root / "wrong.token"), "--name", "intruder")
        missing = start_worker(address, model, "--name", "tokenless")
        code, err = _finish(wrong)
        assert code == 2 and "coordinator's proof does not match this worker's cluster token" in err, err
        code, err = _finish(missing)
        assert code == 2 and "tokenless has no cluster token, and this cluster requires one" in err, err
        with workers(address, model, 2, "--token-file", str(root / "right.token")):
            m = forming.result(timeout=120)
            try:
                assert sorted(m.engine.summary["workers"].values()) == ["w0", "w1"]
                assert m.logits([1, 2, 3]).shape == (3, SHAPE.vocab)
            finally:
                m.close()
    coordinator = capfd.readouterr().err
    assert "refused a worker: worker intruder refused this coordinator" in coordinator
    assert "refused a worker: worker tokenless has no cluster token" in coordinator
    assert "has no join token" not in coordinator


def test_a_worker_with_a_token_refuses_a_coordinator_without_one(setup, capfd):
    model, root = setup
    port = free_port()
    careful = start_worker(f"127.0.0.1:{port}", model, "--token-file", str(root / "right.token"), "--name", "careful")
    with pytest.raises(ClusterError, match="only 0 of 1 workers joined within 8 s; refused: worker careful refused"):
        connect(model, 1, port=port, join_timeout=8)
    code, err = _finish(careful)
    assert code == 2 and "the coordinator has no cluster token but this worker has one" in err, err
    assert "has no join token: anyone who can reach the port can join" in capfd.readouterr().err


def test_the_exchange():
    hello = {"name": "w", "nonce": auth.nonce(), "token": True}
    raw = b'{"name": "w"}'
    ch, nc = auth.challenge(TOKEN, 3, hello)
    assert TOKEN not in str(ch) and ch["token"] is True
    assert auth.check_challenge(TOKEN, 3, hello["nonce"], ch) is None          # the worker trusts the coordinator
    assert "does not match" in auth.check_challenge(OTHER, 3, hello["nonce"], ch)
    assert "does not match" in auth.check_challenge(TOKEN, 4, hello["nonce"], ch)  # bound to the worker id
    reply = auth.answer(TOKEN, 3, hello["nonce"], ch, raw)
    assert TOKEN not in str(reply)
    assert auth.check_worker_proof(TOKEN, 3, hello, raw, nc, reply) is None
    assert "different cluster token" in auth.check_worker_proof(TOKEN, 3, hello, raw + b" ", nc, reply)  # hello swapped
    _, fresh = auth.challenge(TOKEN, 3, hello)
    assert "different cluster token" in auth.check_worker_proof(TOKEN, 3, hello, raw, fresh, reply)  # replayed
    assert "different cluster token" in auth.check_worker_proof(
        TOKEN, 3, hello, raw, nc, auth.answer(OTHER, 3, hello["nonce"], ch, raw))
    assert "has no cluster token" in auth.refusal_for_hello(TOKEN, {"name": "x", "token": False})
    assert auth.check_worker_proof(None, 3, hello, raw, nc, {"proof": None}) is None


def test_token_sources(tmp_path):
    f = tmp_path / "t"
    f.write_text(TOKEN + "\n")
    assert auth.load_token(f, env={}) == TOKEN
    assert auth.load_token(None, env={"PIPELOAD_CLUSTER_TOKEN": OTHER}) == OTHER
    assert auth.load_token(None, env={}) is None
    f.write_text("short\n")
    with pytest.raises(ClusterError, match="at least 16"):
        auth.load_token(f, env={})
    with pytest.raises(ClusterError, match="cannot read"):
        auth.load_token(tmp_path / "missing", env={})
