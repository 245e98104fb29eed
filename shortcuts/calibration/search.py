"""The search for approximate mode's exit setting: among gate kinds x thresholds x first levels x
strides replayed on a ``LevelTable``, the one with the best predicted speed-up (``costs``) whose
bootstrap lower bound (over prompts) on greedy agreement reaches the target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from shortcuts.calibration.config import CALIBRATED_GATES
from shortcuts.calibration.costs import CostModel, cost_models, predicted_speedup
from shortcuts.calibration.replay import bootstrap_lower_bound, replay
from shortcuts.calibration.setting import ModeSetting
from shortcuts.calibration.table import LevelTable
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import ExitSettings

PATIENCES = (2, 3, 4, 5)  # the patience gate's grid: the same top-1 at this many checked levels in a row


@dataclass
class Calibration:
    """A setting the search found (gate, threshold, min_layer, stride) and what it measured."""

    gate: str
    threshold: float
    target: float
    confidence: float
    agreement: float
    lower_bound: float
    mean_exit_layer: float
    min_layer: int
    stride: int
    tokens: int
    prompts: int
    predicted_speedup: float = 1.0
    patience: int = 2  # the patience gate's checks in a row (its grid; other gates ignore it)

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    def exit_settings(self) -> ExitSettings:
        """The setting as approximate mode runs it."""
        return ExitSettings(mode="approximate", gate=self.gate, threshold=self.threshold,  # type: ignore[arg-type]
                            min_layer=self.min_layer, stride=self.stride, patience=self.patience)

    def mode_setting(self, **provenance: Any) -> ModeSetting:
        """The setting as an artifact stores it; the measurements (and ``provenance``) as ``measured``."""
        kept = ("gate", "threshold", "min_layer", "stride", "patience")
        measured = {k: v for k, v in self.as_dict().items() if k not in kept}
        return ModeSetting(gate=self.gate, threshold=self.threshold, min_layer=self.min_layer,  # type: ignore[arg-type]
                           stride=self.stride, patience=self.patience, measured={**measured, **provenance})


def grid(table: LevelTable, gate: str) -> list[float]:
    """The thresholds tried for a gate kind (entropy's up to the table's largest entropy)."""
    if gate == "confidence":
        return [round(x, 3) for x in torch.linspace(0.05, 1.0, 96).tolist()]
    if gate == "learned":
        return [round(x, 4) for x in (torch.linspace(0.1, 0.99, 90).tolist() + [0.992, 0.995, 0.997, 0.999])]
    if gate == "entropy":
        finite = table.entropy[table.entropy.isfinite()]
        return [round(x, 4) for x in torch.linspace(0.0, float(finite.max()) if len(finite) else 0.0, 96).tolist()]
    if gate == "patience":
        return [float(p) for p in PATIENCES]
    raise ValueError(f"gate={gate!r} cannot be calibrated; use one of {', '.join(CALIBRATED_GATES)}")


def search(table: LevelTable, target: float, costs: dict[str, CostModel], learned: LearnedGate | None = None,
           min_layers: tuple[int, ...] = (1,), strides: tuple[int, ...] = (1,), skip: float = 0.0,
           confidence: float = 0.95) -> dict[str, Calibration]:
    """For each gate kind in ``costs`` (confidence, entropy, learned, patience), over thresholds (patience:
    checks in a row) x first levels x strides, the setting with the best predicted speed-up whose bootstrap
    lower bound on agreement reaches ``target``; when none does, the never-exiting confidence threshold 1.0
    (speed-up 1.0)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{target=} must be in (0, 1]")
    if "entropy" in costs and bool(table.entropy.isnan().any()):
        raise ValueError("the table was built without entropies (with_entropy=False); the entropy gate needs them")
    L, out = table.num_layers, {}
    bar = tqdm(total=len(costs) * len(min_layers) * len(strides), desc="search", unit="level x stride",
               disable=len(table) < 1000)
    for g, cost in costs.items():
        best = Calibration("confidence", 1.0, target, confidence, 1.0, 1.0, float(L), min(min_layers), min(strides),
                           len(table), table.num_prompts, 1.0)
        for m in min_layers:
            for stride in strides:
                bar.update()
                for t in grid(table, g):
                    p = int(t) if g == "patience" else 2
                    t = 0.0 if g == "patience" else t
                    s = ExitSettings(mode="approximate", gate=g, threshold=t, min_layer=m, stride=stride,  # type: ignore[arg-type]
                                     patience=p)
                    level, picked = replay(table, s, learned)
                    speed = predicted_speedup(cost, level, s, L, skip)
                    if speed <= best.predicted_speedup:
                        continue
                    agree = picked == table.final_top
                    bound = bootstrap_lower_bound(agree, table.prompt, confidence)
                    if bound >= target:
                        best = Calibration(g, t, target, confidence, float(agree.float().mean()), bound,
                                           float(level.float().mean()), m, stride, len(table), table.num_prompts,
                                           speed, p)
        out[g] = best
    bar.close()
    return out


def fastest(found: dict[str, Calibration]) -> Calibration:
    """The search's best setting of any gate kind (the first of equals, in the order searched)."""
    return max(found.values(), key=lambda c: c.predicted_speedup)


@dataclass
class SearchSpace:
    gates: tuple[str, ...] = CALIBRATED_GATES
    min_layers: tuple[int, ...] = ()  # () = 1 and every sixth of the depth
    strides: tuple[int, ...] = (1, 2, 3, 4)
    target: float = 0.95
    confidence: float = 0.95
    extra: dict[str, Any] = field(default_factory=dict)

    def first_levels(self, num_layers: int) -> tuple[int, ...]:
        return self.min_layers or tuple(sorted({1, *(max(1, k * num_layers // 6) for k in range(1, 6))}))


@dataclass
class Found:
    """What ``calibrate`` found: the best setting of each gate kind, the fastest of them, and the cost of
    a skipped layer (blocks) it ranked with."""

    by_gate: dict[str, Calibration]
    skip: float

    @property
    def best(self) -> Calibration:
        return fastest(self.by_gate)


def calibrate(table: LevelTable, ms: dict[str, float], learned: LearnedGate | None, space: SearchSpace,
              lens_levels: tuple[int, ...] = ()) -> Found:
    """The search over ``space`` with the costs ``ms`` measured here (``costs.measure``); the learned gate
    takes part when there is one. ``lens_levels``: the levels whose exit head (in ``table``) is the logit
    lens, whose checks cost a full head."""
    models, skip = cost_models(ms, lens_levels)
    gates = [g for g in space.gates if g in models and (g != "learned" or learned is not None)]
    L = table.num_layers
    by_gate = search(table, space.target, {g: models[g] for g in gates}, learned, space.first_levels(L),
                     space.strides, skip, space.confidence)
    return Found(by_gate, skip)
