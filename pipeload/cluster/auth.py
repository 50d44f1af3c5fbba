"""The cluster's join token: a shared secret both sides prove they know, without sending it.

The rendezvous store (TCPStore) can be read and written by anything that reaches its port, so
nothing secret is ever put there. Every worker goes through one challenge-response, with or
without a token, after its hello (see rendezvous.py for the keys):

    worker       hello/<id>      {..., "nonce": Nw, "token": true|false}
    coordinator  challenge/<id>  {"nonce": Nc, "token": true|false,
                                  "proof": HMAC(T, "coordinator|id|Nw|Nc") or null}
    worker       proof/<id>      {"proof": HMAC(T, "worker|id|Nw|Nc|sha256(hello)") or null}
                                 or {"error": why the worker will not join}
    coordinator  welcome/<id>    {"ok": true, ...} or {"error": why the worker is refused}

The worker checks the coordinator's proof before it sends its own, so a process posing as the
coordinator learns nothing; the coordinator checks the worker's, which covers the worker's hello
(it cannot be swapped) and fresh nonces of both sides (an old exchange cannot be replayed). A
token on one side only is refused on both, with a message saying which side lacks it.

What this does not do: encrypt or authenticate the traffic after joining (hidden states over
gloo), or stop someone who reaches the port from disturbing the store. See the README.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from .rendezvous import ClusterError

TOKEN_ENV = "PIPELOAD_CLUSTER_TOKEN"
MIN_TOKEN_CHARS = 16
MAKE_ONE = "python -c 'import secrets; print(secrets.token_hex(32))' > cluster.token"


def load_token(token_file: str | Path | None = None, env: dict | None = None) -> str | None:
    """The join token from `token_file` (its first line) or $PIPELOAD_CLUSTER_TOKEN; None without
    either. Raises ClusterError for an unreadable file or a token too short to be safe."""
    env = os.environ if env is None else env
    if token_file is not None:
        try:
            lines = Path(token_file).expanduser().read_text().strip().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ClusterError(f"cannot read the cluster token file {token_file}: {e}") from None
        token, where = (lines[0].strip() if lines else ""), f"the token file {token_file}"
    elif env.get(TOKEN_ENV):
        token, where = env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ClusterError(f"{where} holds a token of {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                           f"random ones (the exchange can be watched and guessed offline), e.g. `{MAKE_ONE}`")
    return token


def nonce() -> str:
    """A fresh random challenge."""
    return secrets.token_hex(16)


def _mac(token: str, *parts: str) -> str:
    return hmac.new(token.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def coordinator_proof(token: str, wid: int, worker_nonce: str, coordinator_nonce: str) -> str:
    return _mac(token, "coordinator", str(wid), worker_nonce, coordinator_nonce)


def worker_proof(token: str, wid: int, worker_nonce: str, coordinator_nonce: str, hello_raw: bytes) -> str:
    return _mac(token, "worker", str(wid), worker_nonce, coordinator_nonce, hashlib.sha256(hello_raw).hexdigest())


def same(a: object, b: str) -> bool:
    """Constant-time equality of a received proof and the expected one."""
    return isinstance(a, str) and hmac.compare_digest(a.encode(), b.encode())


def challenge(token: str | None, wid: int, hello: dict) -> tuple[dict, str]:
    """(the coordinator's challenge/<id> for a worker's hello, its nonce)."""
    nc = nonce()
    nw = str(hello.get("nonce", ""))
    return {"nonce": nc, "token": token is not None,
            "proof": coordinator_proof(token, wid, nw, nc) if token is not None else None}, nc


def refusal_for_hello(token: str | None, hello: dict) -> str | None:
    """Why the coordinator refuses a worker before any proof: it lacks the token the cluster needs."""
    if token is not None and not hello.get("token"):
        return (f"worker {hello.get('name')} has no cluster token, and this cluster requires one: start it with "
                f"--token-file FILE (or ${TOKEN_ENV}) holding the coordinator's token")
    return None


def check_worker_proof(token: str | None, wid: int, hello: dict, hello_raw: bytes, nc: str, reply: dict) -> str | None:
    """Why the coordinator refuses the worker's proof/<id> reply, or None to welcome it."""
    name = hello.get("name")
    if "error" in reply:
        return f"worker {name} refused this coordinator: {reply['error']}"
    if token is None:
        return None
    if not same(reply.get("proof"), worker_proof(token, wid, str(hello.get("nonce", "")), nc, hello_raw)):
        return (f"worker {name} has a different cluster token (its proof does not match): give every node the "
                f"same token file")
    return None


def check_challenge(token: str | None, wid: int, worker_nonce: str, ch: dict) -> str | None:
    """Why the worker refuses the coordinator's challenge, or None to answer it."""
    if token is not None and not ch.get("token"):
        return ("the coordinator has no cluster token but this worker has one: refusing to join a cluster "
                "anyone can join (give the coordinator the same --token-file)")
    if token is None and ch.get("token"):
        return None  # the coordinator will refuse us (see refusal_for_hello) and say why
    if token is not None and not same(ch.get("proof"), coordinator_proof(token, wid, worker_nonce,
                                                                          str(ch.get("nonce", "")))):
        return ("the coordinator's proof does not match this worker's cluster token: the coordinator has another "
                "token, or it is not the coordinator you meant")
    return None


def answer(token: str | None, wid: int, worker_nonce: str, ch: dict, hello_raw: bytes) -> dict:
    """The worker's proof/<id> for an accepted challenge."""
    if token is None:
        return {"proof": None}
    return {"proof": worker_proof(token, wid, worker_nonce, str(ch.get("nonce", "")), hello_raw)}


def no_token_warning(address: str) -> str:
    return (f"pipeload: warning: the cluster at {address} has no join token: anyone who can reach the port can "
            f"join as a worker and see or change every hidden state; give the coordinator and every worker "
            f"--token-file FILE (or ${TOKEN_ENV}), e.g. `{MAKE_ONE}`")
