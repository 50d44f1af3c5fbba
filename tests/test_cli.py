"""The pipeload command as a user runs it: a real subprocess, exit status, output."""

import subprocess
import sys

import pytest

from pipeload.bench.synth import LlamaShape, write_synthetic_gguf


def pipeload(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeload.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_synthetic_gguf(tmp_path_factory.mktemp("cli") / "s.gguf",
                                LlamaShape(512, 6, 8, 4, 1536, 2048, 512), "q4_k_m")


def test_plan_prints_every_byte_and_the_bound(synthetic):
    done = pipeload("plan", synthetic, "--memory-limit", "380MB", "--ctx", "256")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in ("runtime", "embeddings", "prefetch ring", "KV cache", "activations", "predicted peak", "bound: at most"):
        assert line in out
    assert "-bound)" in out


def test_plan_with_a_budget_too_small_is_one_clear_line(synthetic):
    done = pipeload("plan", synthetic, "--memory-limit", "50MB")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "give at least" in done.stderr and "Traceback" not in done.stderr


def test_inspect_and_convert(tmp_path, tiny):
    _, folder, _ = tiny("qwen2")
    out = tmp_path / "q.gguf"
    done = pipeload("convert", folder, "-o", out, "--quant", "f16", "-q")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and not (tmp_path / "q.gguf.partial").exists()
    done = pipeload("inspect", out)
    assert done.returncode == 0
    assert "qwen2" in done.stdout and "blk.2" in done.stdout and "F16" in done.stdout


def test_inspect_without_a_model_is_the_builtin_one_and_models_lists_what_runs():
    done = pipeload("inspect")
    assert done.returncode == 0, done.stderr
    assert "pipeload-main.gguf" in done.stdout and "architecture:  llama" in done.stdout
    done = pipeload("models")
    assert done.returncode == 0, done.stderr
    from pipeload.models import GGUF_ARCHITECTURES, HF_MODEL_TYPES

    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line and not line.startswith(("tensor", "every"))}
    assert set(rows) == set(HF_MODEL_TYPES.values()) | set(GGUF_ARCHITECTURES.values()) | {"mixtral"}
    assert "qwen3" in rows["llama"] and "mixture of experts" in rows["qwen_moe"] and "encoder" in rows["vit"]
    assert "pipeline, tensor" in rows["llama"] and "pipeline, tensor" not in rows["mixtral"]
    assert "Q4_K" in done.stdout and "with compiled kernels" in done.stdout


def test_bad_arguments(tmp_path, synthetic):
    assert pipeload("convert", synthetic, "-o", tmp_path / "x.gguf", "--quant", "q9_9").returncode == 2
    done = pipeload("run", synthetic, "-n", "3", "--memory-limit", "lots")
    assert done.returncode == 2 and "cannot read memory size 'lots'" in done.stderr
