"""Streaming under a memory budget: same tokens as resident, peak RSS under the budget, every byte planned."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from pipeload import PipelineModel
from pipeload.bench.cgroup import available as cgroup_available
from pipeload.bench.synth import LlamaShape, write_synthetic_gguf
from pipeload.errors import MemoryBudgetError
from pipeload.runtime.memory import current_rss, parse_size
from pipeload.runtime.planner import make_plan

MID = LlamaShape(dim=512, n_layers=12, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab=2048, context=512)
PROMPT = [7, 100, 33, 1500, 2, 9, 64, 812, 5, 5, 77]


@pytest.fixture(scope="module")
def mid(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    path = write_synthetic_gguf(root / "mid.gguf", MID, "q4_k_m", seed=1)
    resident = PipelineModel.from_pretrained(path)
    reference = [r for r in resident.stream(PROMPT, max_tokens=10)][-1].token_ids
    return path, root, resident, reference


def _weights_and_full_peak(model_path, depth=1, batch=1):
    """(weight bytes, the all-resident peak plus what streaming any group adds besides the ring:
    the page cache of buffered reads in flight)."""
    from pipeload.runtime.planner import read_cache_bytes
    from pipeload.runtime.spec import open_model

    spec = open_model(model_path)
    full = make_plan(spec, None, current_rss(), spec.args.context_length, batch, depth)
    largest = max(full.group_bytes.values())
    return sum(full.group_bytes.values()), full.predicted_peak + read_cache_bytes(largest, depth)


@pytest.mark.parametrize("streamed_fraction,io_mode", [(0.5, "direct"), (0.8, "buffered"), (0.8, "direct")])
def test_streamed_equals_resident(mid, streamed_fraction, io_mode):
    path, folder, resident, reference = mid
    weights, full = _weights_and_full_peak(path)
    m = PipelineModel.from_pretrained(path, memory_limit=full - int(streamed_fraction * weights), prefetch_depth=1,
                                      io_mode=io_mode)
    try:
        assert m.plan.streamed, "the budget should force streaming"
        assert m.plan.resident if streamed_fraction < 0.7 else True
        out = [r for r in m.stream(PROMPT, max_tokens=10)][-1].token_ids
        assert out == reference
        assert torch.equal(m.logits(PROMPT), resident.logits(PROMPT))  # the same bits
        per_pass = m.plan.streamed_bytes
        assert m.stats["bytes_read"] >= 10 * per_pass * 0.9  # every token re-read the streamed groups
    finally:
        m.close()
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # nothing written beside the model


def test_streamed_batch_equals_resident(mid):
    path, folder, resident, _ = mid
    prompts = [PROMPT, PROMPT[:4], [3, 1, 4, 1, 5, 9, 2, 6]]
    weights, full = _weights_and_full_peak(path, batch=3)
    m = PipelineModel.from_pretrained(path, memory_limit=full - int(0.7 * weights), prefetch_depth=1,
                                      batch_size=3)
    try:
        streamed = {r.sequence: r.token_ids for r in m.stream(prompts, max_tokens=6)}
        alone = {r.sequence: r.token_ids for r in resident.stream(prompts, max_tokens=6)}
        assert streamed == alone
        with pytest.raises(ValueError, match="batch of 3"):
            list(m.stream(prompts + [PROMPT], max_tokens=2))
    finally:
        m.close()


def test_budget_too_small_names_the_smallest_that_works(mid):
    path, folder, _, reference = mid
    with pytest.raises(MemoryBudgetError, match="give at least") as err:
        PipelineModel.from_pretrained(path, memory_limit="100MB")
    smallest = re.search(r"give at least ([0-9.]+ [KMG]B)", str(err.value)).group(1)
    m = PipelineModel.from_pretrained(path, memory_limit=parse_size(smallest.replace(" ", "")) + (1 << 20))
    try:
        assert len(m.plan.streamed) >= len(m.plan.group_bytes) - 5  # near the minimum, (almost) all streams
        assert [r for r in m.stream(PROMPT, max_tokens=10)][-1].token_ids == reference
    finally:
        m.close()


def test_plan_explains_every_byte(mid):
    path, folder, _, _ = mid
    weights, full = _weights_and_full_peak(path)
    m = PipelineModel.from_pretrained(path, memory_limit=full - weights // 2)
    try:
        plan = m.plan
        assert sum(n for _, n in plan.rows()) == plan.predicted_peak
        for what, n in plan.rows():
            assert n >= 0 and what in plan.table()
        assert sorted(plan.resident + plan.streamed) == sorted(plan.group_bytes)  # each group exactly once
        assert plan.predicted_peak <= parse_size(m.options["memory_limit"])
    finally:
        m.close()


def test_long_prompt_goes_through_each_layer_in_chunks(tiny):
    """A prompt longer than the prefill chunk still makes one pass: chunked per layer, same logits."""
    from pipeload.runtime.engine import load_engine

    eng = load_engine(tiny("llama3")[2])
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(40)[None]
    whole = eng.executor.forward(ids, pos, eng.new_cache(1, 40))
    eng.executor.prefill_chunk = 7
    calls = []
    real = eng.executor.layers.acquire
    eng.executor.layers.acquire = lambda i: calls.append(i) or real(i)
    chunked = eng.executor.forward(ids, pos, eng.new_cache(1, 40))
    assert calls == list(range(eng.args.n_layers))  # each layer fetched once for the whole prompt
    assert (chunked - whole).abs().max().item() < 1e-4


_CHILD = textwrap.dedent("""
    import json, sys
    import pipeload
    from pipeload import PipelineModel
    from pipeload.runtime.memory import peak_rss
    path, limit, io_mode = sys.argv[1], sys.argv[2], (sys.argv[3:] or ["auto"])[0]
    m = PipelineModel.from_pretrained(path, memory_limit=None if limit == "none" else int(limit), ctx=256,
                                      io_mode=io_mode)
    out = [r for r in m.stream(list(range(3, 7)), max_tokens=3)][-1].token_ids
    plan = m.plan
    print(json.dumps({"tokens": out, "peak": peak_rss(),
                      "streamed": len(plan.streamed) if plan else 0,
                      "predicted": plan.predicted_peak if plan else 0}))
""")


def _child(*args):
    done = subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


BIG_BUDGET = 520 * 10**6


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A model more than three times BIG_BUDGET, and its fully resident run. (F16 weights: the
    fewest values per byte, so the portable products of quant/ops.py keep these tests short.)"""
    root = tmp_path_factory.mktemp("big")
    path = write_synthetic_gguf(root / "big.gguf", LlamaShape(1024, 72, 16, 4, 2816, 4096, 512), "f16")
    return path, _child(path, 100 * 10**9)  # a budget that holds everything: all layers resident


def test_model_three_times_the_budget_runs_under_it(big):
    """Peak RSS (VmHWM) of a generation with memory_limit=X stays at most X, for a model more than
    three times X, and the tokens equal the fully resident run's."""
    budget, (path, resident) = BIG_BUDGET, big
    tmp_path = path.parent
    assert path.stat().st_size > 3 * budget
    streamed = _child(path, budget)
    assert streamed["streamed"] > 40
    assert streamed["peak"] <= budget, f"peak RSS {streamed['peak']} > budget {budget}"
    assert streamed["predicted"] <= budget
    assert streamed["tokens"] == resident["tokens"]
    assert resident["streamed"] == 0
    assert resident["peak"] > 3 * budget  # the resident run really needed the memory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf"]  # nothing written beside the model


@pytest.mark.skipif(not cgroup_available(), reason="needs writable cgroup-v1 memory (/sys/fs/cgroup/memory, root): "
                    "only a memory cgroup charges a process for the page cache of its reads")
@pytest.mark.parametrize("io_mode", ["buffered", "direct"])
def test_budget_holds_in_a_memory_cgroup_of_its_size(big, io_mode):
    """Everything the kernel charges to the process, its memory and the page cache of what it
    reads, stays under memory_limit: run in a memory cgroup of exactly the budget, the model more
    than three times it, the generation finishes (no OOM kill), the group's peak charge is at most
    the budget, and the tokens equal the resident run's."""
    from pipeload.bench.cgroup import run_in_cgroup
    from pipeload.bench.against_mmap import drop_page_cache

    path, resident = big
    drop_page_cache()  # what the fixture's resident run left cached is charged to no one here
    run = run_in_cgroup(_CHILD, [path, BIG_BUDGET, io_mode], BIG_BUDGET, timeout=900)
    assert not run.oom_killed, f"OOM-killed in a {BIG_BUDGET} B cgroup: {run.stderr[-1500:]}"
    assert run.result is not None, run.stderr[-2000:]
    assert run.result["streamed"] > 40
    assert run.max_usage <= BIG_BUDGET
    assert run.result["tokens"] == resident["tokens"]
    print(f"{io_mode}: cgroup peak {run.max_usage / 1e6:.0f} MB of {BIG_BUDGET / 1e6:.0f}, limit reached "
          f"{run.limit_hits} times, VmHWM {run.result['peak'] / 1e6:.0f} MB")


def test_a_budget_sizes_the_context_when_none_is_given(mid):
    """No ctx and a budget the model's whole context does not fit beside the weights: the budget
    sizes the KV cache (said in the plan), the text is the resident run's, and a prompt past
    that context is refused naming ctx."""
    from pipeload.errors import ContextLengthError
    from pipeload.runtime.planner import KV_SHARE

    from pipeload.runtime.spec import open_model

    long = LlamaShape(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, vocab=4096, context=8192)
    path = write_synthetic_gguf(mid[1] / "long-context.gguf", long, "q8_0", seed=2)
    resident = PipelineModel.from_pretrained(path)
    reference = [r for r in resident.stream(PROMPT, max_tokens=10)][-1].token_ids
    # a budget that holds everything at 4096 positions but not at the model's 8192
    budget = make_plan(open_model(path), None, current_rss(), 4096, 1, 1).predicted_peak + (8 << 20)
    m = PipelineModel.from_pretrained(path, memory_limit=budget)
    try:
        plan = m.plan
        assert plan.context < long.context and m.engine.context == plan.context
        assert plan.kv_cache_bytes <= KV_SHARE * plan.budget
        assert any(f"context {plan.context} positions" in n and "sized to the budget" in n for n in plan.notes)
        assert [r for r in m.stream(PROMPT, max_tokens=10)][-1].token_ids == reference
        with pytest.raises(ContextLengthError, match="larger ctx"):
            m.generate(list(range(3, 3 + plan.context)), max_tokens=1)
    finally:
        m.close()
    asked = PipelineModel.from_pretrained(path, memory_limit=budget, ctx=64)
    try:
        assert asked.plan.context == 64 and not any("sized to the budget" in n for n in asked.plan.notes)
    finally:
        asked.close()


def test_a_model_too_big_for_the_memory_available_streams_under_auto(mid, monkeypatch):
    """memory_limit="auto" is what is available less a margin; a model given no budget that does
    not fit in it streams under it, with a warning, instead of thrashing."""
    from pipeload.runtime import memory

    path, _, _, reference = mid
    assert parse_size("auto") == memory.auto_budget() or abs(parse_size("auto") - memory.auto_budget()) < 64 << 20
    assert 0 < memory.auto_budget() <= memory.current_rss() + memory.available_memory()
    weights, full = _weights_and_full_peak(path)
    monkeypatch.setattr(memory, "auto_budget", lambda: full - weights // 2)
    with pytest.warns(UserWarning, match="memory_limit='auto'"):
        m = PipelineModel.from_pretrained(path)
    try:
        assert m.plan is not None and m.plan.streamed and m.plan.predicted_peak <= full - weights // 2
        assert [r for r in m.stream(PROMPT, max_tokens=10)][-1].token_ids == reference
    finally:
        m.close()
