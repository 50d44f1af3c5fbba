"""Who may use a server and how much one request may ask: API keys (the official openai client
raises AuthenticationError without the right key), /health and /metrics behind them, and every
limit answered by a 4xx that names it."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from pipeload.server.security import Keys, Limits, SecurityMiddleware, load_keys
from pipeload.server.serve import access_warning
from server_helpers import ServerProcess, chat_model

KEY, FILE_KEY, METRICS_KEY = "sk-pipeload-test-1", "sk-pipeload-test-2", "scraper-key-3"
LIMITS = ["--max-tokens-cap", "8", "--max-n", "2", "--max-prompt-chars", "200", "--max-stop", "2",
          "--max-stop-chars", "5", "--max-request-bytes", "3000"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    (root / "keys").write_text(f"# the team's key\n{FILE_KEY}\n\n")
    with ServerProcess(f"alpha={chat_model(0)}", "--api-key", KEY, "--api-key-file", str(root / "keys"),
                       "--metrics-key", METRICS_KEY, *LIMITS, log=root / "server.log") as s:
        yield s


def client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_without_or_with_a_wrong_key_the_client_raises_authentication_error(server):
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
    assert r.headers["www-authenticate"].startswith("Bearer")
    wrong = client(server, "sk-not-the-key")
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.body["code"] == "invalid_api_key" and "sk-not-the-key" not in e.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(server, METRICS_KEY).completions.create(model="alpha", prompt="hi", max_tokens=2)  # metrics only
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "hi"},
                   headers={"Authorization": f"Basic {KEY}"})
    assert r.status_code == 401  # only Bearer


@pytest.mark.parametrize("key", [KEY, FILE_KEY])
def test_with_a_key_everything_works(server, key):
    c = client(server, key)
    assert [m.id for m in c.models.list()] == ["alpha"]
    r = c.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=4, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    chunks = list(c.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hello"}],
                                            stream=True, temperature=0))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")


def test_health_says_only_ok_without_the_key(server):
    bare = httpx.get(server.url + "/health")
    assert bare.status_code == 200 and bare.json() == {"status": "ok"}
    full = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert full["status"] == "ok" and "path" in full["models"]["alpha"]


def test_metrics_need_a_key_or_the_metrics_key(server):
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    for key in (METRICS_KEY, KEY):
        r = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and "pipeload_requests_total" in r.text


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 9}, "max_tokens", "--max-tokens-cap"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 50},
     "max_completion_tokens", "--max-tokens-cap"),
    ("/v1/completions", {"prompt": "x", "n": 3}, "n", "--max-n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"]}, "n", "--max-n"),
    ("/v1/completions", {"prompt": "x" * 201}, "prompt", "--max-prompt-chars"),
    ("/v1/completions", {"prompt": list(range(201))}, "prompt", "--max-prompt-chars"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 150}] * 2}, "messages",
     "--max-prompt-chars"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c"]}, "stop", "--max-stop"),
    ("/v1/completions", {"prompt": "x", "stop": "abcdef"}, "stop", "--max-stop-chars"),
])
def test_each_limit_is_a_4xx_naming_it(server, path, body, param, words):
    r = httpx.post(server.url + path, json={"model": "alpha", **body}, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == "limit_exceeded" and words in err["message"], err


def test_the_token_cap_is_the_default_where_a_request_leaves_it_open(server):
    r = client(server, KEY).chat.completions.create(model="alpha", messages=[{"role": "user", "content": "Hi"}],
                                                    temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"


def test_a_body_too_large_is_413_with_or_without_content_length(server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "alpha", "prompt": "' + b"x" * 4000 + b'"}'
    r = httpx.post(server.url + "/v1/completions", content=big, headers=auth)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the body arrives in chunks
        for i in range(0, len(big), 500):
            yield big[i:i + 500]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=auth)
    assert r.status_code == 413 and "3000" in r.json()["error"]["message"]
    assert client(server, KEY).completions.create(model="alpha", prompt="ok", max_tokens=1).choices  # still serving


def test_concurrent_requests_per_client_address():
    """The middleware alone, in-process: the fourth request in flight from one address gets 429;
    once one finishes, another is let in; other addresses are not affected."""
    release = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    guarded = SecurityMiddleware(app, Keys(), Limits(max_client_requests=3))

    async def scenario():
        here = httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded, client=("10.1.1.1", 5000)),
                                 base_url="http://t")
        there = httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded, client=("10.1.1.2", 5000)),
                                  base_url="http://t")
        held = [asyncio.create_task(here.post("/v1/completions", content=b"{}")) for _ in range(3)]
        await asyncio.sleep(0.05)
        refused = await here.post("/v1/completions", content=b"{}")
        other = asyncio.create_task(there.post("/v1/completions", content=b"{}"))
        await asyncio.sleep(0.05)
        release.set()
        done = [r.status_code for r in await asyncio.gather(*held, other)]
        again = await here.post("/v1/completions", content=b"{}")
        await here.aclose()
        await there.aclose()
        return refused, done, again

    refused, done, again = asyncio.run(scenario())
    assert refused.status_code == 429 and "--max-client-requests" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    assert done == [200, 200, 200, 200] and again.status_code == 200
    assert guarded.in_flight == {}


def test_keys_compare_by_value_only():
    keys = Keys(["alpha-key", "beta-key"], ["m-key"])
    assert keys.matches("alpha-key") and keys.matches("beta-key") and not keys.matches("alpha-ke")
    assert not keys.matches("m-key") and keys.matches("m-key", metrics=True) and not keys.matches(None)
    assert not Keys().required and Keys(["k"]).required


def test_key_sources(tmp_path):
    f = tmp_path / "k"
    f.write_text("one\n# comment\n\ntwo\n")
    assert load_keys(["zero"], f, env={"PIPELOAD_API_KEY": "three"}) == ["zero", "one", "two", "three"]
    assert load_keys(None, None, env={}) == []
    with pytest.raises(ValueError, match="holds no key"):
        (tmp_path / "empty").write_text("# nothing\n")
        load_keys(None, tmp_path / "empty", env={})
    with pytest.raises(ValueError, match="cannot read"):
        load_keys(None, tmp_path / "missing", env={})
    with pytest.raises(ValueError, match="without spaces"):
        load_keys(["two words"], env={})


def test_a_warning_when_listening_beyond_loopback_without_a_key():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost"):
        assert access_warning(host, 8080, Keys()) is None
    for host in ("0.0.0.0", "192.168.1.10", "::", ""):
        assert "without an API key" in access_warning(host, 8080, Keys())
    assert access_warning("0.0.0.0", 8080, Keys(["k"])) is None
