"""A budget under which a model streams some of its layers, found over real loads.

A plan is made from the process's RSS at load, which moves by MBs between a test's own reckoning
and the load in a long session (allocator caches, earlier tests' models): a budget computed
halfway between two plans can fall on either side. These tests need a plan that streams, so the
budget is bisected over loads: lowered when the plan is all resident, raised when refused."""

from pipeload.errors import MemoryBudgetError


def load_streaming(load, lo: int, hi: int, tries: int = 16):
    """load(budget) -> a PipelineModel; the first whose plan streams layers, budgets bisected in
    [lo, hi] bytes. Fails naming the range when none does."""
    for _ in range(tries):
        budget = (lo + hi) // 2
        try:
            m = load(budget)
        except MemoryBudgetError:
            lo = budget
            continue
        if m.plan.streamed:
            return m
        m.close()
        hi = budget
    raise AssertionError(f"no budget between {lo} and {hi} bytes made a plan that streams layers")
