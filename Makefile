# onejump: make serve | test | setup | assets | fit | lint | deploy-tools | dashboard | k8s
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch 2.13.0 (CPU) lies on disk on these machines; elsewhere pip fetches it from PyPI.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup lock assets serve fit test test-fast lint bench micro-bench loadtest soak deploy-tools dashboard k8s gpu-check gpu-pack

# every version from requirements.lock (torch 2.13.0 included); `make lock` rewrites it from the venv
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(WHEELS) -c requirements.lock torch
	$(PIP) install -q $(WHEELS) -c requirements.lock -e ".[serve,dev,bnb]"
	touch $@

lock: setup
	$(PY) deploy/lock.py

assets: setup
	$(VENV)/bin/onejump assets

serve: assets
	$(PY) -m service

fit: assets
	$(VENV)/bin/onejump fit --out-dir runs/smollm2

# `onejump bench` on the shipped jump and the held-out prompts: HF generate, full depth, approximate and exact
# interleaved, one thread (BENCH_ARGS adds flags, e.g. BENCH_ARGS="--json --max-prompts 5")
bench: assets
	$(VENV)/bin/onejump bench --jump docs/results/smollm2-135m/jump.safetensors \
	  --prompts docs/exits/heldout20-seed2027.jsonl --threads 1 $(BENCH_ARGS)

# per-token costs (a block, the heads, a check) and a few fixed thresholds on one prompt (shortcuts/lab/micro_bench.py)
micro-bench: assets
	$(PY) -m shortcuts.lab.micro_bench

test: assets deploy-tools
	$(PY) -m pytest

# math, tiny models and HTTP on tiny models (< 3 min); `make test` runs every tier
FAST := not real and not slow and not fuzz and not k8s and not subprocess and not timing and not cuda
test-fast: setup
	$(PY) -m pytest -m "$(FAST)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy service shortcuts

# prometheus + promtool for tests/test_deploy.py (Debian's package; needs root). Does nothing when both are
# on PATH; without root it says so and the two Prometheus tests skip, naming the missing binary.
deploy-tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
	  echo "deploy-tools: could not install Debian's prometheus (not root?); tests/test_deploy.py will skip its Prometheus tests"

# rewrite deploy/grafana/dashboards/onejump.json (and its copy in the Helm chart) from deploy/grafana/dashboard.py
dashboard: setup
	$(PY) deploy/grafana/dashboard.py

# render the Helm chart deploy/k8s/onejump for CPU and GPU into deploy/k8s/rendered/ (docs/scale.md)
k8s: setup
	$(PY) deploy/k8s/render.py

# load a running server over HTTP (docs/loadtest.md), e.g. make loadtest LOADTEST_ARGS="--concurrency 1,4 --requests 8"
loadtest: setup
	$(PY) -m loadtest $(LOADTEST_ARGS)

# hold a steady load on a running server, sample its memory, check /metrics (docs/soak.md), e.g.
# make soak SOAK_ARGS="--duration 180 --pid $(pgrep -f 'python -m service' | head -1)"
soak: setup
	$(PY) -m loadtest.soak $(SOAK_ARGS)

# the GPU check (issue 23, docs/gpu.md): on a GPU machine, every stage of scripts/gpu_check.sh (results in runs/gpu);
# gpu-pack prepares, on a machine with network, what a GPU machine without one lacks (.gpu/a, .gpu/b)
gpu-check:
	scripts/gpu_check.sh receive a receive b probe tests smoke model bench serve shapes

gpu-pack: assets
	scripts/gpu_pack.sh
