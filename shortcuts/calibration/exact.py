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
drafts and costs what full depth does. ``timed_choice`` times the best candidates with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.calibration.costs import CostModel
from shortcuts.calibration.replay import checks, replay
from shortcuts.calibration.search import grid
from shortcuts.calibration.setting import ModeSetting
from shortcuts.calibration.table import LevelTable
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import ExitSettings, GenerationSettings, Quantization
from shortcuts.jump import LowRankJumps
from shortcuts.timing import Arm, time_arms


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

    def exit_settings(self) -> ExitSettings:
        """The setting as exact mode runs it."""
        return ExitSettings(mode="exact", gate=self.gate, threshold=self.threshold,  # type: ignore[arg-type]
                            min_layer=self.min_layer, stride=self.stride, max_draft=self.max_draft)

    def mode_setting(self, **provenance: object) -> ModeSetting:
        """As an artifact stores it; never drafting (``NEVER``) is said by name: draft "none"."""
        never = self.gate in ("confidence", "learned") and self.threshold >= 1.0
        return ModeSetting(gate=self.gate, threshold=self.threshold, min_layer=self.min_layer,  # type: ignore[arg-type]
                           stride=self.stride, max_draft=self.max_draft, draft="none" if never else "exit",
                           measured={"predicted_speedup": self.predicted_speedup, "drafted": self.drafted,
                                     "accepted": self.accepted, **provenance})


NEVER = ExactCalibration("confidence", 1.0, 1, 1, 1, 1.0, 0, 0)


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
                s = ExitSettings(mode="approximate", gate=gate, threshold=threshold, min_layer=m, stride=stride)  # type: ignore[arg-type]
                level, picked = replay(table, s)
                right, paid = picked == table.final_top, checks(level, s, L)
                for d in max_drafts:
                    speed, drafted, accepted = exact_speedup(table, level, right, paid, d, cost, skip)
                    key = (m, stride, d)
                    if speed > 1.0 and (key not in best or speed > best[key].predicted_speedup):
                        best[key] = ExactCalibration(gate, threshold, m, stride, d, speed, drafted, accepted)
    ranked = sorted(best.values(), key=lambda c: -c.predicted_speedup)[:keep]
    return ranked or [NEVER]


def timed_choice(lm: CausalLM, jump: LowRankJumps, prompts: list[list[int]], candidates: list[ExactCalibration],
                 new_tokens: int, margin: float = 1.03,
                 quantization: Quantization = "none") -> tuple[ExactCalibration, dict[str, float]]:
    """Time exact mode under each candidate and under ``NEVER`` (full depth, no checks) with the engine,
    interleaved prompt by prompt; the fastest candidate if it beats ``NEVER`` by ``margin``, else
    ``NEVER``. The predicted ranking leaves out the engine's per-step work (a draft step is a
    forward pass of its own), so the choice is made on time, not on the prediction. ``quantization``:
    the engine's weight format timed."""
    dec = EarlyExitDecoder(lm, jump, quantization=quantization)
    arms: dict[str, Arm] = {}
    for c in [NEVER, *candidates]:
        g = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=c.exit_settings())
        arms[_name(c)] = lambda ids, g=g: dec.generate(ids, g).tokens  # type: ignore[misc]
    timed = time_arms(arms, prompts)
    tok_s = {k: sum(map(len, v["tokens"])) / v["seconds"] for k, v in timed.items()}
    speed = {k: v / tok_s[_name(NEVER)] for k, v in tok_s.items()}
    best = max(candidates, key=lambda c: speed[_name(c)], default=NEVER)
    return (best if speed.get(_name(best), 0.0) >= margin else NEVER), speed


def _name(c: ExactCalibration) -> str:
    return f"{c.threshold:g}@{c.min_layer}/{c.stride} x{c.max_draft}"


def replay_exact(table: LevelTable, s: ExitSettings, cost: CostModel, skip: float,
                 learned: LearnedGate | None = None) -> dict[str, float]:
    """Exact mode's setting ``s`` replayed on a table: predicted speed-up and acceptance. Draft "none"
    never drafts (speed-up 1.0)."""
    drafting = ExitSettings(mode="approximate", gate=s.gate, threshold=s.threshold, min_layer=s.min_layer,
                            stride=s.stride, patience=s.patience)
    level, picked = replay(table, drafting, learned)
    if s.draft == "none":
        level = torch.full_like(level, table.num_layers)
    paid = checks(level, drafting, table.num_layers) if s.draft != "none" else torch.zeros_like(level)
    speed, drafted, accepted = exact_speedup(table, level, picked == table.final_top, paid, s.max_draft, cost, skip)
    return {"predicted_speedup": round(speed, 4), "drafted": drafted, "accepted": accepted,
            "acceptance": round(accepted / max(drafted, 1), 4), "tokens": len(table)}
