"""schemathesis against a real `pipeload serve` (with a key and small limits), from the server's own
OpenAPI document: valid and invalid requests to every endpoint; no 5xx, no hang, no worker death,
every answer as documented. A few examples per operation here; `pipeload bench api_fuzz` runs
hundreds (see pipeload/bench/api_fuzz.py)."""

from __future__ import annotations

import httpx
import pytest

from pipeload.bench.api_fuzz import FUZZ_LIMITS, fuzz_api
from server_helpers import ServerProcess, chat_model

pytest.importorskip("schemathesis")
KEY = "sk-fuzz-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with ServerProcess(f"m={chat_model(0)}", "--api-key", KEY, "--preload", *FUZZ_LIMITS, log=log) as s:
        yield s


def test_the_document_describes_the_served_models_and_limits(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    request = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert request["model"]["enum"] == ["m"] and request["n"]["maximum"] == 2
    assert request["max_tokens"]["anyOf"][0]["maximum"] == 4
    assert doc["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]


def test_schemathesis_finds_nothing(server):
    report = fuzz_api(server.url, KEY, examples=25)
    assert report.requests > 100 and set(report.statuses) >= {200, 400}, report.summary()
    assert report.ok, report.summary()
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["models"]["m"]["state"] == "loaded" and health["models"]["m"]["in_flight"] == 0


@pytest.mark.parametrize("extreme", [{"top_p": 5e-324}, {"repetition_penalty": 5e-324}, {"temperature": 1e-300},
                                     {"seed": -1419}, {"seed": 2**63 - 1}])
def test_what_fuzzing_found_is_answered(server, extreme):
    """Each of these killed the model's worker before (a top_p or penalty that underflows in float32
    left no token to sample; a seed beyond int64 overflowed torch's generator)."""
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "m", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True, **extreme})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    assert httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()[
        "models"]["m"]["restarts"] == 0


def test_a_seed_beyond_int64_is_refused(server):
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "m", "prompt": "Hello", "max_tokens": 2, "seed": 2**64})
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
