"""Writes deploy/grafana/dashboards/onejump.json, the provisioned Grafana dashboard, from the metric
names of service/metrics.py, and its copy in the Helm chart (deploy/k8s/onejump/dashboards/onejump.json, which
the chart ships as a ConfigMap). ``python deploy/grafana/dashboard.py`` rewrites both; ``--check`` exits 1 when a
committed file differs (tests/test_deploy.py and tests/test_k8s.py check that; test_deploy runs every query on
Prometheus)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "dashboards" / "onejump.json"
CHART_COPY = Path(__file__).parents[1] / "k8s" / "onejump" / "dashboards" / "onejump.json"
DATASOURCE = {"type": "prometheus", "uid": "onejump-prometheus"}  # provisioning/datasources/prometheus.yml
SEL = '{model_name=~"$model_name"}'
Target = tuple[str, str]  # (legend, PromQL)


def rate(metric: str) -> str:
    return f"rate({metric}{SEL}[$__rate_interval])"


def quantiles(histogram: str) -> list[Target]:
    return [(f"p{round(q * 100)}", f"histogram_quantile({q}, sum by (le) ({rate(histogram + '_bucket')}))")
            for q in (0.5, 0.95, 0.99)]


def panel(title: str, grid: tuple[int, int, int, int], targets: list[Target], unit: str, description: str,
          kind: str = "timeseries", stack: bool = False) -> dict[str, Any]:
    x, y, w, h = grid
    custom: dict[str, Any] = {"fillOpacity": 30, "stacking": {"mode": "normal", "group": "A"}} if stack else {}
    return {
        "type": kind, "title": title, "description": description, "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     "range": True} for i, (legend, expr) in enumerate(targets)],
    }


def exit_heatmap(grid: tuple[int, int, int, int]) -> dict[str, Any]:
    p = panel("Exit layer (tokens per second at each depth)", grid,
              [("{{le}}", f"sum by (le) ({rate('onejump_exit_layer_bucket')})")], "short",
              "onejump_exit_layer: the decoder layer at which each generated token was decided (buckets are "
              "layer indices; the last is full depth).", kind="heatmap")
    p["targets"][0]["format"] = "heatmap"
    p["options"] = {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "decimals": 0},
                    "rowsFrame": {"layout": "auto"}, "color": {"mode": "scheme", "scheme": "Oranges",
                                                               "scale": "exponential", "exponent": 0.5},
                    "tooltip": {"mode": "single", "yHistogram": True}, "legend": {"show": True}}
    return p


def early_exit_panels() -> list[dict[str, Any]]:
    skipped, computed, saved = (f"sum({rate(f'onejump_layers_{k}_total')})" for k in ("skipped", "computed", "saved"))
    return [
        exit_heatmap((0, 0, 12, 9)),
        panel("Mean exit layer", (12, 0, 4, 9),
              [("mean", f"sum({rate('onejump_exit_layer_sum')}) / sum({rate('onejump_exit_layer_count')})")],
              "short", "Mean depth at which generated tokens were decided."),
        panel("% skipped in own step", (16, 0, 4, 9), [("skipped", f"100 * {skipped} / ({skipped} + {computed})")],
              "percent", "Share of decoder-layer evaluations that exited tokens did not run in their own step: "
                         "skipped / (skipped + computed). Not work saved: catch-up (and exact mode's verification) "
                         "runs most of them later, with the next token that goes deeper; see '% saved'."),
        panel("% saved", (20, 0, 4, 9), [("saved", f"100 * {saved} / ({saved} + {computed})")],
              "percent", "Share of decoder-layer evaluations never run: onejump_layers_saved_total (layers x tokens "
                         "fed - computed) / (saved + computed); computed includes catch-up and verification. "
                         "This is the work early exits really saved."),
        panel("Tokens by exit kind", (0, 9, 8, 8),
              [("{{exit}}", f"sum by (exit) ({rate('onejump_tokens_total')})")], "short",
              "early: decided by the jump head; full: full depth; verified: drafted early and accepted by "
              "the full-depth check (exact mode).", stack=True),
    ]


def latency_panels() -> list[dict[str, Any]]:
    return [
        panel(title, (x, y, 8, 8), quantiles(metric), "s", description)
        for title, metric, (x, y), description in (
            ("Time to first token", "onejump_time_to_first_token_seconds", (0, 17), "Arrival to first token."),
            ("Inter-token latency", "onejump_inter_token_latency_seconds", (8, 17), "Between generated tokens."),
            ("End-to-end latency", "onejump_e2e_request_latency_seconds", (16, 17), "Arrival to last token."),
            ("Queue time", "onejump_request_queue_time_seconds", (0, 25), "Waiting for the decoding worker."),
        )
    ]


def traffic_panels() -> list[dict[str, Any]]:
    return [
        panel("Requests per second", (8, 9, 8, 8),
              [("{{finished_reason}}", f"sum by (finished_reason) ({rate('onejump_request_success_total')})")],
              "reqps", "Finished requests by finish reason."),
        panel("Tokens per second", (16, 9, 8, 8),
              [("generated", f"sum({rate('onejump_generation_tokens_total')})"),
               ("prompt", f"sum({rate('onejump_prompt_tokens_total')})")], "short", "Generated and prompt tokens."),
        panel("Running and waiting requests", (8, 25, 8, 8),
              [("running", f"sum(onejump_num_requests_running{SEL})"),
               ("waiting", f"sum(onejump_num_requests_waiting{SEL})")], "short",
              "Being decoded, and queued (beyond ONEJUMP_QUEUE_SIZE a request gets 429)."),
        panel("Failures by reason", (16, 25, 8, 8),
              [("{{reason}}", f"sum by (reason) ({rate('onejump_request_failure_total')})")], "reqps",
              "queue_full (429), timeout (504 after ONEJUMP_REQUEST_TIMEOUT_S in the queue), cancelled "
              "(client went away), error. Invalid requests (400) never reach the engine and are not counted."),
    ]


def replica_panels() -> list[dict[str, Any]]:
    """One line per replica (the ``instance`` label: host:port under compose, the pod's name under the chart's
    ServiceMonitor), to see how requests spread and whether replicas exit alike; the panels above sum them."""
    by = "sum by (instance)"
    return [
        panel(title, (6 * i, 33, 6, 8), [("{{instance}}", expr)], unit, description)
        for i, (title, expr, unit, description) in enumerate((
            ("Requests per second per replica", f"{by} ({rate('onejump_request_success_total')})", "reqps",
             "Finished requests by replica: how the load balancer spreads them (a keep-alive client stays on one "
             "replica)."),
            ("Waiting requests per replica", f"{by} (onejump_num_requests_waiting{SEL})", "short",
             "Queued requests by replica; the autoscaler reads their sum."),
            ("Mean exit layer per replica", f"{by} ({rate('onejump_exit_layer_sum')}) / "
                                            f"{by} ({rate('onejump_exit_layer_count')})", "short",
             "Mean depth at which each replica's tokens were decided. Replicas with the same settings differ only "
             "by the prompts they got; a lasting gap means different traffic or different exit settings."),
            ("Tokens per second per replica", f"{by} ({rate('onejump_generation_tokens_total')})", "short",
             "Generated tokens by replica."),
        ))
    ]


def engine_panels() -> list[dict[str, Any]]:
    """Exact mode's drafts by source (the prompt's n-grams, the exit head) and the batch's KV-cache use,
    beside vLLM's equivalents."""
    drafted, accepted = (f"sum by (source) ({rate(f'onejump_spec_decode_num_{k}_tokens_total')})"
                         for k in ("draft", "accepted"))
    return [
        panel("Draft acceptance rate by source (exact mode)", (0, 41, 8, 8),
              [("{{source}}", f"{accepted} / ({drafted} > 0)")],
              "percentunit", "Share of the drafted tokens that the full model accepted, by where the drafts came "
                             "from: ngram (prompt lookup: the prompt and output so far) or exit (the exit head) "
                             "(onejump_spec_decode_num_accepted_tokens / _draft_tokens, by source); a source that "
                             "drafted nothing has no line."),
        panel("Drafted and accepted tokens by source", (8, 41, 8, 8),
              [("drafted {{source}}", drafted), ("accepted {{source}}", accepted)], "short",
              "Tokens per second drafted, and accepted by the full model, per draft source. An accepted token is a "
              "token decided without a full-depth pass of its own."),
        panel("KV cache usage", (16, 41, 8, 8), [("{{instance}}", f"max by (instance) "
                                                                   f"(onejump_kv_cache_usage_perc{SEL})")],
              "percentunit", "Fraction of each replica's static KV cache (max_batch_size rows of the context "
                             "length) holding keys."),
    ]


def model_variable() -> dict[str, Any]:
    query = "label_values(onejump_num_requests_running, model_name)"
    return {"name": "model_name", "label": "model", "type": "query", "datasource": DATASOURCE, "query": query,
            "definition": query, "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def dashboard() -> dict[str, Any]:
    panels = early_exit_panels() + traffic_panels() + latency_panels() + replica_panels() + engine_panels()
    for i, p in enumerate(sorted(panels, key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])), start=1):
        p["id"] = i
    return {
        "uid": "onejump", "title": "onejump", "tags": ["onejump", "early-exit"], "timezone": "browser",
        "editable": True, "graphTooltip": 1, "refresh": "10s", "schemaVersion": 39, "version": 1,
        "time": {"from": "now-30m", "to": "now"}, "annotations": {"list": []},
        "templating": {"list": [model_variable()]},
        "panels": sorted(panels, key=lambda p: p["id"]),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = [path for path in (OUT, CHART_COPY) if path.read_text() != render()]
        for path in stale:
            print(f"{path} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
        return 1 if stale else 0
    for path in (OUT, CHART_COPY):
        path.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
