"""Bad days for a real server: clients that leave, a full queue, a worker that dies, a memory budget
that holds one model at a time, and SIGTERM with requests in flight."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest

from server_helpers import ServerProcess, chat_model

LONG = 4000  # tokens: tens of seconds of work for the tiny model, far longer than any check waits


def body(model: str, max_tokens: int = LONG, stream: bool = True, prompt: str = "Hello") -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
            "temperature": 0}


class Events:
    """The `data:` payloads of an SSE response. One line iterator per response: dropping an httpx line
    iterator half-way closes the connection (which the server rightly takes as the client leaving)."""

    def __init__(self, response: httpx.Response):
        self.lines = response.iter_lines()

    def take(self, n: int | None = None) -> list[str]:
        """The next n payloads (all the rest if n is None)."""
        out = []
        for line in self.lines:
            if line.startswith("data: "):
                out.append(line[6:])
                if n is not None and len(out) == n:
                    break
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    broken = folder / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\x00" * 20)  # a truncated file that only looks like a model by name
    with ServerProcess(f"alpha={chat_model(0)}", f"beta={chat_model(1)}", f"broken={broken}", "--max-batch", "1",
                       "--max-queue", "1", log=folder / "server.log") as s:
        yield s


def idle(name: str):
    return lambda h: h["models"][name]["in_flight"] == 0 and h["models"][name]["active"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot_at_once(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body("alpha")) as r:
            assert r.status_code == 200
            events = Events(r)
            events.take(3)
            assert server.model("alpha")["active"] == 1
        t0 = time.monotonic()  # the connection is closed here
    server.wait_for(idle("alpha"), timeout=5, what="the slot to be freed")
    assert time.monotonic() - t0 < 2.0
    assert server.model("alpha")["cancelled"] >= 1


def test_a_non_streaming_client_that_gives_up_frees_its_slot(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body("alpha", stream=False), timeout=1.0)
    server.wait_for(idle("alpha"), timeout=5, what="the slot to be freed")


def test_a_full_queue_gets_429_with_retry_after(server):
    with httpx.Client(base_url=server.url, timeout=30) as c1, httpx.Client(base_url=server.url, timeout=30) as c2:
        with c1.stream("POST", "/v1/completions", json=body("alpha")) as running, \
                c2.stream("POST", "/v1/completions", json=body("alpha")) as queued:
            assert running.status_code == queued.status_code == 200
            server.wait_for(lambda h: h["models"]["alpha"]["queued"] == 1, what="a queued request")
            r = httpx.post(server.url + "/v1/completions", json=body("alpha", stream=False), timeout=30)
            assert r.status_code == 429
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            ok = httpx.post(server.url + "/v1/completions", json=body("beta", 3, stream=False), timeout=30)
            assert ok.status_code == 200  # the queue is per model
    server.wait_for(idle("alpha"), timeout=5, what="both requests to be cancelled")


def test_a_dead_worker_is_reported_restarted_and_others_keep_serving(server):
    for model in ("alpha", "beta"):  # both loaded
        assert httpx.post(server.url + "/v1/completions", json=body(model, 2, False), timeout=60).status_code == 200
    pid = server.model("alpha")["pid"]
    result: dict = {}

    def non_streaming():
        result["r"] = httpx.post(server.url + "/v1/completions", json=body("alpha", stream=False), timeout=60)

    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body("alpha")) as r:
            events = Events(r)
            events.take(2)
            waiter = threading.Thread(target=non_streaming)
            waiter.start()
            server.wait_for(lambda h: h["models"]["alpha"]["queued"] == 1, what="the second request to queue")
            os.kill(pid, signal.SIGKILL)
            rest = events.take()
    waiter.join(30)
    error = json.loads(rest[-1])["error"]  # the stream ends with an OpenAI error event, not [DONE]
    assert error["code"] == "model_unavailable" and "killed by signal 9" in error["message"]
    assert result["r"].status_code == 503 and "Retry-After" in result["r"].headers
    ok = httpx.post(server.url + "/v1/completions", json=body("beta", 3, stream=False), timeout=30)
    assert ok.status_code == 200  # the other model is untouched
    h = server.wait_for(lambda h: h["models"]["alpha"]["state"] == "loaded", what="alpha to be restarted")
    alpha = h["models"]["alpha"]
    assert alpha["restarts"] == 1 and alpha["pid"] != pid
    again = httpx.post(server.url + "/v1/completions", json=body("alpha", 3, stream=False), timeout=30)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 3


def test_lru_unloading_under_a_global_memory_budget(server, tmp_path):
    httpx.post(server.url + "/v1/completions", json=body("beta", 1, stream=False), timeout=60)
    peak = server.model("beta")["peak_rss"]  # one loaded worker; two do not fit in 1.5 of that
    with ServerProcess(f"alpha={chat_model(0)}", f"beta={chat_model(1)}", "--total-memory", str(int(1.5 * peak)),
                       log=tmp_path / "lru.log") as lru:
        def ask(model):
            r = httpx.post(lru.url + "/v1/completions", json=body(model, 2, stream=False), timeout=60)
            assert r.status_code == 200, r.text
            return {n: m["state"] for n, m in lru.health()["models"].items()}

        assert ask("alpha") == {"alpha": "loaded", "beta": "unloaded"}
        assert ask("beta") == {"alpha": "unloaded", "beta": "loaded"}
        assert ask("beta") == {"alpha": "unloaded", "beta": "loaded"}
        assert ask("alpha") == {"alpha": "loaded", "beta": "unloaded"}
        models = httpx.get(lru.url + "/v1/models").json()["data"]
        assert {m["id"]: m["state"] for m in models} == {"alpha": "loaded", "beta": "unloaded"}


def test_sigterm_drains_in_flight_requests_before_exit(tmp_path):
    s = ServerProcess(f"alpha={chat_model(0)}", "--preload", log=tmp_path / "drain.log")
    pids = [s.model("alpha")["pid"]]
    result: dict = {}

    def non_streaming():
        result["r"] = httpx.post(s.url + "/v1/completions", json=body("alpha", 200, stream=False), timeout=60)

    with httpx.Client(base_url=s.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body("alpha", 300)) as r:
            events = Events(r)
            first = events.take(1)
            waiter = threading.Thread(target=non_streaming)
            waiter.start()
            s.wait_for(lambda h: h["models"]["alpha"]["in_flight"] == 2, what="both requests in flight")
            s.proc.send_signal(signal.SIGTERM)
            rest = events.take()
    waiter.join(60)
    chunks = [json.loads(x) for x in first + rest[:-1]]
    assert rest[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 200
    assert s.proc.wait(30) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
    for pid in pids:  # the worker is gone too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    s.stop()


def test_a_model_that_fails_to_load_gets_503_and_the_others_serve(server):
    r = httpx.post(server.url + "/v1/completions", json=body("broken", 2, stream=False), timeout=60)
    assert r.status_code == 503 and "Retry-After" in r.headers
    error = r.json()["error"]
    assert error["code"] == "model_load_failed" and "broken.gguf" in error["message"]
    h = server.health()
    assert h["status"] == "degraded" and h["models"]["broken"]["state"] == "error"
    assert "broken.gguf" in h["models"]["broken"]["last_error"]
    ok = httpx.post(server.url + "/v1/completions", json=body("alpha", 2, stream=False), timeout=60)
    assert ok.status_code == 200
