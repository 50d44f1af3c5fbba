"""The server's OpenAPI 3.1 document (GET /openapi.json): what each endpoint takes and answers.

Request bodies come from the pydantic models in schemas.py, with the fields their validators
check by hand spelled out (prompt, stop, message content) and this server's limits and model
names filled in, so that a client generator or a fuzzer (schemathesis, see tests/test_server_fuzz.py)
knows exactly what is valid. Response bodies are written out here; every error is the OpenAI
error object.
"""

from __future__ import annotations

from typing import Any

from . import embeddings, schemas
from .security import Limits

REF = "#/components/schemas/{model}"

_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}
_FINISH = {"enum": ["stop", "length", None]}
_COMPLETION = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": _USAGE,
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "text", "logprobs", "finish_reason"],
                                           "properties": {"index": {"type": "integer"}, "text": {"type": "string"},
                                                          "logprobs": {"type": ["object", "null"]},
                                                          "finish_reason": _FINISH}}}}}
_CHAT = {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"], "properties": {
    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"},
    "model": {"type": "string"}, "usage": _USAGE,
    "choices": {"type": "array", "items": {"type": "object", "required": ["index", "message", "logprobs", "finish_reason"],
                                           "properties": {
        "index": {"type": "integer"}, "logprobs": {"type": ["object", "null"]}, "finish_reason": _FINISH,
        "message": {"type": "object", "required": ["role", "content"],
                    "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}}}}}
_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by", "state"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}, "state": {"enum": ["unloaded", "loading", "loaded", "unloading", "dead", "error"]},
    "context_length": {"type": ["integer", "null"]},
    "capabilities": {"type": "array", "items": {"enum": ["completion", "chat", "embeddings", "image_embeddings",
                                                         "classification"]}}}}
_MODEL_LIST = {"type": "object", "required": ["object", "data"],
               "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}}
_EVENT = {"type": "object", "required": ["data"],  # one server-sent event: a chunk's JSON, an error's, or [DONE]
          "properties": {"data": {"type": "string", "minLength": 1}, "event": {"type": "string"}}}
_HEALTH = {"type": "object", "required": ["status"], "properties": {
    "status": {"enum": ["ok", "degraded", "shutting_down"]}, "models": {"type": "object"}}}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    text = {400: "invalid request or a limit exceeded (the message names it)", 401: "missing or wrong API key",
            404: "no such model", 413: "request body too large (--max-request-bytes)",
            429: "busy: the model's queue or this client's concurrent requests are full (Retry-After)",
            503: "the model is unavailable (loading failed, its worker died, shutting down; Retry-After)"}
    return {str(s): _json({"$ref": "#/components/schemas/Error"}, text[s]) for s in statuses}


def _request_schema(model: type, names: list[str], limits: Limits, kind: str) -> tuple[dict, dict]:
    """(schema of the request body, the component schemas it refers to)."""
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    props = schema["properties"]
    props["model"] = {"type": "string", "enum": names}
    string = {"type": "string", "maxLength": limits.max_stop_chars}
    props["stop"] = {"anyOf": [{"type": "null"}, string,
                               {"type": "array", "items": string, "maxItems": limits.max_stop}]}
    props["n"]["maximum"] = limits.max_n
    if limits.max_tokens is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                props[name]["anyOf"][0]["maximum"] = limits.max_tokens
    if kind == "completion":
        ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
               "maxItems": limits.max_prompt_chars}
        text = {"type": "string", "maxLength": limits.max_prompt_chars}
        props["prompt"] = {"anyOf": [text, ids, {"type": "array", "items": {"anyOf": [text, ids]}, "minItems": 1,
                                                 "maxItems": limits.max_n}]}
    else:
        message = defs["ChatMessage"]
        message["properties"]["content"] = {"anyOf": [
            {"type": "null"}, {"type": "string", "maxLength": limits.max_prompt_chars},
            {"type": "array", "items": {"type": "object", "required": ["type", "text"],
                                        "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}
    return schema, defs


def openapi_document(names: list[str], limits: Limits, keys_required: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a server offering the models `names` under `limits`."""
    completion, defs = _request_schema(schemas.CompletionRequest, names, limits, "completion")
    chat, chat_defs = _request_schema(schemas.ChatRequest, names, limits, "chat")
    components = {"CompletionRequest": completion, "ChatRequest": chat, **defs, **chat_defs,
                  "EmbeddingRequest": embeddings.request_schema(names, limits), "Error": _ERROR}
    secured = {"security": [{"bearer": []}]} if keys_required else {}

    def post(summary: str, request: str, response: dict) -> dict:
        ok = {"description": "the completion (JSON), or with stream: true server-sent events ending in "
                             "`data: [DONE]`",
              "content": {"application/json": {"schema": response}, "text/event-stream": {"schema": _EVENT}}}
        return {"post": {"summary": summary, **secured, "requestBody": {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 503)}}}

    doc = {
        "openapi": "3.1.0",
        "info": {"title": "pipeload", "version": _version(),
                 "description": "OpenAI-compatible completions, chat completions and embeddings over models larger than memory."},
        "paths": {
            "/v1/completions": post("OpenAI completions", "CompletionRequest", _COMPLETION),
            "/v1/chat/completions": post("OpenAI chat completions", "ChatRequest", _CHAT),
            "/v1/embeddings": {"post": {
                "summary": "OpenAI embeddings: one vector per text (models with the \"embeddings\" capability)",
                **secured, "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/EmbeddingRequest"}}}},
                "responses": {"200": _json(embeddings.RESPONSE_SCHEMA, "the vectors (float arrays, or base64 of "
                                                                       "little-endian float32)"),
                              **_errors(400, 401, 404, 413, 429, 503)}}},
            "/v1/models": {"get": {"summary": "the models and their states", **secured,
                                   "responses": {"200": _json(_MODEL_LIST, "the model list"), **_errors(401)}}},
            "/v1/models/{name}": {"get": {
                "summary": "one model", **secured,
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": _json(_MODEL, "the model"), **_errors(401, 404)}}},
            "/health": {"get": {"summary": "ok / not ok; with a key (or without keys configured), every model's "
                                           "state and figures",
                                "responses": {"200": _json(_HEALTH, "serving"),
                                              "503": _json(_HEALTH, "a model is dead or failed, or shutting down")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (an API key or --metrics-key when keys are set)",
                                 **secured, "responses": {
                                     "200": {"description": "text exposition format",
                                             "content": {"text/plain": {"schema": {"type": "string"}}}},
                                     **_errors(401)}}},
        },
        "components": {"schemas": components},
    }
    if keys_required:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return doc


def _version() -> str:
    from .. import __version__

    return __version__
