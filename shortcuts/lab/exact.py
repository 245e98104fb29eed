"""Exact mode's own calibration: the exit setting that makes self-speculative decoding fastest.

Exact mode's output is the full model's whatever the setting, so its setting is not bound by an
agreement target: what matters is how many drafts the full model accepts against what drafting
and verifying cost. ``exact_speedup`` replays a teacher-forced ``LevelTable`` as the engine runs
exact mode under greedy decoding (``SequenceRun.begin_step`` / ``verify``):

- a step whose gate fires drafts a token at its exit level (its blocks and checks are paid);
- a step that does not fire, or that would exceed ``max_draft``, goes to full depth and verifies:
  every block and the full head once, plus catch-up (each draft's skipped blocks, at the marginal
  cost of one more token in a chunk);
- the drafts up to the first wrong one are kept, then the full model's token: a cycle of m drafts
  yields m + 1 tokens when all are right, j + 1 when draft j (0-based) is the first wrong one, and
  the next cycle starts at that token. Rows after a wrong draft are replayed as if teacher-forced
  (their cost is what the table says; their tokens are thrown away, as the engine does).

``search_exact`` picks the best setting over gate thresholds x first levels x strides x
max_draft; when none is predicted faster than full depth, threshold 1.0: exact mode then never
drafts and costs what full depth does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from shortcuts.lab.agreement import CostModel, LevelTable, Setting, grid, replay_setting, setting_checks

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.jump import LowRankJumps


@dataclass(frozen=True)
class ExactCalibration:
    gate: str
    threshold: float
    min_layer: int
    stride: int
    max_draft: int
    predicted_speedup: float
    drafted: int
    accepted: int

    def as_dict(self) -> dict[str, float | int | str]:
        return {"mode": "exact", **self.__dict__}


def exact_speedup(table: LevelTable, level: Tensor, right: Tensor, checks: Tensor, max_draft: int,
                  cost: CostModel, skip: float) -> tuple[float, int, int]:
    """Predicted speed-up of exact mode over full depth, drafts made and drafts accepted; ``level``,
    ``right`` (the exit's token is the full model's), ``checks`` per table row (see module doc)."""
    L = table.num_layers
    step_cost = (level.float() + cost.check * checks.float()).tolist()
    catchup = (skip * (L - level).float()).tolist()
    lv, ok = level.tolist(), right.tolist()
    spent = made = drafted = accepted = 0.0
    for p in range(table.num_prompts):
        rows = torch.nonzero(table.prompt == p).flatten().tolist()
        t = 0
        while t < len(rows):
            m = 0
            while m < max_draft and t + m < len(rows) - 1 and lv[rows[t + m]] < L:
                m += 1
            cycle = rows[t : t + m]
            verify = rows[t + m]
            spent += sum(step_cost[r] + catchup[r] for r in cycle)
            spent += (L if m == max_draft else step_cost[verify]) + cost.head
            wrong = next((j for j, r in enumerate(cycle) if not ok[r]), m)
            drafted += m
            accepted += wrong
            out = wrong + 1
            made += out * (L + cost.head)
            t += out
    return made / spent, int(drafted), int(accepted)


def search_exact(table: LevelTable, cost: CostModel, skip: float, gate: str = "confidence",
                 min_layers: tuple[int, ...] = (1,), strides: tuple[int, ...] = (1,),
                 max_drafts: tuple[int, ...] = (1, 2, 4), keep: int = 1) -> list[ExactCalibration]:
    """The ``keep`` settings with the best predicted exact-mode speed-up, best first, each from a
    different (first level, stride, max_draft); the never-drafting threshold 1.0 when none beats 1.0."""
    L = table.num_layers
    best: dict[tuple[int, int, int], ExactCalibration] = {}
    for m in min_layers:
        for stride in strides:
            for threshold in grid(table, gate):
                s = Setting(gate, threshold, m, stride)
                level, picked = replay_setting(table, s)
                right, checks = picked == table.final_top, setting_checks(level, s, L)
                for d in max_drafts:
                    speed, drafted, accepted = exact_speedup(table, level, right, checks, d, cost, skip)
                    key = (m, stride, d)
                    if speed > 1.0 and (key not in best or speed > best[key].predicted_speedup):
                        best[key] = ExactCalibration(gate, threshold, m, stride, d, speed, drafted, accepted)
    ranked = sorted(best.values(), key=lambda c: -c.predicted_speedup)[:keep]
    return ranked or [NEVER]


NEVER = ExactCalibration("confidence", 1.0, 1, 1, 1, 1.0, 0, 0)


def timed_choice(lm: CausalLM, jump: LowRankJumps, prompts: list[list[int]], candidates: list[ExactCalibration],
                 new_tokens: int, margin: float = 1.03) -> tuple[ExactCalibration, dict[str, float]]:
    """Time exact mode under each candidate and under ``NEVER`` (full depth, no checks) with the engine,
    interleaved prompt by prompt; the fastest candidate if it beats ``NEVER`` by ``margin``, else
    ``NEVER``. The predicted ranking leaves out the engine's per-step work (a draft step is a
    forward pass of its own), so the choice is made on time, not on the prediction."""
    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.settings import ExitSettings, GenerationSettings
    from shortcuts.lab.speed import Arm, time_arms

    dec = EarlyExitDecoder(lm, jump)
    arms: dict[str, Arm] = {}
    for c in [NEVER, *candidates]:
        exits = ExitSettings(mode="exact", gate=c.gate, threshold=c.threshold,  # type: ignore[arg-type]
                             min_layer=c.min_layer, stride=c.stride, max_draft=c.max_draft)
        g = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=exits)
        arms[_name(c)] = lambda ids, g=g: dec.generate(ids, g).tokens  # type: ignore[misc]
    timed = time_arms(arms, prompts)
    tok_s = {k: sum(map(len, v["tokens"])) / v["seconds"] for k, v in timed.items()}
    speed = {k: v / tok_s[_name(NEVER)] for k, v in tok_s.items()}
    best = max(candidates, key=lambda c: speed[_name(c)], default=NEVER)
    return (best if speed.get(_name(best), 0.0) >= margin else NEVER), speed


def _name(c: ExactCalibration) -> str:
    return f"{c.threshold:g}@{c.min_layer}/{c.stride} x{c.max_draft}"


def replay_exact(table: LevelTable, c: ExactCalibration, cost: CostModel, skip: float) -> dict[str, float]:
    """The stored exact setting replayed on another table: predicted speed-up and acceptance."""
    s = Setting(c.gate, c.threshold, c.min_layer, c.stride)
    level, picked = replay_setting(table, s)
    checks = setting_checks(level, s, table.num_layers)
    speed, drafted, accepted = exact_speedup(table, level, picked == table.final_top, checks, c.max_draft, cost, skip)
    return {"predicted_speedup": round(speed, 4), "drafted": drafted, "accepted": accepted,
            "acceptance": round(accepted / max(drafted, 1), 4), "tokens": len(table)}


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.exit_head import ExitHead
    from shortcuts.lab.agreement import bootstrap_lower_bound, continuations, level_table, predicted_speedup
    from shortcuts.lab.costs import cost_models, measure
    from shortcuts.lab.exits import SearchSpace, as_setting, calibrate_setting, resolve_model, store
    from shortcuts.lab.traces import parse_study, split_args, val_test_prompts

    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.exact", description=__doc__.split("\n\n")[0])
    p.add_argument("--jump", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True, help="folder for exact.json (and the artifact with --write)")
    split_args(p, val=96)
    p.add_argument("--timed", type=int, default=12, help="validation prompts the exact candidates are timed on")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--write", action="store_true", help="store both calibrations in a copy of the artifact")
    a, out = parse_study(p, argv)
    art = JumpArtifact.load(a.jump)
    lm = CausalLM.load(resolve_model(a.model, art))
    art.check_model(lm)
    head = ExitHead(lm, art.jump.to(lm.device))
    prompts = val_test_prompts(lm, a.val, a.test)
    tables = {k: level_table(lm, head, v, continuations(lm, v, a.new_tokens), with_entropy=False)
              for k, v in prompts.items()}
    ms = measure(lm, art.jump, None, repeats=20)
    models, skip = cost_models(ms)
    cost, L = models["confidence"], lm.num_layers
    space = SearchSpace(gates=("confidence",))
    found = calibrate_setting(tables["val"], ms, None, space)
    s = as_setting(found["calibration"])
    level, picked = replay_setting(tables["test"], s)
    agree = picked == tables["test"].final_top
    ranked = search_exact(tables["val"], cost, skip, min_layers=space.first_levels(L), strides=space.strides,
                          keep=a.candidates)
    exact, timed = timed_choice(lm, art.jump, prompts["val"][: a.timed], [c for c in ranked if c != NEVER],
                                a.new_tokens)
    result = {"jump": a.jump, "costs_ms": ms, "cost_blocks": {"check": cost.check, "head": cost.head, "skip": skip},
              "approximate": {"calibration": found["calibration"],
                              "test": {"agreement": float(agree.float().mean()),
                                       "agreement_lower": bootstrap_lower_bound(agree, tables["test"].prompt),
                                       "mean_exit_layer": float(level.float().mean()),
                                       "predicted_speedup": predicted_speedup(cost, level, s, L, skip)}},
              "exact": {"calibration": exact.as_dict(), "test": replay_exact(tables["test"], exact, cost, skip),
                        "candidates": [c.as_dict() for c in ranked], "timed_speedup_vs_never": timed}}
    (out / "exact.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cost_blocks", "approximate", "exact")}, indent=1))
    if a.write:
        store(art, found, None, ms, {"corpus": "validation articles of wiki/train.jsonl", "new_tokens": a.new_tokens})
        art.extra["calibration_exact"] = exact.as_dict()
        art.extra["exits_test"] = {"confidence": result["approximate"]["test"], "exact": result["exact"]["test"]}
        art.save(out / Path(a.jump).name)


if __name__ == "__main__":
    main()
