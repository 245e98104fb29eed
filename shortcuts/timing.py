"""Timing helpers for benchmarks: arms interleaved prompt by prompt, and the median of repeats.
Timing never goes in a test assertion; these feed the benches and exact mode's timed calibration."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

Arm = Callable[[list[int]], list[int]]  # a prompt's ids -> the generated tokens


def time_arms(arms: dict[str, Arm], prompts: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Seconds and tokens per arm, arms interleaved prompt by prompt with the order rotating (so a noisy
    neighbour hits every arm alike), after one warm-up prompt."""
    names = list(arms)
    for name in names:
        arms[name](prompts[0])
    out: dict[str, dict[str, Any]] = {n: {"seconds": 0.0, "tokens": []} for n in names}
    for k, ids in enumerate(tqdm(prompts, desc="bench", unit="prompt")):
        for name in names[k % len(names):] + names[: k % len(names)]:
            t0 = time.perf_counter()
            tokens = arms[name](ids)
            out[name]["seconds"] += time.perf_counter() - t0
            out[name]["tokens"].append(tokens)
    return out


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
