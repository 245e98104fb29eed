"""Write requirements.lock: the exact versions, from the running environment, of everything onejump
needs (pyproject.toml's dependencies and its serve, dev and bnb extras, followed transitively), and nothing
else the environment happens to hold. ``make lock`` runs it; the Dockerfile and ``make setup`` install
with ``-c requirements.lock``. Torch is written without its local build tag (``2.13.0``, not
``2.13.0+cpu``): the index picks the build (CPU or CUDA), the lock the version."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("serve", "dev", "bnb")


def roots() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + [r for e in EXTRAS for r in
                                                                 project["optional-dependencies"][e]]]


def closure(todo: list[Requirement]) -> dict[str, str]:
    """name -> installed version of every requirement, followed through the installed metadata."""
    pinned: dict[str, str] = {}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in pinned or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        dist = metadata.distribution(req.name)  # fails loudly when the environment lacks it
        pinned[name] = dist.version.split("+")[0]
        for sub in dist.requires or []:
            r = Requirement(sub)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(r)
    return pinned


def main() -> int:
    pins = closure(roots())
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    header = (f"# onejump's locked dependencies (python {sys.version_info.major}.{sys.version_info.minor}), "
              "written by `make lock` (deploy/lock.py); used with pip's -c\n")
    (ROOT / "requirements.lock").write_text(header + "\n".join(lines) + "\n")
    print(f"requirements.lock: {len(lines)} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
