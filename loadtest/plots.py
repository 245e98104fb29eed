"""The PNGs: latency against load, tokens/s against the threshold, and the exit-depth histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

LOOP_AXIS = {"closed": "concurrent clients (closed loop)", "open": "arrival rate, req/s (open loop)"}


def _arm_labels(summary: dict[str, Any]) -> list[str]:
    return list(summary["config"]["arms"])


def _series(points: list[dict[str, Any]], arm: str, metric: str, q: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for p in points:
        a = next(a for a in p["arms"] if a["arm"] == arm)
        if a[metric][q] is not None:
            xs.append(p["load"])
            ys.append(a[metric][q])
    return xs, ys


def _latency_panel(ax: Axes, points: list[dict[str, Any]], arms: list[str], metric: str, title: str) -> None:
    single = len({p["load"] for p in points}) == 1  # one load value: spread the arms apart to see them
    for i, arm in enumerate(arms):
        color, shift = f"C{i}", 1 + 0.03 * (i - (len(arms) - 1) / 2) if single else 1.0
        for q, style in (("p50", "-o"), ("p99", "--^")):
            xs, ys = _series(points, arm, metric, q)
            ax.plot([x * shift for x in xs], ys, style, color=color, label=f"{arm} {q}", markersize=5)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3)


def latency_vs_load(summary: dict[str, Any], path: Path) -> None:
    loops = [loop for loop in ("closed", "open") if any(p["loop"] == loop for p in summary["load_points"])]
    fig, axes = plt.subplots(2, len(loops), figsize=(6.5 * len(loops), 7.5), squeeze=False)
    for col, loop in enumerate(loops):
        points = [p for p in summary["load_points"] if p["loop"] == loop]
        _latency_panel(axes[0][col], points, _arm_labels(summary), "e2e_s", "end-to-end latency")
        _latency_panel(axes[1][col], points, _arm_labels(summary), "ttft_s", "time to first token")
        for ax in axes[:, col]:
            ax.set_xlabel(LOOP_AXIS[loop])
            ax.set_xticks(sorted({p["load"] for p in points}))
    axes[0][0].legend(fontsize=8, ncol=2, loc="best")
    fig.suptitle("Latency against load (solid: p50, dashed: p99)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _offsets(n_groups: int, n_items: int) -> tuple[list[list[float]], float]:
    width = 0.8 / max(n_groups, 1)
    return [[i + (j - (n_groups - 1) / 2) * width for i in range(n_items)] for j in range(n_groups)], width


def _speed_panel(ax: Axes, summary: dict[str, Any]) -> None:
    arms, points = _arm_labels(summary), summary["load_points"]
    xs, width = _offsets(len(points), len(arms))
    for j, p in enumerate(points):
        values = {a["arm"]: a for a in p["arms"]}
        bars = ax.bar(xs[j], [values[arm]["decode_tokens_per_s"] or 0.0 for arm in arms], width * 0.95,
                      label=p["label"], color=f"C{j}")
        speedups = [values[arm]["speedup_vs_off"] for arm in arms]
        ax.bar_label(bars, [f"{s:.2f}×" if s else "" for s in speedups], fontsize=7, padding=2)
    ax.set_xticks(range(len(arms)), arms, rotation=15 if len(arms) > 4 else 0)
    ax.set_ylabel("decode tokens/s per stream")
    ax.set_title("Decoding speed by arm (labels: speed-up vs off)", fontsize=10)
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)


def _depth_panel(ax: Axes, summary: dict[str, Any]) -> None:
    arms, points = _arm_labels(summary), summary["load_points"]
    xs, _ = _offsets(len(points), len(arms))
    for j, p in enumerate(points):
        values = {a["arm"]: a["mean_exit_layer"] for a in p["arms"]}
        pairs = [(x, values[arm]) for x, arm in zip(xs[j], arms, strict=True) if values[arm] is not None]
        ax.plot([x for x, _ in pairs], [y for _, y in pairs], "o", color=f"C{j}", markersize=7)
    layers = summary["server"]["num_layers"]
    if layers:
        ax.axhline(layers, color="grey", linestyle=":", linewidth=1, label=f"all {layers} layers")
        ax.legend(fontsize=8, loc="lower left")
    ax.set_xticks(range(len(arms)), arms, rotation=15 if len(arms) > 4 else 0)
    ax.set_ylabel("mean exit layer (from the responses)")
    ax.set_title("Mean exit depth by arm", fontsize=10)
    ax.grid(axis="y", alpha=0.3)


def tokens_vs_threshold(summary: dict[str, Any], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    _speed_panel(left, summary)
    _depth_panel(right, summary)
    handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.suptitle("Tokens/s against the exit threshold (arms are mode@threshold)")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _arm_hists(summary: dict[str, Any]) -> dict[str, dict[int, int]]:
    hists: dict[str, dict[int, int]] = {arm: {} for arm in _arm_labels(summary)}
    for p in summary["load_points"]:
        for a in p["arms"]:
            for layer, n in a["exit_layer_hist"].items():
                hists[a["arm"]][int(layer)] = hists[a["arm"]].get(int(layer), 0) + n
    return hists


def _layer_axis(ax: Axes, layers: int, log: bool) -> None:
    ax.set_xlim(0.3, layers + 0.7)
    ax.set_xticks(range(1, layers + 1, max(1, layers // 15)))
    if log:  # not with nothing to show: a log axis needs a positive value
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def _int_keys(hist: dict[Any, int] | None) -> dict[int, int] | None:
    return None if hist is None else {int(k): v for k, v in hist.items()}  # summary.json has string keys


def exit_depth(summary: dict[str, Any], path: Path) -> None:
    run = summary["run"]["exit_layer_hist"]
    responses, metrics = _int_keys(run["responses"]) or {}, _int_keys(run["metrics"])
    layers = summary["server"]["num_layers"] or max([*responses, *(metrics or {}), 1])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    arms = _arm_hists(summary)
    xs, width = _offsets(len(arms), layers)
    for j, (arm, hist) in enumerate(arms.items()):
        total = sum(hist.values()) or 1
        left.bar([x + 1 for x in xs[j]], [hist.get(k, 0) / total for k in range(1, layers + 1)], width,
                 color=f"C{j}", label=arm)
    left.set(title="From the responses, per arm", xlabel="exit layer", ylabel="share of the arm's tokens (log)")
    left.legend(fontsize=8, loc="upper left")
    if metrics is not None:
        right.bar(list(metrics), list(metrics.values()), 0.8, color="C7", label="/metrics (difference of scrapes)")
    right.plot(list(responses), list(responses.values()), "o", color="C3", markersize=5, label="responses")
    check = summary["run"]["metrics_check"]
    right.set(title=f"All arms: /metrics vs responses ({check['check']})", xlabel="exit layer",
              ylabel="tokens (log)")
    right.legend(fontsize=8, loc="upper left")
    _layer_axis(left, layers, log=bool(responses))
    _layer_axis(right, layers, log=bool(responses or metrics))
    fig.suptitle("Exit-depth distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out_dir: Path, summary: dict[str, Any]) -> None:
    latency_vs_load(summary, out_dir / "latency_vs_load.png")
    tokens_vs_threshold(summary, out_dir / "tokens_vs_threshold.png")
    exit_depth(summary, out_dir / "exit_depth.png")
