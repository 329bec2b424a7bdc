"""Side-by-side timing shared by the benchmarks."""
import statistics
from typing import Callable


def interleaved_medians(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each variant's measurement (a call returning seconds).

    Every variant is called once to warm up (allocator, kernels, cuDNN or
    cuBLAS choices), then `repeats` rounds call each in turn, so that a load
    spike on a shared machine hits them alike and the ratios stay fair.
    """
    for measure in variants.values():
        measure()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, measure in variants.items():
            times[name].append(measure())
    return {name: statistics.median(ts) for name, ts in times.items()}
