"""llama.cpp itself reads the GGUF files pipeload writes, to the same logits as transformers.

Optional: needs `llama-cpp-python`, a ~8 minute build (see README, "llama.cpp for the race").
llama.cpp keeps its KV cache in f16, hence the looser tolerance than our own 1e-4.
"""

import numpy as np
import pytest
import torch

from tiny_models import KINDS, reference_logits

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional, see README)")


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_reads_our_gguf(tiny, kind):
    model, _, gguf = tiny(kind)
    llm = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    ids = torch.randint(0, 128, (1, 33), generator=torch.Generator().manual_seed(0))
    llm.eval(ids[0].tolist())
    theirs = torch.tensor(np.array(llm.scores[:33]))
    ref = reference_logits(model, ids)[0]
    assert (theirs - ref).abs().max().item() < 2e-2
    assert torch.equal(theirs.argmax(-1), ref.argmax(-1))
