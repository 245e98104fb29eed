"""Which exit head at which level: the jump, or the logit lens (the model's own final norm and head on
h_l) where the lens predicts better, calibrated for its cost.

The lens beats a low-rank jump late in the depth (from about two thirds of it: a rank-r jump cannot
copy h, the lens is exact at the top), but a lens check costs a full head (V·d) where a fused jump
check costs d·r + V·r. So the choice is made by the calibration itself: each option (the jump at every
level; the lens at the levels where its precision@1 on the calibration prompts beats the jump's) is
searched with its own check costs (``costs.cost_models``) and the faster at the target agreement wins.
Both options' tables come from one pass (``table.level_tables``): the jump's at every level and the
lens's at the candidate levels; ``merge`` takes the lens's columns at the lens levels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from shortcuts.calibration.replay import fit_learned_gate, oracle_levels
from shortcuts.calibration.search import Found, SearchSpace, calibrate
from shortcuts.calibration.table import LevelTable
from shortcuts.engine.learned_gate import LearnedGate

JUMP, LENS = "jump", "lens"


def lens_candidates(num_layers: int) -> tuple[int, ...]:
    """The levels where the lens is tabulated: the upper third (below it the jumps predict better on every
    model measured, docs/exits.md; each level's lens costs a full head per calibration row)."""
    return tuple(range(max(1, (2 * num_layers) // 3), num_layers))


def precision(table: LevelTable) -> Tensor:
    """(L-1,) precision@1 of the table's exit head at each level (its top-1 is the full model's)."""
    return (table.top == table.final_top[:, None]).float().mean(0)


def better_levels(jump: LevelTable, lens: LevelTable) -> tuple[int, ...]:
    """The levels where the lens's precision@1 beats the jump's."""
    pj, pl = precision(jump), precision(lens)
    return tuple(int(i) + 1 for i in torch.nonzero(pl > pj).flatten())


def merge(jump: LevelTable, lens: LevelTable, levels: tuple[int, ...]) -> LevelTable:
    """The table of an exit head that is the lens at ``levels`` and the jump elsewhere."""
    if not levels:
        return jump
    cols = torch.tensor([lv - 1 for lv in levels])

    def take(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None:
            return a
        out = a.clone()
        out[:, cols] = b[:, cols]
        return out

    per_level = ("confidence", "entropy", "top", "margin")
    return replace(jump, **{f.name: take(getattr(jump, f.name), getattr(lens, f.name))  # type: ignore[arg-type]
                            for f in fields(jump) if f.name in per_level})


@dataclass
class HeadChoice:
    """One option's calibration: its lens levels, what the search found, its learned gate, its ceiling."""

    lens_levels: tuple[int, ...]
    found: Found
    learned: LearnedGate | None
    ceiling_mean_exit: float

    @property
    def speedup(self) -> float:
        return self.found.best.predicted_speedup

    def report(self, num_layers: int) -> dict[str, Any]:
        return {"lens_levels": list(self.lens_levels), "best": self.found.best.as_dict(),
                "by_gate": {g: c.as_dict() for g, c in self.found.by_gate.items()},
                "ceiling_mean_exit": round(self.ceiling_mean_exit, 3),
                "ceiling_speedup": round(num_layers / self.ceiling_mean_exit, 4)}


def calibrate_heads(val: dict[str, LevelTable], ms: dict[str, float], space: SearchSpace,
                    fit: dict[str, LevelTable] | None = None, learned: LearnedGate | None = None,
                    lens: bool = True, only: tuple[int, ...] | None = None) -> tuple[HeadChoice, dict[str, HeadChoice]]:
    """Search each option (``JUMP``: the jump at every level; ``LENS``: the lens where it predicts better on
    ``val``) and return the fastest at the target and every option's result. ``val``/``fit``: tables of the
    jump (``JUMP``) and of the lens (``LENS``) on the calibration prompts and on the learned gate's training
    prompts; with ``fit`` the learned gate is fitted per option, else ``learned`` is used as given. ``only``:
    search that option alone (lens levels given, () for the jump everywhere)."""
    options: dict[str, tuple[int, ...]] = {JUMP: ()}
    if only is not None:
        options = {LENS if only else JUMP: tuple(only)}
    elif lens and LENS in val and (better := better_levels(val[JUMP], val[LENS])):
        options[LENS] = better
    out: dict[str, HeadChoice] = {}
    for name, levels in options.items():
        table = merge(val[JUMP], val[LENS], levels) if levels else val[JUMP]
        gate = learned
        if fit is not None and "learned" in space.gates:
            gate = fit_learned_gate(merge(fit[JUMP], fit[LENS], levels) if levels else fit[JUMP])
        found = calibrate(table, ms, gate, space, levels)
        first = float(oracle_levels(table)["first_hit"].float().mean())
        out[name] = HeadChoice(levels, found, gate, first)
    best = max(out.values(), key=lambda c: c.speedup)  # the jump first: ties keep the cheaper head
    return best, out
