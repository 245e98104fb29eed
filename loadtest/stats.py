"""From records to numbers: per-arm and per-load-point summaries, /metrics differences, the consistency check."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from loadtest.client import Scrape
from loadtest.records import Arm, Record
from loadtest.run import PointResult

QUANTILES = (50, 90, 99)


def percentiles(xs: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99 (linear interpolation) and the mean; None for no data."""
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    values = np.percentile(np.asarray(xs, dtype=float), QUANTILES)
    return {**{f"p{q}": float(v) for q, v in zip(QUANTILES, values, strict=True)}, "mean": float(np.mean(xs))}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def error_counts(records: Iterable[Record]) -> dict[str, int]:
    """Failed requests by HTTP status ("429", "504", ...) or by what went wrong without one."""
    counts = Counter(str(r.status) if r.outcome == "http_error" else r.outcome for r in records if r.failed)
    return dict(sorted(counts.items()))


def exit_histogram(records: Iterable[Record]) -> dict[int, int]:
    """Tokens per exit layer, from the responses' ``early_exit.exit_layers``."""
    return dict(sorted(Counter(layer for r in records if r.ok for layer in r.exit_layers).items()))


def mean_layer(hist: dict[int, int]) -> float | None:
    total = sum(hist.values())
    return sum(layer * n for layer, n in hist.items()) / total if total else None


def _throughput(ok: Sequence[Record], wall: float) -> dict[str, float | None]:
    tokens = sum(r.tokens for r in ok)
    decode_time = sum((r.e2e or 0.0) - (r.ttft or 0.0) for r in ok)
    return {"tokens": tokens,
            "tokens_per_s": _ratio(tokens, wall),
            "requests_per_s": _ratio(len(ok), wall),
            "stream_tokens_per_s": _ratio(tokens, sum(r.e2e or 0.0 for r in ok)),
            "decode_tokens_per_s": _ratio(sum(max(r.tokens - 1, 0) for r in ok), decode_time)}


def _latencies(ok: Sequence[Record]) -> dict[str, dict[str, float | None]]:
    return {"ttft_s": percentiles([r.ttft for r in ok if r.ttft is not None]),
            "itl_s": percentiles([x for r in ok for x in r.itl]),
            "e2e_s": percentiles([r.e2e for r in ok if r.e2e is not None])}


def arm_summary(arm: Arm, records: Sequence[Record], wall: float) -> dict[str, Any]:
    mine = [r for r in records if r.arm == arm.label]
    ok = [r for r in mine if r.ok]
    hist = exit_histogram(ok)
    return {"arm": arm.label, "mode": arm.mode, "threshold": arm.threshold, "gate": arm.gate,
            "issued": len(mine), "requests": len(ok), "errors": sum(r.failed for r in mine),
            "errors_by_status": error_counts(mine), "cancelled": sum(r.outcome == "cancelled" for r in mine),
            **_throughput(ok, wall), **_latencies(ok),
            "mean_exit_layer": mean_layer(hist), "exit_layer_hist": hist,
            "num_layers": next((r.num_layers for r in ok if r.num_layers), None)}


def add_speedups(arms: list[dict[str, Any]]) -> None:
    """``speedup_vs_off``: decode tokens/s over the off arm's at the same load point (None without one)."""
    off = next((a["decode_tokens_per_s"] for a in arms if a["mode"] == "off"), None)
    for a in arms:
        rate = a["decode_tokens_per_s"]
        a["speedup_vs_off"] = rate / off if off and rate is not None else None


def metrics_histogram(before: Scrape | None, after: Scrape | None) -> dict[int, int] | None:
    """Per-layer token counts between two /metrics reads, from the cumulative ``le`` buckets."""
    if before is None or after is None:
        return None
    hist, below = {}, 0.0
    for le in sorted(after.buckets):
        cumulative = after.buckets[le] - before.buckets.get(le, 0.0)
        if le != float("inf"):
            hist[int(le)] = int(round(cumulative - below))
        elif cumulative > below:
            hist[-1] = int(round(cumulative - below))  # above the last layer: never expected
        below = cumulative
    return {layer: n for layer, n in hist.items() if n}


def consistency(metrics: dict[int, int] | None, responses: dict[int, int], cancelled: int,
                errors: int) -> dict[str, Any]:
    """Does the /metrics exit histogram count exactly the tokens the responses reported, layer by layer?"""
    reported = sum(responses.values())
    if metrics is None:
        return {"check": "unavailable", "metrics_tokens": None, "response_tokens": reported,
                "note": "/metrics could not be read or has no onejump_exit_layer histogram"}
    counted = sum(metrics.values())
    same = counted == reported and metrics == responses
    note = f"the same {counted} tokens at every layer" if same else (
        f"/metrics counts {counted - reported:+d} tokens" + (
            f"; expected: {cancelled} cancelled and {errors} failed requests made tokens no response reported"
            if cancelled or errors else "; another client may be using this server"))
    return {"check": "equal" if same else "differs", "metrics_tokens": counted, "response_tokens": reported,
            "note": note}


def point_summary(result: PointResult, arms: Sequence[Arm], at_deadline: str) -> dict[str, Any]:
    recs, point = result.records, result.point
    ok = [r for r in recs if r.ok]
    per_arm = [arm_summary(arm, recs, result.wall) for arm in arms]
    add_speedups(per_arm)
    responses, metrics = exit_histogram(ok), metrics_histogram(result.before, result.after)
    cancelled = sum(r.outcome == "cancelled" for r in recs)
    return {"loop": point.loop, "load": point.value, "label": point.label, "planned": result.planned,
            "issued": len(recs), "requests": len(ok), "errors": sum(r.failed for r in recs),
            "errors_by_status": error_counts(recs), "cancelled": cancelled, "stopped_by": result.stopped_by,
            "in_flight_at_deadline": result.in_flight_at_deadline, "at_deadline": at_deadline,
            "wall_s": result.wall, **_throughput(ok, result.wall), **_latencies(ok),
            "exit_layer_hist": {"responses": responses, "metrics": metrics},
            "metrics_check": consistency(metrics, responses, cancelled, sum(r.failed for r in recs)),
            "arms": per_arm}


def _sum_hists(hists: Iterable[dict[int, int] | None]) -> dict[int, int] | None:
    total: Counter[int] = Counter()
    for h in hists:
        if h is None:
            return None
        total.update(h)
    return dict(sorted(total.items()))


def run_summary(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole run: totals, and the /metrics histogram (all arms together) against the responses'."""
    responses = _sum_hists(p["exit_layer_hist"]["responses"] for p in points) or {}
    metrics = _sum_hists(p["exit_layer_hist"]["metrics"] for p in points)
    cancelled, errors = sum(p["cancelled"] for p in points), sum(p["errors"] for p in points)
    return {"issued": sum(p["issued"] for p in points), "requests": sum(p["requests"] for p in points),
            "errors": errors, "cancelled": cancelled, "tokens": sum(p["tokens"] for p in points),
            "wall_s": sum(p["wall_s"] for p in points),
            "exit_layer_hist": {"responses": responses, "metrics": metrics},
            "metrics_check": consistency(metrics, responses, cancelled, errors)}
