"""`pipeload serve`: an OpenAI-compatible HTTP server over several models.

One process runs the HTTP API (FastAPI + uvicorn, `app.py`); each model runs in its own worker
process (`worker.py`) with one continuous-batching scheduler (runtime/scheduler.py). The
registry (`registry.py`) starts workers on first use, stops the least recently used idle ones
when a global memory budget needs room, and restarts a worker that dies. `security.py` (API
keys, per-request and per-client limits) stands in front of every route; `openapi.py` writes
the OpenAPI document the API is fuzzed against (pipeload/bench/api_fuzz.py). Import
`pipeload.server.serve` to run it; nothing here is imported by `import pipeload`.
"""
