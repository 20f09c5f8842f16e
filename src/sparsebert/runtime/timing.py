"""Wall-clock timing of competing paths, and the name of the machine the figures belong to.

A leaf module: ``predict`` (``--engine auto``), the ONNX export's report and the benchmark all time
callables the same way, and none of them should have to import another's module for it (the benchmark
pulls in the pruner and matplotlib). It needs only the processor's name from ``runtime.kernels``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

from sparsebert.runtime.build import cpu_info


def median_ms(fns: list[Callable[[], object]], warmup: int, reps: int, budget_s: float) -> list[float]:
    """Interleaved timing of several callables; fewer reps when one call is slow (but at least 3).

    The order turns by one each round: a path that always ran right after ONNX Runtime read 5-15% slow
    (same kernels, BENCHMARKS.md, "Runtime", section 9), as if the other's threads still held the cores.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for i in range(reps):
        for j in range(len(fns)):
            k = (i + j) % len(fns)
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(1000.0 * (time.perf_counter() - t0))
        if i >= 2 and time.perf_counter() - start > budget_s:
            break
    return [statistics.median(t) for t in times]


def machine() -> str:
    """The processor's model name, as BENCHMARKS.md must name it beside every figure."""
    return cpu_info().get("model name") or platform.processor() or platform.machine()
