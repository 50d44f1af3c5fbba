"""The cluster's commands: probe, plan --cluster nodes.yaml, and a torchrun launch of
`pipeload run --cluster` + `pipeload worker` giving the text of a local run."""

import json
import shutil
import subprocess
import sys

import pytest

from cluster_helpers import ENV, free_port_pair


def _run(*args, timeout=120, cmd=None):
    done = subprocess.run(cmd or [sys.executable, "-m", "pipeload.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def hf_with_tokenizer(tiny, tmp_path_factory):
    """The tiny llama3 folder plus a word-level tokenizer over its 128 ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("cluster-cli") / "hf"
    shutil.copytree(tiny("llama3")[1], folder)
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 128)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_probe_json_and_plan_from_nodes_yaml(tiny, tmp_path, capsys):
    from pipeload.cli import main

    assert main(["probe", "--no-disk", "--threads", "1", "--json", "--watts", "5", "--price", "80"]) == 0
    fig = json.loads(capsys.readouterr().out)
    for key in ("matmul_flops_f32", "memory_bandwidth", "decode_bandwidth", "free_memory", "gflops_per_watt",
                "usd_per_gflops"):
        assert fig[key] > 0, key
    (tmp_path / "fast.json").write_text(json.dumps({**fig, "name": "fast", "decode_bandwidth": 3e9}))
    (tmp_path / "nodes.yaml").write_text(
        "link: {latency_us: 200, bandwidth_gbit: 1}\n"
        "nodes:\n  - probe: fast.json\n  - {name: slow, memory: 1GB, decode_bandwidth: 1.0e9}\n"
        "  - {name: third, memory: 1GB, decode_bandwidth: 1.0e9}\n")
    assert main(["plan", str(tiny("llama3")[2]), "--cluster", str(tmp_path / "nodes.yaml"), "--streams", "3"]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "slow" in out and "third" in out and "predicted decode tokens/s" in out
    assert "tensor parallel" in out


def test_torchrun_launch_same_text(hf_with_tokenizer):
    """torchrun starts 3 processes: rank 0 runs `pipeload run --cluster`, ranks 1-2 `pipeload worker`."""
    from pipeload import PipelineModel

    prompt = "w5 w17 w3 w99"
    local = PipelineModel.from_pretrained(hf_with_tokenizer, threads=1).generate(
        prompt, max_tokens=12, temperature=0, repetition_penalty=1.1)  # the CLI's default penalty
    port = free_port_pair()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", str(port),
                "-m", "pipeload.cluster.torchrun", str(hf_with_tokenizer), "-p", prompt, "-n", "12",
                "--temperature", "0", "--threads", "1"]
    done = _run(cmd=torchrun, timeout=180)
    assert local.strip() and local in done.stdout, (local, done.stdout, done.stderr[-2000:])
    assert "[cluster] pipeline over 2 workers" in done.stderr
