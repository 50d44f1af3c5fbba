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
