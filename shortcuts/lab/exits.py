"""``onejump agreement`` and the calibration of a whole exit setting.

``run_agreement``: the full model continues the prompts greedily; one teacher-forced pass tabulates
every level's exit head (``agreement.level_table``); the artifact's stored setting (or the one given)
is replayed on it: greedy agreement with its 95% bootstrap lower bound over prompts, exit depth, the
perfect-gate ceiling, and the speed-up predicted from costs measured on this machine
(``costs.measure``). Needs neither the working directory's cache nor the Wikipedia corpus.

``calibrate_setting``: the search (``agreement.search``) over gate kinds (confidence, entropy and,
when the artifact has one, its learned gate) x thresholds x first level x stride, ranked by
predicted speed with the lower bound >= target; what it stores in the artifact:

- ``extra["calibration"]``: the best setting of any gate and stride: what the server defaults to
  (``service/loading.py`` reads gate, threshold, min_layer and stride) and ``onejump agreement``
  replays;
- ``extra["gate"]``: the learned gate with its calibrated threshold and levels;
- ``extra["calibration_search"]``: the best of each gate kind, and ``extra["costs_ms"]``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.lab.agreement import LevelTable, Setting


@dataclass
class AgreementConfig:
    jump: str
    prompts: str
    model: str | None = None  # None: the artifact's base model if it is a folder here, else the SmolLM2 asset
    max_prompts: int = 50
    new_tokens: int = 32
    gate: str | None = None  # flags given override the stored setting
    threshold: float | None = None
    min_layer: int | None = None
    stride: int | None = None
    costs: str = "measured"  # measured | flops
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None


def stored_setting(extra: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The setting an artifact carries (its calibration), else confidence 0.9 from L/3."""
    s = extra.get("calibration") or {}
    return {"gate": s.get("gate", "confidence"), "threshold": float(s.get("threshold", 0.9)),
            "min_layer": int(s.get("min_layer", max(1, num_layers // 3))), "stride": int(s.get("stride", 1))}


def resolve_model(cfg_model: str | None, artifact: JumpArtifact) -> str:
    from pathlib import Path

    from shortcuts.assets import default_model_dir

    if cfg_model:
        return cfg_model
    base = Path(artifact.base_model)
    return str(base) if base.is_absolute() and base.is_dir() else str(default_model_dir())


def learned_gate_of(extra: dict[str, Any]) -> LearnedGate | None:
    from shortcuts.engine.learned_gate import LearnedGate

    return LearnedGate.from_dict(extra["gate"]) if extra.get("gate", {}).get("kind") == "learned" else None


def run_agreement(cfg: AgreementConfig) -> dict[str, Any]:
    import torch

    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.exit_head import ExitHead
    from shortcuts.lab.agreement import (
        Setting,
        bootstrap_lower_bound,
        continuations,
        level_table,
        oracle_levels,
        predicted_speedup,
        replay_setting,
    )
    from shortcuts.lab.traces import read_prompts

    if cfg.max_prompts < 1 or cfg.new_tokens < 2:
        raise ValueError(f"max_prompts={cfg.max_prompts} must be >= 1 and new_tokens={cfg.new_tokens} >= 2")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    artifact = JumpArtifact.load(cfg.jump)
    lm = CausalLM.load(resolve_model(cfg.model, artifact), dtype=cfg.dtype, device=cfg.device)
    artifact.check_model(lm)
    L = lm.num_layers
    s = stored_setting(artifact.extra, L)
    given = {"gate": cfg.gate, "threshold": cfg.threshold, "min_layer": cfg.min_layer, "stride": cfg.stride}
    s.update({k: v for k, v in given.items() if v is not None})
    setting = Setting(s["gate"], s["threshold"], s["min_layer"], s["stride"])
    if not 1 <= setting.min_layer < L or setting.stride < 1:
        raise ValueError(f"min_layer={setting.min_layer} must be in [1, {L - 1}] and stride={setting.stride} >= 1")
    gate = learned_gate_of(artifact.extra)
    if setting.gate == "learned" and gate is None:
        raise ValueError(f"{cfg.jump} has no learned gate (extra['gate']); use --gate confidence or entropy")
    prompts = read_prompts(lm, cfg.prompts, cfg.max_prompts)
    jump = artifact.jump.to(lm.device)
    table = level_table(lm, ExitHead(lm, jump), prompts, continuations(lm, prompts, cfg.new_tokens),
                        with_entropy=setting.gate == "entropy")
    level, picked = replay_setting(table, setting, gate)
    agree = picked == table.final_top
    costs, skip, ms = _costs(cfg.costs, lm, jump, gate, setting.gate)
    first = oracle_levels(table)["first_hit"].float().mean()
    exact = _exact_replay(artifact.extra, table, costs, skip, given)
    return {
        "agreement": float(agree.float().mean()), "agreement_lower": bootstrap_lower_bound(agree, table.prompt),
        "mean_exit_layer": float(level.float().mean()), "num_layers": L,
        "exit_rate": float((level < L).float().mean()), "ceiling_mean_exit_layer": float(first),
        "ceiling_speedup": L / float(first),
        "predicted_speedup": predicted_speedup(costs, level, setting, L, skip),
        "setting": asdict(setting), "exact": exact, "tokens": len(table), "prompts": table.num_prompts,
        "costs": {"source": cfg.costs, "check_blocks": costs.check, "head_blocks": costs.head,
                  "skipped_layer_blocks": skip, "ms": ms},
        "jump": cfg.jump, "model": lm.name,
    }


def _exact_replay(extra: dict[str, Any], table: LevelTable, costs: Any, skip: float,
                  given: dict[str, Any]) -> dict[str, Any] | None:
    """Exact mode's stored setting (``extra["calibration_exact"]``) replayed on the table: predicted
    speed-up and acceptance; None without one, or when flags set the exit fields."""
    from shortcuts.artifact import exact_setting
    from shortcuts.lab.exact import ExactCalibration, replay_exact

    stored = extra.get("calibration_exact") or {}
    gate = stored.get("gate", "confidence")
    own = None if any(v is not None for v in given.values()) else exact_setting(stored, gate)
    if own is None:
        return None
    c = ExactCalibration(gate, **own, predicted_speedup=0.0, drafted=0, accepted=0)
    return {"setting": own, **replay_exact(table, c, costs, skip)}


def _costs(kind: str, lm: CausalLM, jump: Any, gate: LearnedGate | None,
           gate_kind: str) -> tuple[Any, float, dict[str, float]]:
    from shortcuts.lab.agreement import CostModel

    if kind == "flops":
        return CostModel.from_model(lm, jump.config.rank if jump.is_pure else None), 0.0, {}
    if kind != "measured":
        raise ValueError(f"costs={kind!r} must be measured or flops")
    from shortcuts.lab.costs import cost_models, measure

    ms = measure(lm, jump, gate, repeats=20)
    models, skip = cost_models(ms)
    return models[gate_kind], skip, ms


# --- calibration of a whole setting ----------------------------------------------------------------------
@dataclass
class SearchSpace:
    gates: tuple[str, ...] = ("confidence", "entropy", "learned")
    min_layers: tuple[int, ...] = ()  # () = 1 and every sixth of the depth
    strides: tuple[int, ...] = (1, 2, 3, 4)
    target: float = 0.95
    confidence: float = 0.95
    extra: dict[str, Any] = field(default_factory=dict)

    def first_levels(self, num_layers: int) -> tuple[int, ...]:
        return self.min_layers or tuple(sorted({1, *(max(1, k * num_layers // 6) for k in range(1, 6))}))


def calibrate_setting(table: LevelTable, ms: dict[str, float], gate: LearnedGate | None,
                      space: SearchSpace) -> dict[str, Any]:
    """Search; returns {"calibration", "calibration_search", "skip"} as stored."""
    from shortcuts.lab.agreement import search
    from shortcuts.lab.costs import cost_models

    models, skip = cost_models(ms)
    gates = [g for g in space.gates if g in models and (g != "learned" or gate is not None)]
    L = table.num_layers
    best = search(table, space.target, {g: models[g] for g in gates}, gate, space.first_levels(L), space.strides,
                  skip, space.confidence)
    top = max(best.values(), key=lambda c: c.predicted_speedup)
    return {"calibration": top.as_dict(), "calibration_search": {g: c.as_dict() for g, c in best.items()},
            "skip": skip}


def store(artifact: JumpArtifact, found: dict[str, Any], gate: LearnedGate | None, ms: dict[str, float],
          provenance: dict[str, Any]) -> None:
    """Write a calibration's result into the artifact's metadata (see the module docstring)."""
    ex = artifact.extra
    ex.pop("exit_setting", None)  # older artifacts kept the best setting apart from what the server ran
    ex["calibration"] = {**found["calibration"], **provenance}
    ex["calibration_search"] = found["calibration_search"]
    ex["costs_ms"] = {k: round(v, 4) for k, v in ms.items()}
    if gate is not None:
        learned = found["calibration_search"].get("learned", {})
        gate.threshold = float(learned.get("threshold", 1.0))
        ex["gate"] = {**gate.to_dict(), "min_layer": learned.get("min_layer", 1), "stride": learned.get("stride", 1)}


def table_of(lm: CausalLM, artifact: JumpArtifact, prompts: list[list[int]], new_tokens: int) -> LevelTable:
    from shortcuts.engine.exit_head import ExitHead
    from shortcuts.lab.agreement import continuations, level_table

    conts = continuations(lm, prompts, new_tokens)
    return level_table(lm, ExitHead(lm, artifact.jump.to(lm.device)), prompts, conts, with_entropy=True)


def as_setting(d: dict[str, Any]) -> Setting:
    from shortcuts.lab.agreement import Setting

    return Setting(d["gate"], float(d["threshold"]), int(d.get("min_layer", 1)), int(d.get("stride", 1)))
