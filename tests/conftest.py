import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see pipeload/__init__.py
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from tiny_models import KINDS, build_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Lazily built tiny models: tiny(kind) -> (transformers model, HF folder, GGUF path)."""
    from pipeload.convert import convert

    built = {}

    def get(kind: str):
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            model = build_hf_model(kind, root / "hf")
            gguf = root / "model.gguf"  # transformers reads "mistral" in a file name as an architecture
            convert(root / "hf", gguf, quant="f32")
            built[kind] = (model, root / "hf", gguf)
        return built[kind]

    return get


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="session")
def encoders(tmp_path_factory):
    """Lazily built tiny encoders: encoders(kind) -> (transformers model, HF folder, GGUF written by
    llama.cpp's own converter, or None for ViT kinds, which llama.cpp's converter does not take)."""
    from encoder_models import TEXT_KINDS, build_image_encoder, build_text_encoder, llama_cpp_convert

    built = {}

    def get(kind: str):
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            if kind in TEXT_KINDS:
                model = build_text_encoder(kind, root / "hf")
                gguf = llama_cpp_convert(root / "hf", root / "llama-cpp.gguf")
            else:
                model, gguf = build_image_encoder(kind, root / "hf"), None
            built[kind] = (model, root / "hf", gguf)
        return built[kind]

    return get


def _converted_lazily(tmp_path_factory, build):
    """get(kind) -> (transformers model, HF folder, GGUF path written by llama.cpp's converter),
    each kind built once by build(kind, folder). Skips when all-MiniLM-L6-v2 (whose tokenizer the
    converter needs) is not in the models folder."""
    from encoder_models import llama_cpp_convert
    from moe_models import MINILM

    built = {}

    def get(kind: str):
        if not (MINILM / "tokenizer.json").is_file():
            pytest.skip(f"{MINILM} is missing (../shared/models/fetch.sh fetches it): the converter needs its tokenizer")
        if kind not in built:
            root = tmp_path_factory.mktemp(kind)
            model = build(kind, root / "hf")
            built[kind] = (model, root / "hf", llama_cpp_convert(root / "hf", root / "model.gguf"))
        return built[kind]

    return get


@pytest.fixture(scope="session")
def moe_tiny(tmp_path_factory):
    """Lazily built tiny MoE models: moe_tiny(kind) -> (transformers model, HF folder, GGUF)."""
    from moe_models import build_moe_model

    return _converted_lazily(tmp_path_factory, build_moe_model)


@pytest.fixture(scope="session")
def decoder_tiny(tmp_path_factory):
    """Lazily built tiny decoders (Qwen3, Gemma 2, Gemma 3, Phi-3): decoder_tiny(kind) ->
    (transformers model, HF folder, GGUF)."""
    from decoder_models import build_decoder

    return _converted_lazily(tmp_path_factory, build_decoder)


REAL_MODELS = Path(os.environ.get("PIPELOAD_MODELS") or Path.home() / ".cache" / "pipeload" / "models")
FETCH = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "fetch.sh"


@pytest.fixture(scope="session")
def real_model():
    """real_model(file name) -> path of a real GGUF of the small set, fetched into REAL_MODELS by
    ../shared/models/fetch.sh when missing. Fails (never skips) when it cannot be had."""
    import subprocess

    def get(name: str) -> Path:
        path = REAL_MODELS / name
        if not path.is_file():
            if not FETCH.is_file():
                pytest.fail(f"{path} is missing and {FETCH} (which fetches it) does not exist")
            run = subprocess.run(["bash", str(FETCH), str(REAL_MODELS), "small"], capture_output=True, text=True)
            if run.returncode != 0 or not path.is_file():
                pytest.fail(f"{FETCH} {REAL_MODELS} small failed (exit {run.returncode}): "
                            f"{(run.stdout + run.stderr)[-2000:]}")
        return path

    return get
