"""POST /v1/embeddings (OpenAI's schema) and what each model can do (/v1/models "capabilities").

A request's texts go to the model's worker as one request; the worker's encoder lane
(encoder_lane.py) embeds every request waiting at that moment in one call, so one pass over
streamed weights serves them all. Vectors come back as float32 bytes and leave as JSON floats or,
with `encoding_format: "base64"` (what the official `openai` client asks for), as the base64 of
their little-endian float32 bytes, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator

from . import schemas
from .errors import APIError
from .registry import Registry
from .security import Limits

MAX_INPUTS = 2048  # texts per request, as OpenAI's API allows


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _input(cls, v: Any) -> list[str]:
        """-> a list of texts (how many and how long: check_limits)."""
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            return v
        if isinstance(v, list) and v and all(isinstance(x, (int, list)) and not isinstance(x, bool) for x in v):
            raise ValueError("token ids are not supported by this server; send the text (a string or a list "
                             "of strings)")
        raise ValueError("input must be a string or a non-empty list of strings")

    def check_supported(self) -> None:
        """(Every accepted value is supported.)"""


def check_limits(body: EmbeddingRequest, limits: Limits) -> None:
    """Raise APIError(400, code="limit_exceeded") for too many texts or characters."""
    if len(body.input) > MAX_INPUTS:
        raise APIError(400, f"{len(body.input)} inputs; this server embeds at most {MAX_INPUTS} per request",
                       param="input", code="limit_exceeded")
    chars = sum(map(len, body.input))
    if chars > limits.max_prompt_chars:
        raise APIError(400, f"the input is {chars} characters long; this server allows at most "
                            f"{limits.max_prompt_chars} (--max-prompt-chars)", param="input", code="limit_exceeded")


def request_schema(names: list[str], limits: Limits) -> dict[str, Any]:
    """The OpenAPI schema of an embeddings request body on this server."""
    text = {"type": "string", "minLength": 1, "maxLength": limits.max_prompt_chars}
    return {"type": "object", "additionalProperties": False, "required": ["model", "input"], "properties": {
        "model": {"type": "string", "enum": names},
        "input": {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_INPUTS}]},
        "encoding_format": {"enum": ["float", "base64"], "default": "float"},
        "user": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


RESPONSE_SCHEMA = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"const": "list"}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"const": "embedding"}, "index": {"type": "integer", "minimum": 0},
        "embedding": {"anyOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
    "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
              "properties": {"prompt_tokens": {"type": "integer", "minimum": 0},
                             "total_tokens": {"type": "integer", "minimum": 0}}}}}


async def handle_embeddings(request: Request, registry: Registry, metrics, limits: Limits) -> JSONResponse:
    """The response to one embeddings request; raises APIError on bad input, an exceeded limit,
    a model that does not embed, or a worker that fails."""
    body = schemas.parse_body(await request.body(), EmbeddingRequest)
    if body.model in registry.handles:
        request.state.model = body.model  # for the metrics' labels
    check_limits(body, limits)
    handle = await registry.acquire(body.model)
    can = handle.info.get("capabilities") or []
    if "embeddings" not in can:
        raise APIError(400, f"model {body.model!r} does not make text embeddings (it can: {', '.join(can)})",
                       param="model", code="model_not_supported")
    registry.check_capacity(handle, 1)
    rid = "emb-" + uuid.uuid4().hex[:24]
    events: asyncio.Queue = asyncio.Queue()
    await handle.submit(rid, {"kind": "embeddings", "input": body.input}, events)
    ev = await events.get()
    if "error" in ev:
        raise ev["error"]
    vectors = np.frombuffer(ev["vectors"], dtype="<f4").reshape(len(body.input), ev["dim"])
    metrics.prompt_tokens.labels(handle.name).inc(ev["prompt_tokens"])
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return JSONResponse({"object": "list", "model": body.model,
                         "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                         "usage": {"prompt_tokens": ev["prompt_tokens"], "total_tokens": ev["prompt_tokens"]}})


# -- what a model can do, from its file (before its worker has loaded it) ------------------------

_capabilities: dict[Path, tuple[float, list[str]]] = {}


def file_capabilities(path: Path) -> list[str]:
    """What the model at `path` can do (runtime/encode.py capabilities), from its metadata alone
    (no weights read); [] when the file cannot be read (loading it will say why)."""
    from ..errors import PipeloadError
    from ..runtime.encode import capabilities
    from ..runtime.spec import open_model

    try:
        stamp = path.stat().st_mtime
    except OSError:
        return []
    if path in _capabilities and _capabilities[path][0] == stamp:
        return _capabilities[path][1]
    try:
        spec = open_model(path)  # headers only: no tensor data is read
    except PipeloadError:
        return []
    out = capabilities(spec.arch, spec.args, _has_chat_template(spec.checkpoint))
    _capabilities[path] = (stamp, out)
    return out


def _has_chat_template(ckpt) -> bool:
    if ckpt.format == "gguf":
        return bool(ckpt.config.get("tokenizer.chat_template"))
    folder = Path(ckpt.path)
    if (folder / "chat_template.jinja").is_file():
        return True
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            if json.loads((folder / name).read_text(encoding="utf-8")).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False
