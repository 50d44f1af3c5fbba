"""Hostile requests for the load test: malformed, oversized, over a limit, or without the key.

Each kind has the answer a well-behaved server gives: a 4xx with an OpenAI error body, quickly.
`send_hostile` sends one and says whether that is what came back; the load test mixes them with
valid requests (`serving.load_test(hostile=0.25)`) and checks that the valid ones are untouched.
"""

from __future__ import annotations

import random

# What the load test's server is started with, so that each limit below is one it enforces.
SOAK_LIMITS = {"--max-request-bytes": 65536, "--max-tokens-cap": 256, "--max-n": 4, "--max-prompt-chars": 8192,
               "--max-stop": 4, "--max-stop-chars": 32}

KINDS = ("no_key", "wrong_key", "bad_json", "not_an_object", "wrong_type", "unknown_field", "oversized",
         "over_token_cap", "over_n", "long_prompt", "many_stops", "unknown_model")


def _body(kind: str, model: str, rng: random.Random) -> tuple[bytes | dict, int]:
    """(the request body, the status it must get)."""
    valid = {"model": model, "prompt": "def f(x):", "max_tokens": 8}
    if kind in ("no_key", "wrong_key"):
        return valid, 401
    if kind == "bad_json":
        return rng.choice([b"{not json", b'{"model": "m", "prompt": ', b"\xff\xfe\x00", b""]), 400
    if kind == "not_an_object":
        return rng.choice([b"[1, 2, 3]", b'"text"', b"42", b"null"]), 400
    if kind == "wrong_type":
        field, value = rng.choice([("temperature", "hot"), ("max_tokens", "8"), ("n", True), ("stream", "yes"),
                                   ("prompt", {"a": 1}), ("seed", 2**70), ("top_p", 0)])
        return {**valid, field: value}, 400
    if kind == "unknown_field":
        return {**valid, "wat": rng.randrange(100)}, 400
    if kind == "oversized":
        return {**valid, "prompt": "x" * (SOAK_LIMITS["--max-request-bytes"] + rng.randrange(1, 50_000))}, 413
    if kind == "over_token_cap":
        return {**valid, "max_tokens": SOAK_LIMITS["--max-tokens-cap"] + rng.randrange(1, 10**6)}, 400
    if kind == "over_n":
        return {**valid, "n": SOAK_LIMITS["--max-n"] + rng.randrange(1, 100)}, 400
    if kind == "long_prompt":
        return {**valid, "prompt": "y" * (SOAK_LIMITS["--max-prompt-chars"] + rng.randrange(1, 1000))}, 400
    if kind == "many_stops":
        return {**valid, "stop": [str(k) for k in range(SOAK_LIMITS["--max-stop"] + 1)]}, 400
    if kind == "unknown_model":
        return {**valid, "model": f"no-such-model-{rng.randrange(1000)}"}, 404
    raise ValueError(f"unknown hostile kind {kind!r}")


async def send_hostile(client, model: str, kind: str, rng: random.Random, key: str | None) -> str | None:
    """Send one hostile request of `kind` (with the key, except the key kinds); returns None if it
    got the 4xx with an OpenAI error body it must get, else what went wrong."""
    body, expected = _body(kind, model, rng)
    headers = {} if kind == "no_key" or key is None else {"Authorization": f"Bearer {key}"}
    if kind == "wrong_key":
        headers = {"Authorization": "Bearer sk-wrong-" + str(rng.randrange(10**6))}
    path = rng.choice(["/v1/completions", "/v1/chat/completions"]) if kind == "no_key" else "/v1/completions"
    if isinstance(body, dict) and path.endswith("chat/completions"):
        body = {"model": body["model"], "messages": [{"role": "user", "content": body["prompt"]}]}
    kw = {"json": body} if isinstance(body, dict) else {"content": body, "headers": {"Content-Type": "application/json"}}
    kw["headers"] = {**kw.get("headers", {}), **headers}
    r = await client.post(path, **kw)
    try:
        error = r.json()["error"]
        shaped = isinstance(error["message"], str) and "type" in error
    except (ValueError, KeyError, TypeError):
        shaped = False
    if r.status_code != expected or not shaped:
        return f"{kind}: expected {expected} with an error body, got {r.status_code}: {r.text[:160]}"
    return None
