"""Shared measurement for the memory tests: the peak of live CPU allocations torch.profiler records."""

from __future__ import annotations


def profiled_peak_bytes(step) -> int:
    """Peak of live CPU allocations during one call of `step()`, from torch.profiler's [memory] events: the sum
    of allocations minus frees, in time order, at its highest (what tests pin budget terms and the tensor tracker
    against)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak
