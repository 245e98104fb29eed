"""Shared test helpers for the deployment files: the repository root, the Dockerfile's instructions, the
Grafana dashboard's queries and the metrics they name, and a real Prometheus scraping a server."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]

SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}

_NO_PROMETHEUS = shutil.which("prometheus") is None or shutil.which("promtool") is None

# In CI (CI=true) `make test` has installed them, so a missing binary fails there instead of skipping.
needs_prometheus = pytest.mark.skipif(_NO_PROMETHEUS and not os.environ.get("CI"),
                                      reason="prometheus/promtool not on PATH: `make deploy-tools` installs them "
                                             "(Debian's prometheus package; make test does it as root)")


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = dashboard["panels"]
    return panels + [q for p in panels for q in p.get("panels", [])]  # panels folded in rows


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in all_panels(dashboard) for t in p["targets"]]


def registry_names() -> set[str]:
    """Every sample name the service's Metrics can expose (prometheus_client's suffixes)."""
    families = Metrics("m", num_layers=4).registry.collect()
    return {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}


def referenced_metrics(exprs: list[str]) -> set[str]:
    return {name for e in exprs for name in re.findall(r"\bonejump_\w+", e)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_prometheus(target_url: str, folder: Path, labels: dict[str, str] | None = None) -> Iterator[str]:
    """A Prometheus on a free loopback port scraping ``target_url`` every second, adding ``labels`` to every
    series (as Kubernetes discovery adds namespace, pod, ...); yields its URL."""
    config = folder / "prometheus.yml"
    scrape = {"job_name": "onejump", "static_configs": [{"targets": [target_url.split("://")[1]],
                                                         "labels": labels or {}}]}
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                                      "scrape_configs": [scrape]}))
    url, log = f"http://127.0.0.1:{free_port()}", folder / "prometheus.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
                                 f"--web.listen-address={url.split('://')[1]}", "--log.level=warn"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: proc.poll() is None and answers(f"{url}/-/ready"), 60,
                 lambda: f"prometheus did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(ok: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(why())
        time.sleep(0.2)


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    body = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]
