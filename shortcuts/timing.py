"""Timing helpers for benchmarks: arms interleaved prompt by prompt, and the median of repeats.
Timing never goes in a test assertion; these feed the benches and exact mode's timed calibration."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

Arm = Callable[[list[int]], list[int]]  # a prompt's ids -> the generated tokens
U = TypeVar("U")


def time_arms(arms: dict[str, Callable[[U], Any]], prompts: Sequence[U],
              failed: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Seconds and outputs per arm, arms interleaved prompt by prompt (or batch by batch: a unit is what an
    arm takes) with the order rotating (so a noisy neighbour hits every arm alike), after one warm-up unit.
    With ``failed``, an arm whose warm-up raises is left out and its error recorded there (a bench then
    reports the other arms); without it the error propagates."""
    names = []
    for name, arm in arms.items():
        try:
            arm(prompts[0])
        except Exception as e:
            if failed is None:
                raise
            failed[name] = f"{type(e).__name__}: {e}"
            continue
        names.append(name)
    out: dict[str, dict[str, Any]] = {n: {"seconds": 0.0, "tokens": []} for n in names}
    for k, ids in enumerate(tqdm(prompts, desc="bench", unit="prompt")):
        for name in names[k % len(names):] + names[: k % len(names)]:
            gc.collect()  # no arm pays for the garbage another left (Hugging Face's generate leaves plenty)
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
