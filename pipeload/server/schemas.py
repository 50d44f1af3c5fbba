"""OpenAI request bodies (validated with pydantic) and the response and chunk shapes we send back.

Unknown fields are refused (as OpenAI does), so a typo is an error rather than a silent default.
Extensions beyond OpenAI's fields, as llama-server and vLLM name them: top_k, min_p,
repetition_penalty, ignore_eos; chat logprob entries also carry the token "id".
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import APIError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1)  # at most --max-n choices (security.Limits)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's (torch seeds no wider)
    user: str | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v  # how many and how long: security.Limits
        raise ValueError("stop must be a string or a list of strings")

    def check_supported(self) -> None:
        """Raise APIError(400) for accepted-but-unsupported values."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead",
                               param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")

    def sampling(self, choice: int) -> dict[str, Any]:
        """SamplingParams keywords for choice `choice` (choice i of a seeded request uses seed + i)."""
        seed = None if self.seed is None else self.seed + choice
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "seed": seed}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list:
        """-> a list of prompts, each a string or a list of token ids."""
        def ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(x, str) or ids(x) for x in v):
            return v
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of those")

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if self.echo and not all(isinstance(p, str) for p in self.prompt):
            raise APIError(400, "echo needs text prompts", param="echo")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        """-> plain text (text parts joined); other part types are refused."""
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("content parts must be {\"type\": \"text\", \"text\": ...}; this server "
                                     "reads text only")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("content must be a string or a list of text parts")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _param(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """Validate a JSON request body; raises APIError(400) naming the bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        req = model.model_validate(data, strict=True)  # no "1" for a number, no true for an integer
    except ValidationError as e:
        err = e.errors()[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            message = f"missing required parameter: '{param}'"
        elif err["type"] == "extra_forbidden":
            message = f"unrecognized request argument supplied: '{param}'"
        else:
            message = f"invalid value for '{param}': {err['msg'].removeprefix('Value error, ')}"
        raise APIError(400, message, param=param, code="invalid_value" if err["type"] != "missing"
                       else "missing_required_parameter") from None
    req.check_supported()
    return req


# -- responses ----------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(entries: list[dict], offset: int) -> dict[str, Any]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


def chat_logprobs(entries: list[dict]) -> dict[str, Any]:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs, id}]}."""
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"], "id": e["id"],
                         "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"],
                                           "id": t["id"]} for t in e["top"]]} for e in entries]}


def completion_object(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool) -> dict[str, Any]:
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def chat_object(rid: str, model: str, choices: list[dict], use: dict | None, chunk: bool) -> dict[str, Any]:
    body = {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if not chunk or use is not None:
        body["usage"] = use
    return body


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
