"""Encoders from the command line (`pipeload embed`, `pipeload classify`) and over HTTP
(`POST /v1/embeddings` with the official `openai` client, behind an API key and the server's
limits; /v1/models says what each model can do; schemathesis on the endpoint)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import warnings

import httpx
import numpy as np
import openai
import pytest
import torch

from pipeload import PipelineModel
from server_helpers import ROOT, ServerProcess, chat_model

KEY = "sk-encoder-test"
TEXTS = ["the quick brown fox", "hello world", "numbers 3.14 and 42", "why is the sky blue?"]


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "pipeload.cli", *args, "--threads", "2"], input=stdin,
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _embed(path, texts, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny folders carry no pooling configuration
        return PipelineModel.from_pretrained(path).embed(texts, **kw)


def test_cli_embed_file_stdin_and_errors(encoders, tmp_path):
    _, folder, _ = encoders("bert")
    want = _embed(folder, TEXTS)
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS[:2]) + "\n\n   \n" + "\n".join(TEXTS[2:]) + "\n")  # blank lines skipped
    out = tmp_path / "out.jsonl"
    r = _cli("embed", str(folder), str(source), "-o", str(out))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["input"] for x in lines] == TEXTS and [x["index"] for x in lines] == [0, 1, 2, 3]
    assert np.allclose([x["embedding"] for x in lines], want.numpy(), atol=1e-6, rtol=0)
    assert "4 vectors of 64 dimensions" in r.stderr
    r = _cli("embed", str(folder), "-", stdin="hello world\n")
    assert r.returncode == 0, r.stderr
    assert np.allclose(json.loads(r.stdout)["embedding"], want[1].numpy(), atol=1e-6, rtol=0)
    r = _cli("embed", str(folder), str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "missing.txt: no such file" in r.stderr
    r = _cli("embed", str(folder), "-", stdin="\n \n")
    assert r.returncode == 2 and "stdin has no non-blank line" in r.stderr
    r = _cli("embed", str(chat_model(0)), "-", stdin="hello\n")
    assert r.returncode == 2 and "cannot embed (it can: completion, chat)" in r.stderr


def test_cli_classify_and_embed_images(encoders, tmp_path):
    from PIL import Image

    _, folder, _ = encoders("vit")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"im{i}.png")
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(paths[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PipelineModel.from_pretrained(folder)
        want, vectors = model.classify(paths, top_k=2), model.embed(paths)
    r = _cli("classify", str(folder), *map(str, paths), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    for answer, ours in zip(got, want):
        assert [x["label"] for x in answer["labels"]] == [k for k, _ in ours]
        assert np.allclose([x["probability"] for x in answer["labels"]], [p for _, p in ours], atol=1e-6)
    r = _cli("classify", str(folder), str(paths[0]), "--top-k", "1")
    assert r.returncode == 0 and r.stdout.startswith(f"{paths[0]}: {want[0][0][0]} (")
    r = _cli("embed", str(folder), *map(str, paths))
    assert r.returncode == 0, r.stderr
    assert np.allclose([json.loads(line)["embedding"] for line in r.stdout.splitlines()], vectors.numpy(), atol=1e-6)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    r = _cli("classify", str(folder), str(text))
    assert r.returncode == 2 and "is not an image Pillow can read" in r.stderr


@pytest.fixture(scope="module")
def server(encoders, tmp_path_factory):
    _, bert, _ = encoders("bert")
    _, vit, _ = encoders("vit")
    log = tmp_path_factory.mktemp("encserve") / "server.log"
    with ServerProcess(f"enc={bert}", f"img={vit}", f"chat={chat_model(0)}", "--api-key", KEY,
                       "--max-prompt-chars", "400", log=log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(server, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/embeddings", json=body, headers=headers, timeout=120)


def test_models_list_their_capabilities(client):
    """Before any model is loaded (read from the files), and the same after loading."""
    before = {m.id: m.model_extra["capabilities"] for m in client.models.list()}
    assert before == {"enc": ["embeddings"], "img": ["image_embeddings", "classification"],
                      "chat": ["completion", "chat"]}
    client.embeddings.create(model="enc", input="hello")
    assert {m.id: m.model_extra["capabilities"] for m in client.models.list()} == before
    assert client.models.retrieve("enc").model_extra["state"] == "loaded"


def test_embeddings_equal_the_python_api(server, client, encoders):
    """The official client (base64 under the hood) and float JSON give the same vectors, which are
    PipelineModel.embed's (the worker batches all waiting requests: equal within float32 rounding)."""
    _, folder, _ = encoders("bert")
    want = _embed(folder, TEXTS)
    r = client.embeddings.create(model="enc", input=TEXTS)
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert [d.index for d in r.data] == [0, 1, 2, 3] and r.model == "enc"
    assert np.allclose(got, want.numpy(), atol=1e-6, rtol=0)
    assert r.usage.prompt_tokens == sum(len(PipelineModel.from_pretrained(folder).tokenizer.encode(t)) for t in TEXTS)
    assert r.usage.total_tokens == r.usage.prompt_tokens
    plain = _post(server, {"model": "enc", "input": TEXTS, "encoding_format": "float"}).json()
    packed = _post(server, {"model": "enc", "input": TEXTS, "encoding_format": "base64"}).json()
    floats = np.array([d["embedding"] for d in plain["data"]], dtype=np.float32)
    unpacked = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in packed["data"]])
    assert np.array_equal(floats, unpacked) and np.allclose(floats, want.numpy(), atol=1e-6, rtol=0)
    one = client.embeddings.create(model="enc", input="hello world")
    assert len(one.data) == 1 and np.allclose(one.data[0].embedding, want[1].numpy(), atol=1e-6, rtol=0)


def test_concurrent_requests_share_passes(server, encoders):
    """Requests sent at once are all answered, each with its own vectors."""
    import concurrent.futures as cf

    _, folder, _ = encoders("bert")
    want = _embed(folder, TEXTS)
    with cf.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _post(server, {"model": "enc", "input": [TEXTS[i % 4]]}), range(16)))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        assert np.allclose(r.json()["data"][0]["embedding"], want[i % 4].numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("body, key, status, match", [
    ({"model": "enc", "input": "hi"}, None, 401, "API key"),
    ({"model": "enc", "input": "hi"}, "sk-wrong", 401, "API key"),
    ({"model": "chat", "input": "hi"}, KEY, 400, "does not make text embeddings"),
    ({"model": "img", "input": "hi"}, KEY, 400, "does not make text embeddings"),
    ({"model": "nope", "input": "hi"}, KEY, 404, "does not exist"),
    ({"model": "enc", "input": []}, KEY, 400, "non-empty list of strings"),
    ({"model": "enc", "input": [1, 2, 3]}, KEY, 400, "token ids are not supported"),
    ({"model": "enc", "input": ["fine", " "]}, KEY, 400, "input 1 is an empty string"),
    ({"model": "enc", "input": "word " * 60}, KEY, 400, "more than the 40"),
    ({"model": "enc", "input": ["x" * 300, "y" * 200]}, KEY, 400, "--max-prompt-chars"),
    ({"model": "enc", "input": "hi", "encoding_format": "int8"}, KEY, 400, "encoding_format"),
    ({"model": "enc", "input": "hi", "dimensions": 8}, KEY, 400, "unrecognized request argument"),
])
def test_bad_embedding_requests(server, body, key, status, match):
    r = _post(server, body, key)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"], r.text
    health = httpx.get(server.url + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert health["models"]["enc"]["restarts"] == 0


def test_schemathesis_on_embeddings(server):
    pytest.importorskip("schemathesis")
    from pipeload.bench.api_fuzz import fuzz_api

    report = fuzz_api(server.url, KEY, examples=15, operations={"POST /v1/embeddings"})
    assert report.requests > 20 and 200 in report.statuses, report.summary()
    assert report.ok, report.summary()
