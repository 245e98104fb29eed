"""The Markdown report and the JSON files of one run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtest.run import PointResult

PLOTS = ("latency_vs_load.png", "tokens_vs_threshold.png", "exit_depth.png")


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 1:
        return str(int(x))
    return f"{x:.{digits}g}"


def _triple(stats: dict[str, float | None], scale: float = 1.0) -> str:
    values = (stats[q] for q in ("p50", "p90", "p99"))
    return " / ".join(fmt(None if v is None else v * scale) for v in values)


def _errors(by_status: dict[str, int]) -> str:
    return ", ".join(f"{n}× {k}" for k, n in by_status.items()) or "0"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def point_table(points: Sequence[dict[str, Any]]) -> list[str]:
    header = ["load", "stopped by", "wall s", "planned", "issued", "ok", "errors", "in flight at deadline",
              "tok/s", "req/s", "/metrics check"]
    rows = [[p["label"], p["stopped_by"], fmt(p["wall_s"]), str(p["planned"]), str(p["issued"]),
             str(p["requests"]), _errors(p["errors_by_status"]),
             f"{p['in_flight_at_deadline']} ({'cancelled' if p['at_deadline'] == 'cancel' else 'awaited'})",
             fmt(p["tokens_per_s"]), fmt(p["requests_per_s"]),
             f"{p['metrics_check']['check']} ({p['metrics_check']['metrics_tokens']} vs "
             f"{p['metrics_check']['response_tokens']})"] for p in points]
    return _table(header, rows)


def arm_table(points: Sequence[dict[str, Any]]) -> list[str]:
    header = ["load", "mode", "threshold", "requests", "errors", "tok/s", "decode tok/s", "req/s",
              "TTFT s p50/p90/p99", "ITL ms p50/p90/p99", "e2e s p50/p90/p99", "mean exit layer", "speed-up vs off"]
    rows = []
    for p in points:
        for a in p["arms"]:
            speedup = "–" if a["speedup_vs_off"] is None else f"{a['speedup_vs_off']:.2f}×"
            rows.append([p["label"], a["mode"], fmt(a["threshold"]) if a["mode"] != "off" else "–",
                         str(a["requests"]), _errors(a["errors_by_status"]), fmt(a["stream_tokens_per_s"]),
                         fmt(a["decode_tokens_per_s"]), fmt(a["requests_per_s"]), _triple(a["ttft_s"]),
                         _triple(a["itl_s"], 1000), _triple(a["e2e_s"]), fmt(a["mean_exit_layer"]), speedup])
    return _table(header, rows)


def exit_table(summary: dict[str, Any]) -> list[str]:
    run = summary["run"]["exit_layer_hist"]
    arms = [a["arm"] for a in summary["load_points"][0]["arms"]] if summary["load_points"] else []
    per_arm: dict[str, dict[int, int]] = {arm: {} for arm in arms}
    for p in summary["load_points"]:
        for a in p["arms"]:
            for layer, n in a["exit_layer_hist"].items():
                per_arm[a["arm"]][layer] = per_arm[a["arm"]].get(layer, 0) + n
    metrics = run["metrics"] or {}
    layers = sorted({*run["responses"], *metrics})
    rows = [[str(layer), *(str(per_arm[arm].get(layer, 0)) for arm in arms), str(run["responses"].get(layer, 0)),
             str(metrics.get(layer, 0)) if run["metrics"] is not None else "–"] for layer in layers]
    return _table(["exit layer", *(f"{arm} (responses)" for arm in arms), "all arms (responses)",
                   "all arms (/metrics)"], rows)


def _header(summary: dict[str, Any]) -> list[str]:
    c = summary["config"]
    arms = ", ".join(c["arms"])
    return ["# Load test report", "", "```bash", summary["command"], "```", "",
            f"Server `{c['url']}`, model `{summary['server']['model']}` "
            f"({summary['server']['num_layers'] or '?'} layers). Arms, interleaved request by request: {arms}. "
            f"{c['requests']} requests per arm and load point, at most {fmt(c['duration_s'])} s per load point "
            f"(requests in flight at the deadline: {'cancelled' if c['at_deadline'] == 'cancel' else 'awaited'}); "
            f"{c['max_tokens']} tokens per request{' (ignore_eos)' if c['ignore_eos'] else ''}; "
            f"prompts from `{c['prompts']}`, seed {c['seed']}. Started {summary['started']}.", ""]


def _check_lines(summary: dict[str, Any]) -> list[str]:
    run = summary["run"]["metrics_check"]
    lines = ["## /metrics against the responses", "",
             f"Whole run: `onejump_exit_layer` counted **{run['metrics_tokens']}** tokens, the responses reported "
             f"**{run['response_tokens']}**: **{run['check']}** ({run['note']}).", ""]
    return lines + [f"- {p['label']}: {p['metrics_check']['check']} ({p['metrics_check']['note']})"
                    for p in summary["load_points"]] + [""]


def markdown(summary: dict[str, Any]) -> str:
    lines = _header(summary) + ["## Load points (all arms)", ""] + point_table(summary["load_points"])
    lines += ["", "## Arms", "", *arm_table(summary["load_points"]), "",
              "tok/s: tokens over the summed e2e time of the arm's requests (what one stream sees, queueing "
              "included). decode tok/s: tokens after the first over the time after the first (the decoding "
              "speed, not skewed by queueing behind other arms); speed-up is this over the off arm's. req/s: "
              "the arm's finished requests over the load point's wall time. TTFT and ITL are measured on the "
              "SSE frames that carry text.", ""]
    lines += _check_lines(summary) + ["## Exit depth (tokens per exit layer)", "", *exit_table(summary), ""]
    lines += ["## Plots", ""] + [f"![{name[:-4]}]({name})" for name in PLOTS] + [""]
    return "\n".join(lines)


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return None if x != x else round(x, 6)
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_outputs(out_dir: Path, summary: dict[str, Any], results: Sequence[PointResult]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=1) + "\n")
    raw = [{"loop": r.point.loop, "load": r.point.value, **asdict(rec)} for r in results for rec in r.records]
    (out_dir / "requests.json").write_text(json.dumps(_clean(raw)) + "\n")
    (out_dir / "report.md").write_text(markdown(summary))
