"""A budget changes speed, never results: for every GGUF type pipeload computes on, a resident run,
a fully streamed run and a partially resident one give bit-identical logits and tokens, computing
on the file's own bytes (nothing converted, nothing written beside the model)."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from pipeload import PipelineModel
from pipeload.errors import MemoryBudgetError
from pipeload.models.common import Linear
from pipeload.runtime.planner import make_plan
from pipeload.runtime.spec import open_model
from tiny_models import build_k_quant_llama

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
PROMPT = [5, 17, 120, 3, 99, 42, 7, 127, 1, 64, 100, 33]  # ids below every test vocabulary (128)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kquant") / "hf"
    build_k_quant_llama(folder, weight_std=0.05)  # rows of 256: every type applies to every matrix
    return folder


def _smallest_budget(spec) -> int:
    """The least budget make_plan accepts (runtime counted as 0 bytes) with O_DIRECT reads:
    everything streams. (Buffered reads also hold a group's page cache while it is read, which
    for a model this small costs more than keeping a group resident.)"""
    lo, hi = 0, make_plan(spec, None, 0, 64, 1, 1).predicted_peak
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        try:
            make_plan(spec, mid, 0, 64, 1, 1, buffered_reads=False)
            hi = mid
        except MemoryBudgetError:
            lo = mid
    return hi


def _run(path, budget, io_mode="auto"):
    m = PipelineModel.from_pretrained(path, memory_limit=budget, ctx=64, prefetch_depth=1, io_mode=io_mode)
    try:
        logits = m.logits(PROMPT)
        tokens = [r for r in m.stream(PROMPT, max_tokens=4, ignore_eos=True)][-1].token_ids
        return m.plan, logits, tokens, m.stats.get("bytes_read", 0), m.engine
    finally:
        m.close()


@pytest.mark.parametrize("type_name", TYPES)
def test_resident_streamed_and_partial_runs_are_bit_identical(type_name, hf_folder, tmp_path, monkeypatch):
    from pipeload.convert import convert

    path = tmp_path / f"{type_name}.gguf"
    convert(hf_folder, path, types=lambda name, shape: type_name if len(shape) == 2 else "F32")
    monkeypatch.setattr("pipeload.runtime.memory.current_rss", lambda: 0)  # plans depend on the file alone
    spec = open_model(path)
    smallest = _smallest_budget(spec)
    full = make_plan(spec, None, 0, 64, 1, 1).predicted_peak

    plan_r, logits_r, tokens_r, _, engine = _run(path, None)
    weights = [m.weight for b in engine.executor.layers.blocks.values() for m in b.modules() if isinstance(m, Linear)]
    assert engine.dtype == torch.float32  # the default activations, on the stored blocks
    assert {w.qtype for w in weights} == {T[type_name]}  # computed on the stored type, not a re-encoding
    stored = spec.index.tensor("blk.0.attn_q.weight").info.nbytes
    assert engine.executor.layers.blocks[0].attn_q.weight.nbytes == stored  # the file's bytes, no more

    plan_s, logits_s, tokens_s, read_s, _ = _run(path, smallest, "direct")
    assert plan_s.resident == [] and len(plan_s.streamed) == spec.args.n_layers + 1
    assert read_s >= plan_s.streamed_bytes  # really read from the file
    # O_DIRECT: no page cache of reads in flight, so a model this small has budgets between
    # everything streamed and everything resident that hold some layers and stream the rest
    plan_p, logits_p, tokens_p, _, _ = _run(path, (smallest + full) // 2, "direct")
    assert plan_p.resident and plan_p.streamed

    assert torch.equal(logits_s, logits_r) and torch.equal(logits_p, logits_r)
    assert tokens_s == tokens_r == tokens_p
    assert logits_r.std() > 0.01  # not a degenerate comparison
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written beside the model


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])  # safetensors folders; GPT-2's transposed matrices materialize
def test_hf_folders_stream_to_the_resident_bits(kind, tiny, monkeypatch):
    _, folder, _ = tiny(kind)
    monkeypatch.setattr("pipeload.runtime.memory.current_rss", lambda: 0)
    spec = open_model(folder)
    smallest = _smallest_budget(spec)
    _, logits_r, tokens_r, _, _ = _run(folder, None)
    plan, logits_s, tokens_s, read, _ = _run(folder, smallest, "direct")
    assert plan.resident == [] and read >= plan.streamed_bytes
    assert torch.equal(logits_s, logits_r) and tokens_s == tokens_r
    if kind == "gpt2":
        assert plan.transient_bytes > 0 and "materialized" in plan.table()
