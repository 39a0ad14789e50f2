"""Peak bytes allocated on the CPU while a function runs, from torch's profiler.

The process RSS (``ru_maxrss``) cannot show activation memory: it is a high-water mark over the
whole process (imports, earlier tests) and the allocator keeps freed pages. The profiler with
``profile_memory`` records every CPU tensor allocation and free (size, +/- bytes, time): the running
sum over them, in time order, is the live tensor memory, and its maximum is the peak above what was
live when the function started (model weights that already exist are not counted).
"""

from __future__ import annotations

from typing import Callable


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most tensor bytes allocated and not yet freed at any moment of ``fn()``, on the CPU."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []  # (time, +bytes allocated / -bytes freed)
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        if event.tag == _EventType.Allocation:
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
        pending.extend(event.children)
    live = peak = 0
    for _, size in sorted(changes):
        live += size
        peak = max(peak, live)
    return peak
