"""Threshold sweep, oracle ceiling and KV-policy drift of the early-exit engine, in one run.

    python -m shortcuts.lab.sweep --threads 1 --out docs/engine/smollm2-135m

On held-out Wikipedia sentences (the test split, never used to train or pick the jump):
1. quality: the full model's greedy continuation of every prompt, then one teacher-forced pass
   (``calibration.table.level_table``) gives per threshold, for every jump given, the greedy-token
   agreement with the full model, its 95% lower bound, the mean exit layer and its histogram,
   plus the oracle ceiling (a perfect gate, and the stable oracle);
2. speed: on the first prompts, HF ``generate``, our full-depth path, approximate decoding at each
   threshold and exact decoding, interleaved prompt by prompt so drift on a noisy machine hits
   every arm alike; tok/s and the ratios;
3. drift: long teacher-forced outputs under both KV policies, agreement by position.
Writes results.json, report.md and plots to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.assets import default_model_dir, wiki_split
from shortcuts.bench import hf_generate
from shortcuts.calibration.costs import CostModel
from shortcuts.calibration.replay import bootstrap_lower_bound, oracle_levels, replay
from shortcuts.calibration.search import fastest, search
from shortcuts.calibration.table import LevelTable, continuations, level_table
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import LowRankJumps
from shortcuts.lab.micro_bench import micro
from shortcuts.lab.sweep_report import write_report
from shortcuts.prompts import held_out_prompts

Jumps = dict[str, LowRankJumps | None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the SmolLM2 asset)")
    p.add_argument("--jumps", default="default=docs/results/smollm2-135m/jump.safetensors",
                   help="name=path,...; the first is timed; 'identity' is added to the quality table")
    p.add_argument("--corpus", default=None, help="held-out JSONL (default: the Wikipedia test split)")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    p.add_argument("--speed-prompts", type=int, default=8, help="prompts decoded and timed per arm")
    p.add_argument("--speed-thresholds", default="0.5,0.7,0.9")
    p.add_argument("--exact-thresholds", default="0.5,0.9")
    p.add_argument("--min-layer", type=int, default=None, help="first exit level (default: L/3)")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--drift-prompts", type=int, default=4)
    p.add_argument("--drift-tokens", type=int, default=256)
    p.add_argument("--drift-threshold", type=float, default=0.7)
    p.add_argument("--no-identity", dest="identity", action="store_false",
                   help="leave the identity head out of the quality table (a full head per level: slow for big V)")
    p.add_argument("--sections", default="quality,speed,drift", help="which of quality, speed, drift to run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _histogram(levels: Any, num_layers: int) -> list[int]:
    return torch.bincount(levels, minlength=num_layers + 1)[1:].tolist()


# --- 1. quality -----------------------------------------------------------------------------------
def threshold_rows(table: LevelTable, thresholds: list[float], min_layer: int, stride: int) -> list[dict[str, Any]]:
    rows = []
    for t in thresholds:
        s = ExitSettings(mode="approximate", threshold=t, min_layer=min_layer, stride=stride)
        level, picked = replay(table, s)
        agree = picked == table.final_top
        rows.append({"threshold": t, "agreement": float(agree.float().mean()),
                     "lower_bound": bootstrap_lower_bound(agree, table.prompt),
                     "mean_exit_layer": float(level.float().mean()),
                     "exited": float((level < table.num_layers).float().mean()),
                     "histogram": _histogram(level, table.num_layers)})
    return rows


def quality(lm: CausalLM, jumps: Jumps, prompts: list[list[int]], conts: list[list[int]],
            args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    heads = {**jumps, "identity": None} if args.identity else jumps
    for name, jump in heads.items():
        table = level_table(lm, ExitHead(lm, jump), prompts, conts, with_entropy=False)
        oracle = {k: {"mean": float(v.float().mean()), "speedup": lm.num_layers / float(v.float().mean()),
                      "histogram": _histogram(v, lm.num_layers)} for k, v in oracle_levels(table).items()}
        out[name] = {"tokens": len(table), "rows": threshold_rows(table, args.thresholds, args.min_layer, args.stride),
                     "oracle": oracle,
                     "calibrated": {str(t): _calibrated(table, t, args) for t in (0.9, 0.95)}}
    return out


def _calibrated(table: LevelTable, target: float, args: argparse.Namespace) -> dict[str, Any]:
    """The confidence threshold a calibration picks at ``target`` (free checks: ranked by exit depth)."""
    found = search(table, target, {"confidence": CostModel()}, None, (args.min_layer,), (args.stride,))
    return fastest(found).as_dict()


# --- 2. speed -------------------------------------------------------------------------------------
def speed_arms(lm: CausalLM, jumps: Jumps, args: argparse.Namespace) -> dict[str, Callable[[list[int]], list[Any]]]:
    """name -> function(prompt) -> generated tokens (or the Generation), for every timed arm."""
    dec = EarlyExitDecoder(lm, next(iter(jumps.values())))
    n = args.new_tokens

    def engine(**kw: Any) -> Callable[[list[int]], Any]:
        s = GenerationSettings(max_new_tokens=n, stop_token_ids=(),
                               exit=ExitSettings(min_layer=args.min_layer, stride=args.stride, **kw))
        return lambda ids: dec.generate(ids, s)

    arms: dict[str, Callable[[list[int]], Any]] = {"off": engine(mode="off"),
                                                   "HF generate": lambda ids: hf_generate(lm, ids, n)}
    for t in args.speed_thresholds:
        arms[f"approximate t={t}"] = engine(mode="approximate", threshold=t)
    for t in args.exact_thresholds:
        arms[f"exact t={t}"] = engine(mode="exact", threshold=t)
    return arms


def speed(lm: CausalLM, jumps: Jumps, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    arms = speed_arms(lm, jumps, args)
    for fn in arms.values():  # warm-up
        fn(prompts[0][:8])
    acc: dict[str, dict[str, Any]] = {k: {"seconds": 0.0, "tokens": 0, "depth": 0.0, "same": 0, "drafted": 0,
                                          "accepted": 0} for k in arms}
    for ids in tqdm(prompts, desc="speed", unit="prompt"):
        reference: list[int] = []
        for name, fn in arms.items():
            t0 = time.perf_counter()
            result = fn(ids)
            seconds = time.perf_counter() - t0
            tokens = result if isinstance(result, list) else result.tokens
            reference = tokens if name == "off" else reference
            a = acc[name]
            a["seconds"] += seconds
            a["tokens"] += len(tokens)
            if not isinstance(result, list):
                a["depth"] += sum(t.exit_layer for t in result.trace)
                a["drafted"] += result.stats.drafted
                a["accepted"] += result.stats.accepted
            if reference:
                a["same"] += sum(x == y for x, y in zip(tokens, reference, strict=False))
    return _speed_summary(acc)


def _speed_summary(acc: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rate = {k: a["tokens"] / a["seconds"] for k, a in acc.items()}
    return {k: {"tok_s": rate[k], "vs_off": rate[k] / rate["off"], "vs_hf": rate[k] / rate["HF generate"],
                "mean_exit_layer": a["depth"] / a["tokens"] if a["depth"] else None,
                "free_running_same": a["same"] / a["tokens"],
                "acceptance": a["accepted"] / a["drafted"] if a["drafted"] else None,
                "seconds": a["seconds"], "tokens": a["tokens"]} for k, a in acc.items()}


# --- 3. drift -------------------------------------------------------------------------------------
def drift(lm: CausalLM, jump: LowRankJumps | None, prompts: list[list[int]], args: argparse.Namespace,
          buckets: int = 4) -> dict[str, Any]:
    """Teacher-forced agreement by position on long outputs, per KV policy, and each policy's speed."""
    dec = EarlyExitDecoder(lm, jump)
    conts = continuations(lm, prompts, args.drift_tokens)
    policies = {"off": ExitSettings(mode="off")}
    for policy in ("catchup", "copy"):
        policies[policy] = ExitSettings(mode="approximate", threshold=args.drift_threshold, kv_policy=policy,
                                        min_layer=args.min_layer, stride=args.stride)
    hits = {k: [0] * buckets for k in policies}
    counts = [0] * buckets
    stats = {k: {"seconds": 0.0, "depth": 0, "tokens": 0} for k in policies}
    width = (args.drift_tokens - 1 + buckets - 1) // buckets
    for ids, cont in tqdm(list(zip(prompts, conts, strict=True)), desc="drift", unit="prompt"):
        traces = {}
        for name, exits in policies.items():
            t0 = time.perf_counter()
            traces[name] = dec.follow(ids, cont, GenerationSettings(max_new_tokens=len(cont), exit=exits))
            st = stats[name]
            st["seconds"] += time.perf_counter() - t0
            st["depth"] += sum(t.exit_layer for t in traces[name])
            st["tokens"] += len(traces[name])
        for k in range(len(traces["off"])):
            counts[k // width] += 1
        for name, trace in traces.items():
            for k, (t, ref) in enumerate(zip(trace, traces["off"], strict=True)):
                hits[name][k // width] += t.token == ref.token
    return {name: {"agreement_by_quarter": [h / max(c, 1) for h, c in zip(hits[name], counts, strict=True)],
                   "agreement": sum(hits[name]) / stats[name]["tokens"],
                   "mean_exit_layer": stats[name]["depth"] / stats[name]["tokens"],
                   "tok_s": stats[name]["tokens"] / stats[name]["seconds"]} for name in policies}


# --- the run --------------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> tuple[CausalLM, Jumps]:
    lm = CausalLM.load(args.model or default_model_dir(), device=args.device)
    jumps: Jumps = {}
    for item in args.jumps.split(","):
        name, _, path = item.partition("=")
        artifact = JumpArtifact.load(path)
        artifact.check_model(lm)
        jumps[name] = artifact.jump.to(lm.device)
    return lm, jumps


def run(args: argparse.Namespace) -> dict[str, Any]:
    lm, jumps = load(args)
    args.min_layer = args.min_layer or max(1, lm.num_layers // 3)
    corpus = args.corpus or str(wiki_split("test"))
    prompts = held_out_prompts(lm, corpus, args.prompts)
    primary = next(iter(jumps.values()))
    results: dict[str, Any] = {"model": lm.name, "num_layers": lm.num_layers, "corpus": corpus,
                               "args": {k: v for k, v in vars(args).items() if k != "out"}}
    results["cost_ms"] = {k: v * 1e3 for k, v in micro(lm, primary, repeats=50).items()}
    t0 = time.perf_counter()
    sections = set(args.sections.split(","))
    if "quality" in sections:
        results["quality"] = quality(lm, jumps, prompts, continuations(lm, prompts, args.new_tokens), args)
    if "speed" in sections:
        results["speed"] = speed(lm, jumps, prompts[: args.speed_prompts], args)
    if "drift" in sections:
        results["drift"] = drift(lm, primary, prompts[: args.drift_prompts], args)
    results["seconds"] = time.perf_counter() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.thresholds, args.speed_thresholds = _floats(args.thresholds), _floats(args.speed_thresholds)
    args.exact_thresholds = _floats(args.exact_thresholds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, out)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
