"""The deployment files (Dockerfile, docker-compose.yml, Prometheus and Grafana provisioning), checked
without Docker: static consistency, ``promtool check config``, and every query of the Grafana dashboard
run on a real Prometheus that scrapes a real server on the tiny model. Nothing here builds an image."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support.deploy import (
    ROOT,
    all_panels,
    dashboard_exprs,
    dockerfile,
    needs_prometheus,
    query,
    referenced_metrics,
    registry_names,
    running_prometheus,
    wait_for,
)
from support.server import metric, running_server, tiny_settings

DASHBOARD = ROOT / "deploy/grafana/dashboards/onejump.json"
PROMETHEUS_YML = ROOT / "deploy/prometheus/prometheus.yml"
DATASOURCES_YML = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
SERVERS = ("onejump", "onejump-cpu")
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


# ---------------------------------------------------------------- reading the files

def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    return dict(w.split("=", 1) for op, args in steps if op == "ENV" for w in shlex.split(args))


def expose_ports() -> set[int]:
    return {int(p.split("/")[0]) for op, args in final_stage() if op == "EXPOSE" for p in args.split()}


def default_of(value: str) -> str:
    """``${VAR:-default}`` -> ``default``, as compose reads it with VAR unset."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(default_of(str(p)).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (or volume name) of every short-syntax volume."""
    pairs = (default_of(v).split(":") for v in service.get("volumes", []))
    return {p[1]: p[0] for p in pairs}


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def substitute(expr: str, model_name: str) -> str:
    values = {**GRAFANA_VARS, "model_name": model_name}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], expr)


def datasource_uid() -> str:
    (source,) = load_yaml(DATASOURCES_YML)["datasources"]
    return source["uid"]


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for op, args in final_stage() if op == "USER"]
    assert users, "the final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_healthcheck_and_port() -> None:
    (check,) = [args for op, args in final_stage() if op == "HEALTHCHECK"]
    assert "/health" in check
    assert "urllib.request" in check  # no curl in the image
    env = env_of(final_stage())
    assert expose_ports() == {int(env["ONEJUMP_PORT"])} == {8000}
    assert env["ONEJUMP_HOST"] == "0.0.0.0"


def test_dockerfile_copies_what_exists_and_ignores_the_clutter() -> None:
    for op, args in dockerfile():
        if op == "COPY" and "--from" not in args:
            *sources, _ = shlex.split(args)
            assert all((ROOT / s).exists() for s in sources), args
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".cache", "runs"} <= ignored


def test_gpu_extra_has_bitsandbytes() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \[.*"bitsandbytes', text, re.M)
    assert re.search(r'^dev = \[.*"pyyaml', text, re.M)


# ---------------------------------------------------------------- docker-compose.yml

def test_compose_services_and_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {*SERVERS, "prometheus", "grafana"} <= services.keys()
    (device,) = services["onejump"]["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", 1, ["gpu"])
    assert "deploy" not in services["onejump-cpu"]
    assert services["onejump"]["build"]["args"]["FLAVOR"] == "gpu"
    assert services["onejump-cpu"]["build"]["args"]["FLAVOR"] == "cpu"
    assert services["onejump"]["profiles"] != services["onejump-cpu"]["profiles"]  # never both at once


def test_compose_ports_match_the_scrape_target(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (job,) = load_yaml(PROMETHEUS_YML)["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "onejump"
    assert "onejump" in services["onejump-cpu"]["networks"]["default"]["aliases"]
    for name in SERVERS:
        assert container_ports(services[name]) == {int(port)} == expose_ports(), name
        assert job.get("metrics_path", "/metrics") == "/metrics"
    (source,) = load_yaml(DATASOURCES_YML)["datasources"]
    assert source["url"] == f"http://prometheus:{container_ports(services['prometheus']).pop()}"


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for source in mounts(service).values():
            if is_bind(source):
                assert (ROOT / source).exists(), f"{name} mounts {source}, missing from the repo"
            else:
                assert source in named, f"{name} uses the undeclared volume {source}"


def test_compose_prometheus_reads_the_checked_config(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    config = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert (ROOT / mounts(prom)[config]).resolve() == PROMETHEUS_YML


def test_grafana_provisioning_paths(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    where = mounts(grafana)
    provisioning = ROOT / where["/etc/grafana/provisioning"]
    assert (provisioning / "datasources/prometheus.yml").resolve() == DATASOURCES_YML
    (provider,) = load_yaml(provisioning / "dashboards/onejump.yml")["providers"]
    folder = provider["options"]["path"]
    assert (ROOT / where[folder] / DASHBOARD.name).resolve() == DASHBOARD
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/{DASHBOARD.name}"


# ---------------------------------------------------------------- the dashboard

def test_dashboard_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard_gen", ROOT / "deploy/grafana/dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "stale: run python deploy/grafana/dashboard.py"


def test_dashboard_panels_targets_and_datasource(dashboard: dict[str, Any]) -> None:
    uid = datasource_uid()
    panels = all_panels(dashboard)
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["targets"], p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert {p["datasource"]["uid"]} | {t["datasource"]["uid"] for t in p["targets"]} == {uid}, p["title"]
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model_name"
    assert variable["datasource"]["uid"] == uid


def test_dashboard_metrics_exist_in_the_service(dashboard: dict[str, Any]) -> None:
    exprs = dashboard_exprs(dashboard) + [dashboard["templating"]["list"][0]["query"]]
    unknown = referenced_metrics(exprs) - registry_names()
    assert not unknown, f"the dashboard names metrics service/metrics.py does not define: {unknown}"
    titles = " ".join(p["title"].lower() for p in all_panels(dashboard))
    for needed in ("exit layer", "skipped", "exit kind", "first token", "inter-token", "end-to-end",
                   "requests per second", "tokens per second", "running", "failures", "acceptance rate", "kv cache"):
        assert needed in titles


# ---------------------------------------------------------------- Prometheus itself

@needs_prometheus
@pytest.mark.subprocess
def test_promtool_accepts_the_config() -> None:
    done = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def scalar(prom: str, expr: str) -> float:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else -1.0


def send_traffic(url: str) -> None:
    """Every kind of exit, a stream, a 400 (not counted: it never reaches the engine) and a cancelled stream."""
    for mode in ("approximate", "off", "exact"):
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": "the king of the", "max_tokens": 6, "early_exit": {"mode": mode, "threshold": 0.0}})
        assert r.status_code == 200, r.text
    for draft in ("exit", "ngram"):  # exact mode's two draft sources, each with drafts to count
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": "the king of the river and the king of the river and the king of the", "max_tokens": 8,
            "early_exit": {"mode": "exact", "threshold": 0.0, "draft": draft}})
        assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "the city"}], "max_tokens": 5, "stream": True}) as r:
        assert [ln for ln in r.iter_lines() if ln][-1] == "data: [DONE]"
    assert httpx.post(f"{url}/v1/completions", json={"prompt": ""}).status_code == 400
    cancelled = metric(url, "onejump_request_failure_total", reason="cancelled")
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60, json={
            "prompt": "the", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        next(r.iter_lines())  # the first frame, then hang up
    wait_for(lambda: metric(url, "onejump_request_failure_total", reason="cancelled") > cancelled, 30,
             lambda: "the hung-up stream was not cancelled")


def wait_until_scraped(prom: str, url: str) -> None:
    names = ("onejump_generation_tokens_total", "onejump_request_failure_total",
             "onejump_e2e_request_latency_seconds_count")
    wait_for(lambda: all(scalar(prom, f"sum({n})") == metric(url, n) for n in names), 30,
             lambda: f"prometheus never caught up with the server: {query(prom, 'up')}")


def exposed_names(url: str) -> set[str]:
    text = httpx.get(f"{url}/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


@needs_prometheus
@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.subprocess
def test_every_dashboard_query_returns_data(dashboard: dict[str, Any], tiny_folder: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_folder, max_new_tokens=400)
    with running_server(settings) as url, running_prometheus(url, tmp_path) as prom:
        for _ in range(2):  # a second round, so every rate over the last minute sees an increase
            send_traffic(url)
            wait_until_scraped(prom, url)
        exprs = dashboard_exprs(dashboard)
        assert referenced_metrics(exprs) <= exposed_names(url)
        empty, nan = [], []
        for expr in exprs:
            result = query(prom, substitute(expr, settings.model_name))
            empty += [expr] if not result else []
            nan += [expr for r in result if math.isnan(float(r["value"][1]))]
        assert not empty, f"no data for: {empty}"
        assert not nan, f"NaN for: {nan}"
        values = httpx.get(f"{prom}/api/v1/label/model_name/values",
                           params={"match[]": "onejump_num_requests_running"}).json()["data"]
        assert values == [settings.model_name]  # what the model_name variable offers
