"""POST /v1/completions and /v1/chat/completions: from a validated body to a response or an SSE stream.

A request with several prompts or n > 1 becomes one worker request per choice, all sharing one
event queue. Streams end with `data: [DONE]`; if the worker dies mid-stream, the stream ends with
an OpenAI error event instead. When the client goes away, every unfinished choice is cancelled,
which frees its slot before the worker's next pass.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import schemas
from .errors import APIError
from .handle import WorkerHandle
from .metrics import Metrics
from .registry import Registry
from .security import Limits


@dataclass
class _Choice:
    rid: str
    prompt_index: int
    echo: str = ""
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    started: bool = False


class _Run:
    """The worker requests behind one HTTP request."""

    def __init__(self, kind: str, body: Any, handle: WorkerHandle, metrics: Metrics):
        self.kind, self.body, self.handle, self.metrics = kind, body, handle, metrics
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        prompts = [body.messages] if kind == "chat" else body.prompt
        self.prompts = prompts
        self.choices = [_Choice(rid=f"{self.id}-{i}", prompt_index=i // body.n) for i in range(len(prompts) * body.n)]
        self.by_rid = {c.rid: c for c in self.choices}
        self.events: asyncio.Queue = asyncio.Queue()
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None

    def payload(self, i: int) -> dict[str, Any]:
        b, c = self.body, self.choices[i]
        p: dict[str, Any] = {"kind": self.kind, "sampling": b.sampling(i % b.n), "stop": b.stop,
                             "ignore_eos": b.ignore_eos}
        if self.kind == "chat":
            p["messages"] = [m.model_dump(exclude_none=True) for m in b.messages]
            p["max_tokens"] = b.token_limit
            p["logprobs"] = (b.top_logprobs or 0) if b.logprobs else None
        else:
            p["prompt"] = self.prompts[c.prompt_index]
            p["max_tokens"] = b.max_tokens
            p["logprobs"] = b.logprobs
            if b.echo:
                c.echo = p["prompt"]
        return p

    async def submit(self) -> None:
        """Send every choice to the worker; raises APIError (and cancels the rest) if one is refused."""
        results = await asyncio.gather(*(self.handle.submit(c.rid, self.payload(i), self.events)
                                         for i, c in enumerate(self.choices)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.cancel()
            raise errors[0]
        for c, info in zip(self.choices, results):
            c.prompt_tokens = info["prompt_tokens"]
        self.metrics.prompt_tokens.labels(self.handle.name).inc(self.prompt_tokens)

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for i, c in enumerate(self.choices) if i % self.body.n == 0)

    @property
    def usage(self) -> dict[str, int]:
        return schemas.usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))

    def cancel(self) -> None:
        for c in self.choices:
            if c.finish_reason is None:
                self.handle.cancel(c.rid)

    async def next_event(self) -> tuple[_Choice, dict]:
        """The next event and its choice; raises the APIError of a worker that died."""
        ev = await self.events.get()
        if "error" in ev:
            raise ev["error"]
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.metrics.ttft.labels(self.handle.name).observe(self.first_token_at - self.t0)
        c = self.by_rid[ev["id"]]
        c.text += ev["text"]
        c.finish_reason = ev["finish_reason"]
        c.completion_tokens = ev["completion_tokens"]
        if ev["logprobs"] is not None:
            c.logprobs.append(ev["logprobs"])
        return c, ev

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    # -- shapes ---------------------------------------------------------------------------------

    def final_choice(self, i: int, c: _Choice) -> dict[str, Any]:
        if self.kind == "chat":
            return {"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": schemas.chat_logprobs(c.logprobs) if self.body.logprobs else None,
                    "finish_reason": c.finish_reason}
        lp = schemas.completion_logprobs(c.logprobs, len(c.echo)) if self.body.logprobs is not None else None
        return {"index": i, "text": c.echo + c.text, "logprobs": lp, "finish_reason": c.finish_reason}

    def chunk_choice(self, i: int, c: _Choice, ev: dict) -> dict[str, Any]:
        """The chunk choice for one event: one per sampled token, its text possibly "" (mid-character)."""
        lp = [ev["logprobs"]] if ev["logprobs"] is not None else []
        if self.kind == "chat":
            delta = {"content": ev["text"]} if ev["text"] else {}
            return {"index": i, "delta": delta, "logprobs": schemas.chat_logprobs(lp) if lp else None,
                    "finish_reason": ev["finish_reason"]}
        text = ev["text"]
        if c.echo and not c.started:
            text = c.echo + text
        c.started = True
        return {"index": i, "text": text, "finish_reason": ev["finish_reason"],
                "logprobs": schemas.completion_logprobs(lp, 0) if lp else None}

    def obj(self, choices: list[dict], use: dict | None, chunk: bool) -> dict[str, Any]:
        make = schemas.chat_object if self.kind == "chat" else schemas.completion_object
        return make(self.id, self.body.model, choices, use, chunk)


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the request body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def handle_completion(request: Request, kind: str, registry: Registry, metrics: Metrics, limits: Limits):
    """The response to one completion or chat completion request; raises APIError on bad input
    or an exceeded limit."""
    body = schemas.parse_body(await request.body(), schemas.ChatRequest if kind == "chat"
                              else schemas.CompletionRequest)
    if body.model in registry.handles:
        request.state.model = body.model  # for the metrics' labels
    limits.check_request(kind, body)
    handle = await registry.acquire(body.model)
    n = len(body.prompt if kind == "completion" else [0]) * body.n
    registry.check_capacity(handle, n)
    run = _Run(kind, body, handle, metrics)
    await run.submit()
    if body.stream:
        return StreamingResponse(_stream(run), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    collector = asyncio.ensure_future(_collect(run))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not collector.done():  # the client left (or we are being cancelled): free the slots
            collector.cancel()
            run.cancel()
    if collector.cancelled():
        raise APIError(499, "the client closed the connection", code="client_closed")
    return JSONResponse(collector.result())


async def _collect(run: _Run) -> dict[str, Any]:
    while not run.done:
        await run.next_event()
    return run.obj([run.final_choice(i, c) for i, c in enumerate(run.choices)], run.usage, chunk=False)


async def _stream(run: _Run) -> AsyncIterator[str]:
    finished = False
    try:
        if run.kind == "chat":
            yield schemas.sse(run.obj([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None} for i in range(len(run.choices))], None, chunk=True))
        while not run.done:
            try:
                c, ev = await run.next_event()
            except APIError as e:
                yield schemas.sse(e.body())
                return
            yield schemas.sse(run.obj([run.chunk_choice(run.choices.index(c), c, ev)], None, chunk=True))
        if run.body.include_usage:
            yield schemas.sse(run.obj([], run.usage, chunk=True))
        yield schemas.sse("[DONE]")
        finished = True
    finally:
        if not finished:
            run.cancel()
