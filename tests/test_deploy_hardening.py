"""Issue 13's deployment findings (D11, D12, the lock file), checked on the files without Docker: compose
defaults that are safe on a shared host, and the image and ``make setup`` installing locked versions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.deploy import ROOT, dockerfile

from service.config import Settings

SERVICES = ("onejump", "onejump-cpu", "prometheus", "grafana")
LOCK = ROOT / "requirements.lock"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def unset(value: str) -> str:
    """A compose value as it reads with no variable set (``${X:-d}`` -> d; ``${X:?msg}`` refuses)."""
    if re.search(r"\$\{\w+:\?", value):
        raise ValueError(f"{value} needs its variable set")
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.mark.parametrize("name", SERVICES)
def test_ports_are_published_on_loopback_unless_asked(compose: dict[str, Any], name: str) -> None:
    for port in compose["services"][name]["ports"]:
        host_ip, _host_port, _container_port = unset(str(port)).split(":")
        assert host_ip == "127.0.0.1", port
        assert str(port).startswith("${ONEJUMP_BIND:-127.0.0.1}:"), port  # one variable opens them all


@pytest.mark.parametrize("name", SERVICES)
def test_containers_are_hardened_and_limited(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    assert re.fullmatch(r"\d+[mg]", unset(str(service["mem_limit"])))
    assert float(unset(str(service["cpus"]))) > 0
    assert service["pids_limit"] > 0


def test_grafana_has_no_anonymous_access_and_no_default_password(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    password = env["GF_SECURITY_ADMIN_PASSWORD"]
    assert password.startswith("${GF_ADMIN_PASSWORD:?")  # compose refuses to start without it
    with pytest.raises(ValueError, match="needs its variable"):
        unset(password)
    assert "/var/log/grafana" in compose["services"]["grafana"]["tmpfs"]  # writable under read_only


def _duration(value: str) -> float:
    m = re.fullmatch(r"(\d+)(m|s)", value)
    assert m, value
    return int(m[1]) * (60 if m[2] == "m" else 1)


@pytest.mark.parametrize("name", ["onejump", "onejump-cpu"])
def test_the_server_gets_the_key_as_a_secret_and_time_to_drain(compose: dict[str, Any], name: str,
                                                                tmp_path: Path) -> None:
    service = compose["services"][name]
    env = service["environment"]
    assert "ONEJUMP_API_KEY" not in env  # `docker inspect` shows environment variables
    assert "ONEJUMP_ALLOW_UNAUTHENTICATED" not in env
    (secret,) = service["secrets"]
    assert env["ONEJUMP_API_KEY_FILE"] == f"/run/secrets/{secret}"  # where compose mounts it
    assert unset(compose["secrets"][secret]["file"]) == "./secrets/onejump-api-key"
    key = tmp_path / "onejump-api-key"
    key.write_text("s3cret\n")
    parsed = Settings(host="0.0.0.0", api_key_file=str(key))  # noqa: S104 (the container listens on every interface)
    assert parsed.api_key is not None
    assert parsed.api_key.get_secret_value() == "s3cret"
    grace = int(unset(env["ONEJUMP_SHUTDOWN_TIMEOUT_S"]))
    # docker's SIGKILL comes after the drain: the timeout, the chunk in progress (LAST_CHUNK_S), uvicorn's 2 s
    from service.__main__ import LAST_CHUNK_S

    assert _duration(unset(service["stop_grace_period"])) > grace + LAST_CHUNK_S + 2
    assert "/tmp" in service["tmpfs"]


@pytest.mark.parametrize("name", ["onejump", "onejump-cpu"])
def test_the_server_writes_only_to_writable_places(compose: dict[str, Any], name: str) -> None:
    """read_only root: HOME and the caches on the tmpfs; ONEJUMP_CACHE (inductor's cache with ONEJUMP_COMPILE)
    and HF_HOME on the /data volume."""
    service = compose["services"][name]
    env = service["environment"]
    writable = [*service["tmpfs"], *(v.split(":")[1] for v in service["volumes"] if not v.endswith(":ro"))]
    image_env = dict(re.findall(r"(\w+)=(\S+)", (ROOT / "Dockerfile").read_text().split("FROM base-${FLAVOR} AS "
                                                                                          "runtime")[1]))
    for name_ in ("HOME", "XDG_CACHE_HOME"):
        assert any(env[name_] == w or env[name_].startswith(w + "/") for w in writable), (name_, env[name_])
    for name_ in ("ONEJUMP_CACHE", "HF_HOME"):
        assert any(image_env[name_].startswith(w) for w in writable), (name_, image_env[name_])


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version.strip()
    return pins


def test_the_lock_pins_every_dependency_and_not_the_project() -> None:
    pins = locked()
    assert "onejump" not in pins
    assert all(re.fullmatch(r"[\w.+]+", v) for v in pins.values()), pins
    for needed in ("torch", "transformers", "fastapi", "uvicorn", "pydantic", "starlette", "hypothesis", "pytest"):
        assert needed in pins, needed
    assert "+" not in pins["torch"]  # the index picks the build (CPU or CUDA), the lock the version


def test_the_image_and_make_setup_install_the_locked_versions() -> None:
    steps = dockerfile()
    copies = [args for op, args in steps if op == "COPY"]
    assert any("requirements.lock" in c for c in copies)
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert installs
    assert all("-c requirements.lock" in args for args in installs), installs
    torch_arg = next(args for op, args in steps if op == "ARG" and args.startswith("TORCH_VERSION"))
    assert torch_arg == f"TORCH_VERSION={locked()['torch']}"  # torch pinned in the image
    makefile = (ROOT / "Makefile").read_text()
    setup = makefile[makefile.index("$(VENV)/.installed:"):].split("\n\n")[0]
    assert setup.count("-c requirements.lock") == 2, setup
    assert "requirements.lock" in setup.splitlines()[0]  # a new lock reinstalls
