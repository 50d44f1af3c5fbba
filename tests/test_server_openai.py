"""The official `openai` client against a real `pipeload serve` on a loopback port: model listing,
completions, chat, streaming, and OpenAI-style errors for every kind of bad input."""

from __future__ import annotations

import httpx
import openai
import pytest

from server_helpers import ServerProcess, chat_model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(f"alpha={chat_model(0)}", f"beta={chat_model(1)}", "--max-batch", "4", log=log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_are_listed_and_load_on_first_use(server, client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"alpha", "beta"}
    assert client.models.retrieve("beta").id == "beta"
    client.completions.create(model="beta", prompt="Hi", max_tokens=1)
    assert server.model("beta")["state"] == "loaded"
    assert {m.id: m.model_extra["state"] for m in client.models.list()}["beta"] == "loaded"


def test_completion(client):
    r = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "alpha"
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 0
    again = client.completions.create(model="alpha", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # greedy is deterministic


def test_completion_options(client):
    r = client.completions.create(model="alpha", prompt=["Hello", [0, 5, 6, 7]], n=2, max_tokens=5, seed=3,
                                  temperature=0.9, logprobs=2, echo=False, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 5 and len(c.logprobs.top_logprobs[0]) == 2 for c in r.choices)
    seeded = client.completions.create(model="alpha", prompt="Hello", max_tokens=5, seed=3, temperature=0.9,
                                       extra_body={"ignore_eos": True})
    assert seeded.choices[0].text == r.choices[0].text  # choice 0 of a seeded request uses the seed itself
    echo = client.completions.create(model="alpha", prompt="Hello", max_tokens=3, echo=True, temperature=0)
    assert echo.choices[0].text.startswith("Hello")


def test_stop_string(client):
    free = client.completions.create(model="alpha", prompt="Hello", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[5:7]
    r = client.completions.create(model="alpha", prompt="Hello", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == free[:free.index(stop)]


def test_chat(client):
    r = client.chat.completions.create(model="beta", messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Hello there"}],
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert len(choice.logprobs.content[0].top_logprobs) == 3


def test_chat_streaming(client):
    kw = dict(model="alpha", messages=[{"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}],
              max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []


def test_completion_streaming(client):
    text = client.completions.create(model="beta", prompt="def fibonacci(n):", max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    parts = list(client.completions.create(model="beta", prompt="def fibonacci(n):", max_tokens=10, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}))
    assert "".join(p.choices[0].text for p in parts) == text
    assert parts[-1].choices[0].finish_reason == "length"


def test_errors_through_the_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and "alpha" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="alpha", prompt="x " * 5000, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded" and "4096" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a stream fails before it starts, with a status
        client.chat.completions.create(model="alpha", messages=[{"role": "wizard", "content": "x"}], stream=True)
    assert e.value.body["param"] == "messages[0].role"


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing required parameter"),
    ("/v1/chat/completions", {"model": "alpha"}, 400, "messages", "missing required parameter"),
    ("/v1/chat/completions", {"model": "alpha", "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": "alpha", "messages": [{"content": "x"}]}, 400, "messages[0].role", "missing"),
    ("/v1/completions", {"model": "alpha", "prompt": 3}, 400, "prompt", "prompt must be"),
    ("/v1/completions", {"model": "alpha", "prompt": [1, 99999]}, 400, None, "outside the vocabulary"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p", "greater than"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "n": 100}, 400, "n", "at most 16 per request (--max-n)"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "stop": 5}, 400, "stop", "stop must be"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "temperature": "0.5"}, 400, "temperature", "number"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "wat": 1}, 400, "wat", "unrecognized"),
    ("/v1/completions", {"model": "alpha", "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty",
     "not supported"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400, "model", "string"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ("/v1/nothing", {}, 404, None, "no such endpoint"),
])
def test_bad_input_gets_openai_error_bodies(server, path, body, status, param, words):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]


def test_wrong_method(server):
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]


def test_health_and_metrics(server, client):
    client.completions.create(model="alpha", prompt="Hi", max_tokens=3, extra_body={"ignore_eos": True})
    health = server.health()
    assert health["status"] == "ok"
    alpha = health["models"]["alpha"]
    assert alpha["state"] == "loaded" and alpha["peak_rss"] > 0 and alpha["active"] == 0
    text = httpx.get(server.url + "/metrics").text
    for name in ("pipeload_requests_total", "pipeload_completion_tokens_total", "pipeload_prompt_tokens_total",
                 "pipeload_tokens_per_second", "pipeload_queue_length", "pipeload_batch_size",
                 "pipeload_peak_rss_bytes", "pipeload_pass_batch_size_bucket", "pipeload_model_state"):
        assert f"\n{name}{{" in text, name
    assert 'pipeload_requests_total{endpoint="completions",model="alpha",status="200"}' in text
    assert 'pipeload_requests_total{endpoint="completions",model="unknown",status="404"}' in text
    assert 'pipeload_model_state{model="alpha",state="loaded"} 1.0' in text


def test_web_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text
