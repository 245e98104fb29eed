"""Renders the Helm chart deploy/k8s/onejump for the CPU and the GPU image from its one values.yaml into
deploy/k8s/rendered/onejump-{cpu,gpu}.yaml (release ``onejump``, namespace ``onejump``), for `kubectl apply`
without Helm and for review. ``python deploy/k8s/render.py`` (``make k8s``) rewrites them; ``--check`` exits 1
when a committed file differs (tests/test_k8s.py checks that and validates them).

Rendering uses Helm's own engine (Helm 4's Go SDK) through the ``helm-python-sdk`` package of the ``dev`` extra,
so CI needs no ``helm`` binary; with Helm installed, ``helm template onejump deploy/k8s/onejump --set flavor=gpu``
renders the same manifests."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CHART = HERE / "onejump"
RENDERED = HERE / "rendered"
RELEASE, NAMESPACE = "onejump", "onejump"
FLAVORS = ("cpu", "gpu")


def render(values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
    """The chart's manifests for ``values`` (merged over values.yaml), one ``# Source:`` document per template,
    as `helm template` prints them (in file order, where helm orders by kind)."""
    import helm_python

    # warnings and errors only: at INFO it reports every symbolic link it follows (dashboards/onejump.json)
    helm_python.enable_logging(logging.WARNING)
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values=values or {}, name=release, namespace=namespace, is_install=True)
    return "".join(f"---\n# Source: {name}\n{text.strip()}\n" for name, text in sorted(files.items())
                   if name.endswith(".yaml") and _has_content(text))


def _has_content(text: str) -> bool:
    return any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines())


def rendered_path(flavor: str) -> Path:
    return RENDERED / f"onejump-{flavor}.yaml"


def header(flavor: str) -> str:
    return (f"# Rendered by deploy/k8s/render.py (make k8s) from deploy/k8s/onejump with flavor={flavor},\n"
            f"# release {RELEASE}, namespace {NAMESPACE}. Do not edit: change the chart or its values.yaml.\n")


def main(argv: list[str]) -> int:
    stale = []
    for flavor in FLAVORS:
        text = header(flavor) + render({"flavor": flavor})
        path = rendered_path(flavor)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path)
            continue
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    for path in stale:
        print(f"{path} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
