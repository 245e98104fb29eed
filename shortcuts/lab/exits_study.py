"""Which single jump, trained on what, chosen how: every change's effect on precision@1 per level
and on the perfect-gate ceiling, on held-out prompts (docs/exits.md).

    python -m shortcuts.lab.exits_study --traces runs/exits/smollm2 --out runs/exits/smollm2/study

Reads what ``shortcuts.lab.traces`` wrote (decode-matched states of fit / validation / test /
out-of-domain prompts, and sentence-position states), trains per-level banks and shared jumps on
the fit split only, chooses OJFA jumps on the validation split (other articles), and reports on
the test split (test articles) and on the out-of-domain prompts (Python docstrings):

- data: ``sent`` (one random position of a Wikipedia sentence, the old collection) or ``dec`` (the
  model's own greedy continuations, positions inside the continuation);
- objective: MSE to the final state, then KL to the full model's distribution (warm start);
- the shared jump: OJFA by the paper's score, by the centred score, by the centred score with
  per-level input normalisation (``+ln``), or one jump trained jointly on every level (``joint``,
  ``joint+ln`` on per-level standardised inputs).
Every shared jump is saved under ``<out>/jumps/`` as an artifact for the later steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.replay import oracle_levels
from shortcuts.calibration.table import LevelTable, states_table
from shortcuts.calibration.traces import Traces
from shortcuts.collect import StateSet
from shortcuts.engine.exit_head import ExitHead
from shortcuts.evaluate import choose, evaluate_method, model_top1, ojfa_scores
from shortcuts.heads import HeadContext
from shortcuts.jump import LowRankJumps, cosine_score
from shortcuts.train import JointConfig, level_stats, train_per_level
from shortcuts.train import train_joint as joint


def train_joint(inputs: Tensor, final: Tensor, ctx: HeadContext, rank: int, level_norm: bool, epochs: int = 4,
                kl_epochs: int = 1, seed: int = 0) -> LowRankJumps:
    """One pure jump on all levels pooled: MSE then KL, on raw or per-level standardised inputs."""
    return joint(inputs, final, ctx, JointConfig(rank, epochs, kl_epochs, seed=seed, level_norm=level_norm))


def table_for(lm: CausalLM, ctx: HeadContext, jump: LowRankJumps | None, traces: Traces,
              with_entropy: bool = False) -> LevelTable:
    return states_table(ExitHead(lm, jump), ctx.full, traces.states, traces.prompt, lm.num_layers,
                        with_entropy=with_entropy)


def table_summary(table: LevelTable) -> dict[str, Any]:
    L = table.num_layers
    precision = (table.top == table.final_top[:, None]).float().mean(0)
    first = oracle_levels(table)["first_hit"].float().mean()
    return {"precision": [round(float(p), 4) for p in precision], "mean_precision": round(float(precision.mean()), 4),
            "ceiling_mean_exit": round(float(first), 3), "ceiling_speedup": round(L / float(first), 4)}


def sentence_precision(jump_at: Any, states: StateSet, ctx: HeadContext) -> dict[str, Any]:
    target = model_top1(states.final, ctx)
    p = evaluate_method(jump_at, states.by_level(), target, ctx).precision
    return {"precision": [round(x, 4) for x in p], "mean_precision": round(sum(p) / len(p), 4)}


def method_of(jump: LowRankJumps | None) -> Any:
    """index -> the plain jump used at that level (level-normalised jumps differ by level)."""
    if jump is None:
        return lambda _i: None
    if jump.n > 1:
        return jump.select
    return jump.at_level if jump.level_norm is not None else (lambda _i: jump)


def run(args: argparse.Namespace) -> dict[str, Any]:  # noqa: C901
    src, out = Path(args.traces), Path(args.out)
    (out / "jumps").mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "traces.json").read_text())
    lm = CausalLM.load(args.model or meta["model"])
    ctx = HeadContext.from_model(lm)
    L = lm.num_layers
    tr = {k: Traces.load(src / f"traces-{k}.safetensors") for k in ("fit", "val", "test", "ood")}
    sent = {k: StateSet.load(src / f"sentences-{k}.safetensors") for k in ("fit", "test", "ood")}
    rows = tr["fit"].sample(args.per_prompt, seed=0)
    data = {"dec": (tr["fit"].levels(rows), tr["fit"].final(rows)),
            "sent": (sent["fit"].by_level()[:, : len(rows)], sent["fit"].final[: len(rows)])}
    vrows = tr["val"].sample(4, seed=1)
    val_x, val_y = tr["val"].levels(vrows), tr["val"].final(vrows)
    mean_final = data["dec"][1].mean(0)
    stats = level_stats(data["dec"][0])
    results: dict[str, Any] = {"samples": {k: int(v[0].shape[1]) for k, v in data.items()}, "rank": args.rank,
                               "val_samples": int(val_x.shape[1]), "methods": {}, "choices": {}, "timing_s": {}}
    shared: dict[str, LowRankJumps | None] = {"identity": None}
    t0 = time.perf_counter()
    for name in args.data if args.banks else ():
        x, y = data[name]
        mse, kl = train_per_level(x, y, ctx, args.rank, args.kl_epochs)
        for obj, bank in (("mse", mse), ("kl", kl)):
            if obj == "mse" and name == "dec":
                continue  # the decode-matched MSE bank is only KL's warm start
            tag = f"{name}-{obj}"
            shared[f"all-level {tag}"] = bank
            paper = ojfa_scores(bank, val_x, val_y)
            centred = ojfa_scores(bank, val_x, val_y, center=mean_final)
            centred_ln = ojfa_scores(bank, val_x, val_y, center=mean_final, level_norm=stats)
            n = val_x.shape[1] * (L - 1)
            results["choices"][tag] = {"paper": [s / n for s in paper], "centred": [s / n for s in centred],
                                       "centred+ln": [s / n for s in centred_ln]}
            for how, scores in (("paper", paper), ("centred", centred)):
                j = choose(scores)
                shared[f"ojfa({how}) {tag}"] = bank.select(j)
                results["choices"][tag][f"chosen {how}"] = j + 1
            j = choose(centred_ln)
            results["choices"][tag]["chosen centred+ln"] = j + 1
            shared[f"ojfa(centred)+ln {tag}"] = bank.select(j).with_level_norm(*stats)
            shared[f"ojfa(paper)+ln {tag}"] = bank.select(choose(paper)).with_level_norm(*stats)
        results["timing_s"][f"banks {name}"] = round(time.perf_counter() - t0, 1)
    const = mean_final.expand(1, val_y.shape[0], -1)
    results["constant_predictor_score"] = {"paper": float(cosine_score(const, val_y)) / val_y.shape[0],
                                           "centred": 0.0}
    if "dec" in args.data and args.joint:
        x, y = data["dec"]
        if not args.keep or any(k in "joint dec-kl" for k in args.keep):
            shared["joint dec-kl"] = train_joint(x, y, ctx, args.rank, level_norm=False)
        shared["joint+ln dec-kl"] = train_joint(x, y, ctx, args.rank, level_norm=True)
        results["timing_s"]["joint"] = round(time.perf_counter() - t0, 1)
    if args.keep:
        shared = {k: v for k, v in shared.items() if any(key in k for key in args.keep)}
    for name, jump in shared.items():
        entry: dict[str, Any] = {"parameters": 0 if jump is None else jump.num_parameters()}
        entry["test"] = table_summary(table_for(lm, ctx, jump, tr["test"]))
        entry["sentences"] = sentence_precision(method_of(jump), sent["test"], ctx)
        if name == "identity" or name.startswith(("ojfa(paper) sent-kl", "ojfa(centred)+ln", "joint")):
            entry["ood"] = table_summary(table_for(lm, ctx, jump, tr["ood"]))
        results["methods"][name] = entry
        print(f"{name:32s} params {entry['parameters']:>8d}  test p@1 {entry['test']['mean_precision']:.3f}  "
              f"ceiling {entry['test']['ceiling_speedup']:.3f}x  sentences {entry['sentences']['mean_precision']:.3f}"
              + (f"  ood {entry['ood']['mean_precision']:.3f} / {entry['ood']['ceiling_speedup']:.3f}x"
                 if "ood" in entry else ""), flush=True)
        if jump is not None and jump.n == 1:
            safe = name.replace(" ", "_").replace("(", "-").replace(")", "").replace("+", "-")
            JumpArtifact(jump, meta["model"], lm.fingerprint(), L, 0, [], "wiki/train.jsonl (fit articles)",
                         {"study": name, "test": entry["test"]}).save(out / "jumps" / f"{safe}.safetensors")
    results["timing_s"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "study.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.exits_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--per-prompt", type=int, default=6, help="training samples per fit prompt (decode steps)")
    p.add_argument("--kl-epochs", type=int, default=3)
    p.add_argument("--data", nargs="+", default=["sent", "dec"])
    p.add_argument("--no-joint", dest="joint", action="store_false")
    p.add_argument("--no-banks", dest="banks", action="store_false", help="train only the joint jumps")
    p.add_argument("--keep", nargs="*", default=[], help="report only methods whose name contains one of these")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run(a)


if __name__ == "__main__":
    main()
