"""The server's resident memory at each weight format (issue 20): start ``python -m service`` with each
``ONEJUMP_QUANTIZATION``, wait for /ready, warm it up with a few completions, read /proc/PID/status.

    python -m shortcuts.lab.server_rss --quantization none,int8,int4,bnb-8bit,bnb-4bit \\
        --out docs/quantization/rss-smollm2.json

``weights_mb``: the model's parameters at float32 (what "the weights' size" means in the goal); the ratio
is VmRSS over it, and the same without ``kv_cache_mb``, the static KV caches the server allocates (zeroed,
so resident) for ``--batch`` rows of ``--positions``. ``baseline_mb``: a Python process that imported what
the server imports (torch, transformers, the serving stack) and loaded nothing: what no format can go below.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def status(pid: int) -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kv_cache_mb(model: str, rows: int, positions: int) -> float:
    """The static KV caches' megabytes the server allocates (float32): the batch's (``rows`` rows) and the
    single sequence's (one row), ``positions`` each (``max_prompt_tokens + max_new_tokens``)."""
    config = json.loads((Path(model) / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return layers * (rows + 1) * positions * kv_heads * head_dim * 2 * 4 / 2**20


def measure(quantization: str, model: str, jump: str, extra: dict[str, str], timeout: float = 900) -> dict[str, Any]:
    port = free_port()
    env = {**os.environ, "ONEJUMP_MODEL": model, "ONEJUMP_JUMP": jump, "ONEJUMP_QUANTIZATION": quantization,
           "ONEJUMP_DEVICE": "cpu", "ONEJUMP_PORT": str(port), "OMP_NUM_THREADS": "1", "ONEJUMP_LOG_LEVEL": "warning",
           **extra}
    proc = subprocess.Popen([sys.executable, "-m", "service"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server never became ready")
            time.sleep(1)
        card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
        for mode in ("off", "approximate", "exact"):
            httpx.post(f"{url}/v1/completions", timeout=300, json={
                "model": card["id"], "prompt": "The history of the city of Paris begins", "max_tokens": 16,
                "early_exit": {"mode": mode}}).raise_for_status()
        return {"quantization": quantization, **status(proc.pid), "weights": card.get("weights")}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def baseline() -> dict[str, float]:
    code = ("import torch, transformers, fastapi, uvicorn, service.app, shortcuts.engine.decoder; "
            "from pathlib import Path; print(Path('/proc/self/status').read_text())")
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "RssAnon", "RssFile")}


def main(argv: list[str] | None = None) -> None:
    from shortcuts.assets import default_model_dir

    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.server_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--jump", default="docs/results/smollm2-135m/jump.safetensors")
    p.add_argument("--quantization", default="none,int8,int4,bnb-8bit,bnb-4bit")
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=8, help="ONEJUMP_MAX_BATCH_SIZE (the batch's KV cache rows)")
    p.add_argument("--positions", type=int, default=2560,
                   help="ONEJUMP_MAX_PROMPT_TOKENS + ONEJUMP_MAX_NEW_TOKENS (the KV cache's length; new tokens 512)")
    a = p.parse_args(argv)
    extra = {"ONEJUMP_MAX_BATCH_SIZE": str(a.batch), "ONEJUMP_MAX_NEW_TOKENS": "64" if a.positions < 600 else "512",
             "ONEJUMP_MAX_PROMPT_TOKENS": str(a.positions - (64 if a.positions < 600 else 512)),
             "ONEJUMP_DEFAULT_MAX_TOKENS": "16"}
    from safetensors import safe_open

    with safe_open(str(Path(a.model) / "model.safetensors"), "pt") as f:
        params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    weights_mb = params * 4 / 2**20
    kv = kv_cache_mb(a.model, a.batch, a.positions)
    rows = []
    for q in a.quantization.split(","):
        row = measure(q, a.model, a.jump, extra)
        row["rss_over_weights"] = row["VmRSS"] / weights_mb
        row["rss_without_kv_over_weights"] = (row["VmRSS"] - kv) / weights_mb
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = {"model": a.model, "weights_mb": weights_mb, "kv_cache_mb": kv, "server_env": extra,
           "baseline_mb": baseline(), "servers": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


if __name__ == "__main__":
    main()
