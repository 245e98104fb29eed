"""Gate, calibrate and report jump variants on decode-matched traces; save the calibrated artifacts.

    python -m shortcuts.lab.exits_ship --traces runs/exits/smollm2 --out runs/exits/smollm2/ship \\
        --jumps "served=docs/results/smollm2-135m/jump.safetensors,new=runs/.../x.safetensors" --identity

For each jump: the learned gate is fitted on the teacher-forced table of the *fit* prompts; costs
are measured here (``calibration.costs.measure``); the search (``calibration.search.calibrate``: gate kind x threshold
x first level x stride, lower bound >= target) runs on the *validation* prompts (other articles);
every gate kind's chosen setting is then replayed on the *test* prompts (test articles) and the
out-of-domain prompts, which chose nothing. The variant with the best predicted speed on
validation is the one to ship.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.calibrate import store
from shortcuts.calibration.costs import cost_models, measure, predicted_speedup
from shortcuts.calibration.replay import bootstrap_lower_bound, fit_learned_gate, oracle_levels, replay
from shortcuts.calibration.search import Calibration, SearchSpace, calibrate
from shortcuts.calibration.table import LevelTable
from shortcuts.calibration.traces import Traces
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.heads import HeadContext
from shortcuts.jump import LowRankJumps
from shortcuts.lab.exits_study import table_for


def report(table: LevelTable, found: Calibration, gate: LearnedGate | None, ms: dict[str, float]) -> dict[str, Any]:
    s = found.exit_settings()
    models, skip = cost_models(ms)
    level, picked = replay(table, s, gate)
    agree = picked == table.final_top
    L = table.num_layers
    return {"agreement": round(float(agree.float().mean()), 4),
            "lower": round(bootstrap_lower_bound(agree, table.prompt), 4),
            "mean_exit": round(float(level.float().mean()), 3),
            "exit_rate": round(float((level < L).float().mean()), 4),
            "predicted_speedup": round(predicted_speedup(models[s.gate], level, s, L, skip), 4),
            "predicted_speedup_skips_free": round(predicted_speedup(models[s.gate], level, s, L, 0.0), 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    src, out = Path(args.traces), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "traces.json").read_text())
    lm = CausalLM.load(args.model or meta["model"])
    ctx = HeadContext.from_model(lm)
    L = lm.num_layers
    tr = {k: Traces.load(src / f"traces-{k}.safetensors") for k in ("fit", "val", "test", "ood")}
    keep = tr["fit"].prompt < args.gate_prompts  # the learned gate's training prompts: the first fit prompts
    tr["fit"] = Traces(tr["fit"].states[keep], tr["fit"].prompt[keep], tr["fit"].step[keep])
    jumps: dict[str, str | None] = dict(kv.split("=", 1) for kv in args.jumps.split(",")) if args.jumps else {}
    if args.identity:
        jumps = {"identity": None, **jumps}
    space = SearchSpace(tuple(args.gates), tuple(args.min_layers), tuple(args.strides), args.target)
    results: dict[str, Any] = {}
    for name, path in jumps.items():
        art = JumpArtifact.load(path) if path else None
        jump: LowRankJumps | None = art.jump if art else None
        tables = {k: table_for(lm, ctx, jump, tr[k], with_entropy=k != "fit") for k in ("fit", "val", "test", "ood")}
        gate = fit_learned_gate(tables["fit"])
        ms = measure(lm, jump, gate, repeats=args.repeats)
        found = calibrate(tables["val"], ms, gate, space)
        entry: dict[str, Any] = {"costs_ms": {k: round(v, 4) for k, v in ms.items()}, "skip": round(found.skip, 4),
                                 "chosen": {g: c.as_dict() for g, c in found.by_gate.items()},
                                 "calibration": found.best.as_dict()}
        for split in ("test", "ood"):
            first = oracle_levels(tables[split])["first_hit"].float().mean()
            entry[split] = {"ceiling_mean_exit": round(float(first), 3), "ceiling_speedup": round(L / float(first), 4),
                            **{g: report(tables[split], c, gate, ms) for g, c in found.by_gate.items()}}
        results[name] = entry
        print(name, json.dumps({k: entry[k] for k in ("calibration", "test")}, default=str), flush=True)
        if art is not None:
            store(art, found, gate, ms, {"corpus": "validation articles of wiki/train.jsonl (decode-matched traces)",
                                         "new_tokens": meta["new_tokens"]})
            art.extra["exits_test"] = entry["test"]
            art.base_model = args.base_model or art.base_model
            art.save(out / f"{name}.safetensors")
    (out / "ship.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.exits_ship", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--jumps", default="", help="name=artifact,... ")
    p.add_argument("--base-model", default=None,
                   help="the base model id written into the saved artifacts (default: each artifact's own)")
    p.add_argument("--identity", action="store_true", help="also the identity exit head (logit lens)")
    p.add_argument("--gates", nargs="+", default=["confidence", "entropy", "learned"])
    p.add_argument("--min-layers", type=int, nargs="+", default=[])
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--gate-prompts", type=int, default=150, help="fit prompts whose table trains the learned gate")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a)


if __name__ == "__main__":
    main()
