"""Markdown tables and plots for ``shortcuts.lab.sweep`` results."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cost_table(r: dict[str, Any]) -> list[str]:
    block = r["cost_ms"]["block"]
    lines = ["| per token | ms | blocks |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {v / block:.2f} |" for k, v in r["cost_ms"].items()]
    return lines


def _quality_table(r: dict[str, Any]) -> list[str]:
    names = list(r["quality"])
    head = "| threshold | " + " | ".join(f"{n}: agreement (95% LB) / mean exit" for n in names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    for i, row in enumerate(r["quality"][names[0]]["rows"]):
        cells = [f"{q['rows'][i]['agreement']:.3f} ({q['rows'][i]['lower_bound']:.3f}) / "
                 f"{q['rows'][i]['mean_exit_layer']:.1f}" for q in r["quality"].values()]
        lines.append(f"| {row['threshold']} | " + " | ".join(cells) + " |")
    return lines


def _oracle_table(r: dict[str, Any]) -> list[str]:
    L = r["num_layers"]
    lines = [f"| exit head | perfect gate: mean depth / {L} (speed-up) | stable oracle: mean depth (speed-up) | "
             "lowest mean exit with 95% LB >= 0.95 (checks free; not `onejump calibrate`): gate, threshold, "
             "agreement (LB), mean exit |", "|---|---|---|---|"]
    for name, q in r["quality"].items():
        o, c = q["oracle"], q["calibrated"]["0.95"]
        lines.append(f"| {name} | {o['first_hit']['mean']:.1f} ({o['first_hit']['speedup']:.2f}x) | "
                     f"{o['stable']['mean']:.1f} ({o['stable']['speedup']:.2f}x) | {c['gate']} {c['threshold']}, "
                     f"{c['agreement']:.3f} ({c['lower_bound']:.3f}), {c['mean_exit_layer']:.1f} |")
    return lines


def _speed_table(r: dict[str, Any]) -> list[str]:
    lines = ["| decoding | tok/s | vs our full depth | vs HF generate | mean exit layer | same token as full "
             "depth (free-running) | drafts accepted |", "|---|---|---|---|---|---|---|"]
    for name, s in r["speed"].items():
        lines.append(f"| {name} | {s['tok_s']:.1f} | {s['vs_off']:.2f} | {s['vs_hf']:.2f} | "
                     f"{_f(s['mean_exit_layer'], 1)} | {s['free_running_same']:.2f} | {_f(s['acceptance'])} |")
    return lines


def _drift_table(r: dict[str, Any]) -> list[str]:
    lines = ["| KV policy | agreement by quarter of the output | overall | mean exit layer | tok/s |",
             "|---|---|---|---|---|"]
    for name, d in r["drift"].items():
        quarters = " / ".join(f"{a:.3f}" for a in d["agreement_by_quarter"])
        lines.append(f"| {name} | {quarters} | {d['agreement']:.3f} | {d['mean_exit_layer']:.1f} | {d['tok_s']:.1f} |")
    return lines


def write_report(r: dict[str, Any], out: Path) -> None:
    a = r["args"]
    md = [f"# Early-exit sweep: {Path(r['model']).name}", "",
          f"Jumps: `{a['jumps']}`. {a['prompts']} held-out prompts x {a['new_tokens']} new tokens; exits checked "
          f"from level {a['min_layer']} (stride {a['stride']}); {r['seconds'] / 60:.1f} min.", "",
          "## Cost model", "", *_cost_table(r), ""]
    if "quality" in r:
        md += ["## Agreement with the full model (teacher-forced, confidence gate)", "", *_quality_table(r), "",
               "## Ceiling and calibration", "", *_oracle_table(r), ""]
    if "speed" in r:
        md += [f"## Speed ({a['speed_prompts']} prompts, arms interleaved)", "", *_speed_table(r), ""]
    if "drift" in r:
        md += [f"## KV policy on long outputs ({a['drift_prompts']} prompts x {a['drift_tokens']} tokens, "
               f"threshold {a['drift_threshold']}, teacher-forced)", "", *_drift_table(r), ""]
    (out / "report.md").write_text("\n".join(md))
    if "quality" in r and "speed" in r:
        plot(r, out)


def plot(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _plot_speedup(r, out, plt)
    _plot_thresholds(r, out, plt)
    _plot_histograms(r, out, plt)


def _plot_speedup(r: dict[str, Any], out: Path, plt: Any) -> None:
    primary = next(iter(r["quality"].values()))
    agreement = {row["threshold"]: row["agreement"] for row in primary["rows"]}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, s in r["speed"].items():
        mode, _, t = name.partition(" t=")
        if mode == "approximate" and float(t) in agreement:
            x = agreement[float(t)]
        elif mode in ("exact", "off", "HF generate"):
            x = 1.0
        else:
            continue
        ax.scatter(x, s["vs_off"], marker={"approximate": "o", "exact": "s"}.get(mode, "D"))
        ax.annotate(name, (x, s["vs_off"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ceiling = primary["oracle"]["first_hit"]["speedup"]
    ax.scatter(1.0, ceiling, marker="*", s=120, color="k")
    ax.annotate("perfect gate (layers only)", (1.0, ceiling), fontsize=7, xytext=(-110, 0), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set(xlabel="greedy-token agreement with the full model (teacher-forced)",
           ylabel="tok/s relative to our full-depth path", title=f"{Path(r['model']).name}: speed vs agreement")
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_agreement.png", dpi=120)
    plt.close(fig)


def _plot_thresholds(r: dict[str, Any], out: Path, plt: Any) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, q in r["quality"].items():
        th = [row["threshold"] for row in q["rows"]]
        line = a1.plot(th, [row["agreement"] for row in q["rows"]], marker="o", label=name)[0]
        a2.plot(th, [row["mean_exit_layer"] for row in q["rows"]], marker="o", color=line.get_color(), label=name)
        a2.axhline(q["oracle"]["first_hit"]["mean"], color=line.get_color(), ls=":", lw=1)
    a1.set(xlabel="confidence threshold", ylabel="agreement with the full model", title="agreement")
    a2.set(xlabel="confidence threshold", ylabel="mean exit layer", title="depth (dotted: perfect gate)")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "thresholds.png", dpi=120)
    plt.close(fig)


def _plot_histograms(r: dict[str, Any], out: Path, plt: Any) -> None:
    primary = next(iter(r["quality"].values()))
    L = r["num_layers"]
    rows = [row for row in primary["rows"] if row["threshold"] in (0.5, 0.7, 0.9)] or primary["rows"][:3]
    series = [(f"threshold {row['threshold']}", row["histogram"]) for row in rows]
    series += [("perfect gate", primary["oracle"]["first_hit"]["histogram"]),
               ("stable oracle", primary["oracle"]["stable"]["histogram"])]
    fig, axes = plt.subplots(len(series), 1, figsize=(7, 1.6 * len(series)), sharex=True)
    for ax, (name, hist) in zip(axes, series, strict=True):
        ax.bar(range(1, L + 1), hist)
        ax.set_ylabel(name, fontsize=8)
    axes[-1].set_xlabel("exit layer (L = full depth)")
    fig.suptitle(f"{Path(r['model']).name}: exit layer per token")
    fig.tight_layout()
    fig.savefig(out / "exit_histograms.png", dpi=120)
    plt.close(fig)
