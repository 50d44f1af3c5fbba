"""Serving benchmark and load test: a real `pipeload serve` on loopback, driven by concurrent clients.

`bench_serving` measures, for 1, 4, 8 and 16 concurrent clients (each sending streaming
completions one after another), the total tokens/s and the latency percentiles: time to first
token (TTFT) and time per output token after the first (TPOT). With a memory_limit the model
streams its layers, and a decode pass costs about the same for 1 or 16 sequences, so total
tokens/s should grow almost linearly with the clients (the goal: 8 clients >= 5x one client).

`load_test` runs 32 clients for 10 minutes with a mix of chat and completions, streaming and not,
and checks that no request failed or was lost: every request the clients sent got a complete
answer, the server counted the same number of answered requests, and no slot is left in use.
(The load test sends text and chat messages, so its model needs a tokenizer and a chat template;
the throughput benchmark sends token ids and runs on any model.)

    python -m pipeload.bench.serving                                   # built-in model
    python -m pipeload.bench.serving --model big.gguf --memory-limit 2GB
    python -m pipeload.bench.serving --load-test --clients 32 --duration 600
    python -m pipeload.bench.serving --load-test --clients 32 --duration 600 --hostile 0.25   # a quarter hostile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Iterator

PROMPTS = ["def fibonacci(n):", "The history of the printing press", "Once upon a time, in a small village,",
           "import numpy as np\n", "The three laws of thermodynamics are", "Dear diary, today I",
           "A recipe for bread:", "In the beginning"]


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class LevelResult:
    """What `clients` concurrent clients got."""

    clients: int
    requests: int = 0
    failed: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hostile: int = 0          # hostile requests sent (hostile.py), not counted in `requests`
    hostile_failed: int = 0   # ... that did not get the 4xx they must get
    hostile_errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {"clients": self.clients, "requests": self.requests, "failed": self.failed,
                "completion_tokens": self.completion_tokens, "seconds": self.seconds,
                "hostile": self.hostile, "hostile_failed": self.hostile_failed,
                "hostile_errors": self.hostile_errors[:5],
                "tokens_per_second": self.tokens_per_second,
                **{f"ttft_p{p}": percentile(self.ttft, p) for p in (50, 90, 99)},
                **{f"tpot_p{p}": percentile(self.tpot, p) for p in (50, 90, 99)}, "errors": self.errors[:5]}


# -- the server -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(models: list[str], *args: str, log: Path | None = None, startup_timeout: float = 600.0,
                   headers: dict | None = None) -> Iterator[str]:
    """`pipeload serve MODELS --preload ARGS` on a free loopback port; yields its base URL; SIGTERM at exit.
    `headers` go with its /health requests (the API key of a server started with one)."""
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "pipeload.cli", "serve", *models, "--port", str(port), "--preload",
                             "--log-level", "warning", *args], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:  # --preload: the port opens once every model is loaded
            if proc.poll() is not None:
                raise RuntimeError(f"pipeload serve exited with status {proc.returncode} at startup"
                                   + (f"; see {log}" if log else ""))
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pipeload serve did not start within {startup_timeout:.0f} s") from None
                time.sleep(0.2)
        health = httpx.get(url + "/health", headers=headers, timeout=30).json()
        broken = {n: m["last_error"] for n, m in health["models"].items()
                  if m["state"] != "loaded"}
        if broken:
            raise RuntimeError(f"models did not load: {broken}")
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if out is not subprocess.DEVNULL:
            out.close()


# -- the clients ----------------------------------------------------------------------------------


async def _sse(response) -> AsyncIterator[dict | str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[6:]
            yield data if data == "[DONE]" else json.loads(data)


async def one_request(client, model: str, body: dict, result: LevelResult, headers: dict | None = None) -> bool:
    """Send one request (streaming or not, with `headers`) and record it in `result`; True if it completed."""
    t0 = time.perf_counter()
    body = {"model": model, **body}
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    try:
        if not body.get("stream"):
            r = await client.post(path, json=body, headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}: {r.text[:200]}")
            data = r.json()
            if any(c.get("finish_reason") not in ("stop", "length") for c in data["choices"]):
                raise RuntimeError(f"incomplete choice: {data['choices']}")
            result.completion_tokens += data["usage"]["completion_tokens"]
            return True
        first = last = None
        tokens, done, usage = 0, False, None
        async with client.stream("POST", path, json={**body, "stream_options": {"include_usage": True}},
                                 headers=headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"status {r.status_code}: {(await r.aread())[:200]!r}")
            async for event in _sse(r):
                if event == "[DONE]":
                    done = True
                    break
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if event.get("usage"):
                    usage = event["usage"]
                if event["choices"]:  # one chunk per sampled token
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
        if not done or usage is None:
            raise RuntimeError("the stream ended without [DONE] and usage")
        result.completion_tokens += usage["completion_tokens"]
        if first is not None:
            result.ttft.append(first - t0)
            if usage["completion_tokens"] > 1:
                result.tpot.append((last - first) / (usage["completion_tokens"] - 1))
        return True
    except Exception as e:  # noqa: BLE001 - any failure of any kind is what a load test counts
        result.failed += 1
        result.errors.append(f"{type(e).__name__}: {e}")
        return False
    finally:
        result.requests += 1


async def run_level(url: str, model: str, clients: int, bodies, requests_per_client: int | None = None,
                    duration: float | None = None, timeout: float = 600.0, key: str | None = None) -> LevelResult:
    """`clients` concurrent clients, each sending bodies() one after another, for a count or a duration.
    A body {"hostile": KIND} is a hostile request (hostile.py); the others go with the API `key`."""
    import httpx

    from .hostile import send_hostile

    headers = {"Authorization": f"Bearer {key}"} if key else None

    async def hostile(client, kind: str, rng: random.Random) -> None:
        result.hostile += 1
        try:
            problem = await send_hostile(client, model, kind, rng, key)
        except Exception as e:  # noqa: BLE001 - a hang-up or timeout is a failure like any other
            problem = f"{kind}: {type(e).__name__}: {e}"
        if problem:
            result.hostile_failed += 1
            result.hostile_errors.append(problem)

    result = LevelResult(clients=clients)
    deadline = time.monotonic() + duration if duration else None

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
            n = 0
            while (requests_per_client is None or n < requests_per_client) and (
                    deadline is None or time.monotonic() < deadline):
                body = bodies(i, n)
                if "hostile" in body:
                    await hostile(client, body["hostile"], random.Random(i * 7919 + n))
                else:
                    await one_request(client, model, body, result, headers)
                n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    result.seconds = time.perf_counter() - t0
    return result


def bench_serving(model: str | None = None, clients: tuple[int, ...] = (1, 4, 8, 16), max_tokens: int = 64,
                  requests_per_client: int = 3, memory_limit: str | None = None, fast_batching: bool = False,
                  threads: int | None = None, ctx: int | None = 512, log: Path | None = None) -> list[LevelResult]:
    """Throughput and latency for each number of concurrent clients (see the module docstring).

    `ctx` caps each sequence's context (it sizes the KV cache and activations a memory plan reserves)."""
    from ..api import builtin_model_path

    path = str(model or builtin_model_path())
    args = ["--max-batch", str(max(clients)), "--max-queue", str(4 * max(clients))]
    args += ["--ctx-size", str(ctx)] if ctx else []
    args += ["--memory-limit", memory_limit] if memory_limit else []
    args += ["--fast-batching"] if fast_batching else []
    args += ["--threads", str(threads)] if threads else []

    def bodies(i: int, n: int) -> dict:  # token ids, so that models without a tokenizer work too
        prompt = [10 + (7 * (i + n) + j) % 90 for j in range(16 + (i + n) % 8)]
        return {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
                "temperature": 0.8, "seed": 1000 * i + n}

    results = []
    with running_server([f"m={path}"], *args, log=log) as url:
        asyncio.run(run_level(url, "m", 1, bodies, requests_per_client=1))  # warm-up
        for c in clients:
            results.append(asyncio.run(run_level(url, "m", c, bodies, requests_per_client=requests_per_client)))
    return results


def format_table(results: list[LevelResult], title: str = "") -> str:
    """A markdown table: clients, requests, failed, tokens/s, ratio to one client, TTFT and TPOT p50/p90/p99."""
    base = next((r.tokens_per_second for r in results if r.clients == 1), None)
    lines = [f"### {title}" if title else "",
             "| clients | requests | failed | total tok/s | vs 1 client | TTFT p50 / p90 / p99 (s) | "
             "TPOT p50 / p90 / p99 (ms) |", "|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        d = r.as_dict()
        ratio = f"{r.tokens_per_second / base:.2f}x" if base else "-"
        lines.append(f"| {r.clients} | {r.requests} | {r.failed} | {r.tokens_per_second:.1f} | {ratio} | "
                     f"{d['ttft_p50']:.3f} / {d['ttft_p90']:.3f} / {d['ttft_p99']:.3f} | "
                     f"{1e3 * d['tpot_p50']:.1f} / {1e3 * d['tpot_p90']:.1f} / {1e3 * d['tpot_p99']:.1f} |")
    return "\n".join(line for line in lines if line)


@dataclass
class LoadTestResult:
    clients: int
    duration: float
    level: LevelResult
    server_answered: int      # requests the server counted as answered with 200
    slots_in_use_after: int   # requests still in flight in the server after the clients stopped
    worker_restarts: int = 0  # times a model's worker died and was restarted during the run

    @property
    def lost(self) -> int:
        """Requests that completed for the client but not for the server, or the other way round."""
        return abs((self.level.requests - self.level.failed) - self.server_answered)

    @property
    def ok(self) -> bool:
        return (self.level.failed == 0 and self.lost == 0 and self.slots_in_use_after == 0
                and self.level.hostile_failed == 0 and self.worker_restarts == 0)

    def summary(self) -> str:
        lv = self.level
        hostile = (f"; {lv.hostile} hostile requests, {lv.hostile_failed} answered wrongly" if lv.hostile else "")
        return (f"load test: {self.clients} clients for {self.duration:.0f} s: {lv.requests} valid requests, "
                f"{lv.failed} failed, {self.lost} lost, {self.slots_in_use_after} slots left in use, "
                f"{self.worker_restarts} worker restarts{hostile}; "
                f"{lv.completion_tokens} tokens, {lv.tokens_per_second:.1f} tok/s; TTFT p50 "
                f"{percentile(lv.ttft, 50):.3f} s, p99 {percentile(lv.ttft, 99):.3f} s -> "
                f"{'PASS' if self.ok else 'FAIL'}" + (f"; first errors: {lv.errors[:3]}" if lv.errors else "")
                + (f"; first hostile errors: {lv.hostile_errors[:3]}" if lv.hostile_errors else ""))


def load_test(model: str | None = None, clients: int = 32, duration: float = 600.0, memory_limit: str | None = None,
              max_batch: int = 16, ctx: int | None = 512, log: Path | None = None,
              hostile: float = 0.0) -> LoadTestResult:
    """`clients` clients for `duration` seconds with a random mix of requests; see the module docstring.
    With `hostile` > 0 the server needs an API key and has the limits of hostile.SOAK_LIMITS, and
    that fraction of the requests is malformed, oversized, over a limit or without the key
    (hostile.KINDS, in turn); each must get its 4xx while every valid request still completes."""
    import httpx

    from ..api import builtin_model_path
    from .hostile import KINDS, SOAK_LIMITS

    path = str(model or builtin_model_path())
    args = ["--max-batch", str(max_batch), "--max-queue", str(4 * clients)]
    key = None
    if hostile:
        key = "sk-soak-" + os.urandom(8).hex()
        args += ["--api-key", key] + [str(x) for kv in SOAK_LIMITS.items() for x in kv]
    args += ["--ctx-size", str(ctx)] if ctx else []
    args += ["--memory-limit", memory_limit] if memory_limit else []

    def bodies(i: int, n: int) -> dict:
        rng = random.Random(i * 100_003 + n)
        body = {"max_tokens": rng.randint(8, 128), "stream": rng.random() < 0.7,
                "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
        if rng.random() < 0.5:
            body["messages"] = [{"role": "user", "content": rng.choice(PROMPTS)}]
        else:
            body["prompt"] = rng.choice(PROMPTS)
        if rng.random() < 0.2:
            body["stop"] = ["\n\n"]
        if rng.random() < hostile:
            return {"hostile": KINDS[(i + n) % len(KINDS)]}
        return body

    auth = {"Authorization": f"Bearer {key}"} if key else None
    with running_server([f"m={path}"], *args, log=log, headers=auth) as url:
        level = asyncio.run(run_level(url, "m", clients, bodies, duration=duration, key=key))
        metrics = httpx.get(url + "/metrics", headers=auth, timeout=30).text
        answered = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith("pipeload_requests_total{") and 'status="200"' in line)
        model = httpx.get(url + "/health", headers=auth, timeout=30).json()["models"]["m"]
    return LoadTestResult(clients, duration, level, int(answered), model["in_flight"], model["restarts"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `pipeload bench serving`."""
    p.add_argument("--model", default=None, help="GGUF file or HF folder (default: the built-in model)")
    p.add_argument("--memory-limit", default=None, help="stream the model under this budget, e.g. 2GB")
    p.add_argument("--clients", default=None, help="comma-separated client counts (default 1,4,8,16; load test 32)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--fast-batching", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx-size", type=int, default=512, help="context per sequence (default 512)")
    p.add_argument("--load-test", action="store_true", help="run the load test instead")
    p.add_argument("--duration", type=float, default=600.0, help="load test seconds (default 600)")
    p.add_argument("--hostile", type=float, default=0.0,
                   help="load test: this fraction of requests malformed, oversized, over a limit or without the "
                        "API key (e.g. 0.25; the server then needs a key)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--log", default=None, help="server log file")


def run(a: argparse.Namespace) -> int:
    """Run the serving benchmark (or the load test) as `pipeload bench serving` was asked to."""
    log = Path(a.log) if a.log else None
    if a.load_test:
        result = load_test(a.model, int(a.clients or 32), a.duration, a.memory_limit, ctx=a.ctx_size, log=log,
                           hostile=a.hostile)
        print(result.summary())
        if a.json:
            Path(a.json).write_text(json.dumps({**result.level.as_dict(), "lost": result.lost,
                                                "server_answered": result.server_answered,
                                                "worker_restarts": result.worker_restarts, "ok": result.ok}))
        return 0 if result.ok else 1
    clients = tuple(int(c) for c in (a.clients or "1,4,8,16").split(","))
    results = bench_serving(a.model, clients, a.max_tokens, a.requests_per_client, a.memory_limit,
                            a.fast_batching, a.threads, a.ctx_size, log=log)
    title = f"{Path(a.model).name if a.model else 'built-in model'}" + (
        f", memory limit {a.memory_limit}" if a.memory_limit else "") + (", fast batching" if a.fast_batching else "")
    print(format_table(results, f"serving: {title}, {a.max_tokens} tokens per request, loopback"))
    for r in results:
        for e in r.errors[:3]:
            print(f"{r.clients} clients: {e}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps([r.as_dict() for r in results], indent=1))
    return 0 if all(r.failed == 0 for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeload.bench.serving", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
