"""Runs the evals/wiki tasks with lm-evaluation-harness's local-completions against a real onejump
server at several exit settings, and writes docs/lm-eval.md: the task scores (quality as users
measure it) beside the generations' agreement with exits off and the mean exit layer.

``python evals/report.py [--limit 100] [--port 8123]`` (the SmolLM2 assets of `onejump assets`)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> server flags
    "off": ["--exit-mode", "off"],
    "calibrated": ["--exit-mode", "approximate"],
    "aggressive": ["--exit-mode", "approximate", "--exit-threshold", "0.5", "--exit-min-layer", "4"],
}
TASKS = ["onejump_wiki_lastword", "onejump_wiki_continue"]


def serve(flags: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "service", "--device", "cpu", "--port", str(port),
                             "--queue-size", "256", *flags], cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError("the server did not become ready")


def mean_exit_layer(url: str) -> float:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for name in ("onejump_exit_layer_sum", "onejump_exit_layer_count"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values["onejump_exit_layer_sum"] / max(values["onejump_exit_layer_count"], 1)


def evaluate(name: str, port: int, limit: int, tasks: list[str]) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    proc = serve(SETTINGS[name], port)
    url = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        tokenizer = ROOT / ".cache/onejump/models/smollm2-135m-instruct"
        args = (f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
                "num_concurrent=4,max_retries=1,batch_size=8")
        t0 = time.perf_counter()
        out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=tasks, limit=limit,
                                      task_manager=TaskManager(include_path=str(ROOT / "evals/wiki")),
                                      log_samples=True)
        seconds = time.perf_counter() - t0
        gens = [s["filtered_resps"][0] for s in out["samples"]["onejump_wiki_continue"]]
        return {"acc": out["results"].get("onejump_wiki_lastword", {}).get("acc,none"),
                "em": out["results"]["onejump_wiki_continue"]["exact_match,first-words"],
                "chrf": out["results"]["onejump_wiki_continue"]["chrf,first-words"],
                "gens": gens, "exit": mean_exit_layer(url), "seconds": seconds}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--generate-only", action="store_true", help="skip the loglikelihood task")
    args = ap.parse_args()
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    # prompt scoring (echo + logprobs) is the full model's whatever the exit settings: the loglikelihood
    # task runs once, with exits off
    runs = {name: evaluate(name, args.port, args.limit, TASKS if name == "off" and not args.generate_only
                           else TASKS[1:]) for name in SETTINGS}
    ref = runs["off"]["gens"]
    lines = ["| setting | server flags | last word (acc, loglikelihood) "
             "| next 4 words (exact match; chrF, generate_until) "
             "| four words equal to exits off | mean exit layer (generated tokens) | seconds |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        agree = sum(a == b for a, b in zip(r["gens"], ref, strict=True)) / len(ref)
        acc = ("not run" if args.generate_only else "same (full model)") if r["acc"] is None else f"{r['acc']:.3f}"
        lines.append(f"| {name} | `{' '.join(SETTINGS[name])}` | {acc} | {r['em']:.3f}; {r['chrf']:.1f} "
                     f"| {agree:.3f} "
                     f"| {r['exit']:.1f} | {r['seconds']:.0f} |")
    print("\n".join(lines))
    (ROOT / "docs" / "lm-eval-table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
