"""Real pretrained GGUF files against llama.cpp's values recorded on the same files.

The references in tests/data/real_models/ were made by scripts/record_llama_cpp_reference.py
(llama-cpp-python); the models come from ../shared/models/fetch.sh (the `real_model` fixture).
pipeload computes in float32 on the stored bytes.
"""

import json
import math
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "real_models"
MODELS = ["smollm2-135m-instruct-q4_1.gguf", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
NEAR_TIE = 0.1  # llama.cpp's top-two logit margin below which either token may come first


def reference(name: str) -> dict:
    return json.loads((DATA / (Path(name).stem + ".json")).read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=MODELS)
def loaded(request, real_model):
    from pipeload import PipelineModel

    model = PipelineModel.from_pretrained(real_model(request.param), dtype="float32")
    yield request.param, model, reference(request.param)
    model.close()


def test_tokenization_matches_llama_cpp(loaded):
    _, model, ref = loaded
    for case in ref["tokenization"]:
        assert model.tokenizer.encode(case["text"], add_special_tokens=False) == case["ids"], case["text"]


def test_top1_agreement_and_perplexity_match_llama_cpp(loaded):
    name, model, ref = loaded
    ids = ref["scoring"]["ids"]
    logp = torch.log_softmax(model.logits(ids)[:-1].double(), dim=-1)          # (T-1, V)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]                 # (T-1,)
    perplexity = math.exp(nll.mean().item())
    agreement = (logp.argmax(-1) == torch.tensor(ref["scoring"]["argmax"])).double().mean().item()
    theirs = ref["scoring"]["perplexity"]
    assert agreement >= 0.95, f"{name}: top-1 agreement {agreement:.4f} with llama.cpp over {len(ids) - 1} tokens"
    assert abs(perplexity / theirs - 1) < 0.01, f"{name}: perplexity {perplexity:.4f}, llama.cpp {theirs:.4f}"


def test_chat_template_renders_as_transformers(loaded, real_model):
    from transformers import AutoTokenizer

    name, model, ref = loaded
    path = real_model(name)
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    conversations = [chat["messages"] for chat in ref["chats"]]
    conversations.append(conversations[1] + [{"role": "assistant", "content": "Paris."},
                                             {"role": "user", "content": "And of Italy?"}])
    for messages in conversations:
        for add in (True, False):
            theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert model.tokenizer.apply_chat_template(messages, add_generation_prompt=add) == theirs


def test_greedy_chat_answers_match_llama_cpp(loaded):
    """Equal tokens up to the first position where llama.cpp itself is near a tie (its top-two
    logits within NEAR_TIE, decoding token by token or scoring the answer in one pass)."""
    name, model, ref = loaded
    for chat in ref["chats"]:
        prompt = model.tokenizer.encode_chat(chat["messages"], add_generation_prompt=True)
        assert prompt == chat["prompt_ids"], f"{name}: prompt ids differ from llama.cpp's for {chat['messages']}"
        ours = [r.token for r in model.stream(prompt, max_tokens=len(chat["greedy"])) if r.token is not None]
        theirs = chat["greedy"]
        margins = [min(a, b) for a, b in zip(chat["top2_margin"], chat["top2_margin_one_pass"])]
        differ = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if differ is None:
            assert len(ours) == len(theirs), f"{name}: {len(ours)} tokens, llama.cpp {len(theirs)}"
            continue
        assert min(margins[:differ + 1]) < NEAR_TIE, (
            f"{name}: greedy token {differ} is {ours[differ]}, llama.cpp's {theirs[differ]}, with no near-tie "
            f"before it; llama.cpp's top-two margins (token by token / one pass): "
            f"{list(zip(chat['top2_margin'], chat['top2_margin_one_pass']))[:differ + 1]}")


def test_recorded_values_match_live_llama_cpp(real_model):
    """The committed references are what the installed llama.cpp computes (SmolLM2, cheap)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional, see README)")
    name = MODELS[0]
    ref = reference(name)
    llm = llama_cpp.Llama(str(real_model(name)), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    for case in ref["tokenization"]:
        assert llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=True) == case["ids"]
    ids = ref["scoring"]["ids"]
    llm.eval(ids)
    logits = torch.tensor(np.array(llm.scores[:len(ids) - 1]), dtype=torch.float64)  # (T-1, V)
    logp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    agreement = (logits.argmax(-1) == torch.tensor(ref["scoring"]["argmax"])).double().mean().item()
    assert agreement >= 0.99
    assert abs(math.exp(-logp.mean().item()) / ref["scoring"]["perplexity"] - 1) < 1e-3
