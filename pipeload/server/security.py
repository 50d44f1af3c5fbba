"""Who may use a server and how much one request or one client may ask: API keys and limits.

`SecurityMiddleware` is a plain ASGI middleware in front of the app (so that it also guards
streamed responses without buffering them). For every HTTP request, in this order:

1. concurrent requests per client address (`Limits.max_client_requests`): 429 beyond it;
2. the API key: every /v1/* request needs `Authorization: Bearer KEY` when keys are set (401
   otherwise, with an OpenAI-style body); /metrics needs an API key or the metrics key; /health
   is open but answers only ok / not ok without a key (the app asks `request.state.authorized`);
3. the request body: read here up to `Limits.max_request_bytes` (413 beyond it, whether the
   client sent Content-Length or chunks), then handed to the app.

Keys are compared in constant time: both sides are hashed first (so not even the length leaks)
and every configured key is compared, whichever matches.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import APIError

KEY_ENV = "PIPELOAD_API_KEY"


@dataclass
class Limits:
    """What one request (or one client address) may ask of the server; every limit exceeded is a
    4xx naming it and the option that sets it."""

    max_request_bytes: int = 4 << 20      # --max-request-bytes: the JSON body (413)
    max_tokens: int | None = None         # --max-tokens-cap: max_tokens per choice (None: up to the context)
    max_n: int = 16                       # --max-n: choices per request (prompts x n)
    max_prompt_chars: int = 262_144       # --max-prompt-chars: prompt text (or token ids) per request
    max_stop: int = 16                    # --max-stop: stop strings per request
    max_stop_chars: int = 256             # --max-stop-chars: characters of one stop string
    max_client_requests: int = 64         # --max-client-requests: concurrent requests per client address (429)

    def check_request(self, kind: str, body: Any) -> None:
        """Raise APIError(400, code="limit_exceeded") naming the first limit `body` exceeds; fill in
        max_tokens with the cap where the request left it open."""
        prompts = [body.messages] if kind == "chat" else body.prompt
        choices = len(prompts) * body.n
        if choices > self.max_n:
            what = "n" if len(prompts) == 1 else f"{len(prompts)} prompts x n={body.n}"
            raise _limit(f"{what} asks for {choices} choices; this server allows at most {self.max_n} per request "
                         f"(--max-n)", "n")
        if kind == "chat":
            chars = sum(len(m.content or "") for m in body.messages)
        else:
            chars = sum(len(p) for p in body.prompt)  # characters of a text prompt, ids of a token prompt
        if chars > self.max_prompt_chars:
            param = "messages" if kind == "chat" else "prompt"
            raise _limit(f"the prompt is {chars} characters (or token ids) long; this server allows at most "
                         f"{self.max_prompt_chars} (--max-prompt-chars)", param)
        stop = body.stop or []  # (None when the request has no "stop": validators skip defaults)
        if len(stop) > self.max_stop:
            raise _limit(f"{len(stop)} stop strings; this server allows at most {self.max_stop} (--max-stop)",
                         "stop")
        longest = max((len(s) for s in stop), default=0)
        if longest > self.max_stop_chars:
            raise _limit(f"a stop string of {longest} characters; this server allows at most {self.max_stop_chars} "
                         f"(--max-stop-chars)", "stop")
        if self.max_tokens is not None:
            names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
            for name in names:
                asked = getattr(body, name)
                if asked is not None and asked > self.max_tokens:
                    raise _limit(f"{name} is {asked}; this server allows at most {self.max_tokens} "
                                 f"(--max-tokens-cap)", name)
            if (body.token_limit if kind == "chat" else body.max_tokens) is None:
                body.max_tokens = self.max_tokens


def _limit(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="limit_exceeded")


@dataclass
class Keys:
    """The API keys (any of them opens /v1/*, /metrics and the full /health) and the metrics
    keys (which open /metrics only). No API keys: everything is open."""

    api: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._api = [_digest(k) for k in self.api]
        self._metrics = [_digest(k) for k in self.metrics]

    @property
    def required(self) -> bool:
        return bool(self._api)

    def matches(self, given: str | None, metrics: bool = False) -> bool:
        """True if `given` is one of the API keys (or, with `metrics`, a metrics key); constant time."""
        if given is None:
            return False
        d = _digest(given)
        ok = False
        for k in self._api + (self._metrics if metrics else []):
            ok |= hmac.compare_digest(d, k)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def load_keys(keys: list[str] | None = None, key_file: str | Path | None = None, env: dict | None = None) -> list[str]:
    """API keys from --api-key (repeatable), --api-key-file (one per line, # comments) and
    $PIPELOAD_API_KEY; raises ValueError for an unreadable file, an empty key or one with spaces."""
    env = os.environ if env is None else env
    out = list(keys or [])
    if key_file is not None:
        try:
            text = Path(key_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the API key file {key_file}: {e}") from None
        lines = [line.strip() for line in text.splitlines()]
        file_keys = [line for line in lines if line and not line.startswith("#")]
        if not file_keys:
            raise ValueError(f"the API key file {key_file} holds no key (one key per line)")
        out += file_keys
    if env.get(KEY_ENV):
        out.append(env[KEY_ENV].strip())
    for k in out:
        if not k or any(c.isspace() for c in k) or not k.isprintable():
            raise ValueError(f"an API key must be printable and without spaces, got {k!r:.12}...")
    return list(dict.fromkeys(out))


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (None without one)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def unauthorized(given: str | None) -> APIError:
    """OpenAI's 401 for a missing or wrong key."""
    if given is None:
        message = ("You didn't provide an API key. Send it in an Authorization header using Bearer auth "
                   "(Authorization: Bearer YOUR_KEY); this server was started with --api-key.")
        code = "missing_api_key"
    else:
        shown = given[:3] + "*" * 4 + given[-2:] if len(given) > 8 else "*" * 4
        message = f"Incorrect API key provided: {shown}. Ask the server's operator for a key."
        code = "invalid_api_key"
    return APIError(401, message, code=code, type="invalid_request_error",
                    headers={"WWW-Authenticate": 'Bearer realm="pipeload"'})


class SecurityMiddleware:
    """The ASGI middleware described in the module docstring."""

    def __init__(self, app, keys: Keys, limits: Limits):
        self.app, self.keys, self.limits = app, keys, limits
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else "unknown"
        if self.in_flight.get(address, 0) >= self.limits.max_client_requests:
            await _reply(send, APIError(429, f"{address} has {self.in_flight[address]} requests in flight; this "
                                             f"server allows {self.limits.max_client_requests} at once per client "
                                             f"address (--max-client-requests)", code="too_many_connections",
                                        headers={"Retry-After": "1"}))
            return
        self.in_flight[address] = self.in_flight.get(address, 0) + 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight[address] -= 1
            if not self.in_flight[address]:
                del self.in_flight[address]

    async def _guarded(self, scope, receive, send) -> None:
        path = scope["path"]
        given = bearer(scope["headers"])
        authorized = not self.keys.required or self.keys.matches(given)
        scope.setdefault("state", {})["authorized"] = authorized
        if self.keys.required:
            if path.startswith("/v1/") or path == "/v1":
                if not authorized:
                    await _reply(send, unauthorized(given))
                    return
            elif path == "/metrics" and not self.keys.matches(given, metrics=True):
                await _reply(send, unauthorized(given))
                return
        elif path == "/metrics" and self.keys.metrics and not self.keys.matches(given, metrics=True):
            await _reply(send, unauthorized(given))
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then: the disconnect the app may wait for

        await self.app(scope, replay, send)

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The whole request body, or None after answering 413 (or when the client left)."""
        limit = self.limits.max_request_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _reply(send, _too_large(int(value), limit))
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, _too_large(size, limit, more=message.get("more_body", False)))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _too_large(size: int, limit: int, more: bool = False) -> APIError:
    return APIError(413, f"the request body is {'over ' if more else ''}{size} bytes; this server accepts at most "
                         f"{limit} (--max-request-bytes)", code="request_too_large")


async def _reply(send, e: APIError) -> None:
    body = json.dumps(e.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
