"""``onejump agreement``: the artifact's exit setting replayed on anyone's prompts.

The full model continues the prompts greedily; one teacher-forced pass tabulates every level's exit
head (``table.level_table``); the setting the server would run (``setting.resolve``: the flags given,
then the artifact's stored setting, then built-ins) is replayed on it: greedy agreement with its 95%
bootstrap lower bound over prompts, exit depth, the perfect-gate ceiling, and the speed-up predicted
from costs measured on this machine (``costs.measure``); exact mode's setting likewise (predicted
speed-up and acceptance). Needs neither the working directory's cache nor the Wikipedia corpus.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.assets import default_model_dir
from shortcuts.calibration.calibrate import precision_engine
from shortcuts.calibration.config import AgreementConfig
from shortcuts.calibration.costs import CostModel, cost_models, measure, predicted_speedup
from shortcuts.calibration.exact import replay_exact
from shortcuts.calibration.replay import bootstrap_lower_bound, oracle_levels, replay
from shortcuts.calibration.setting import Overrides, StoredCalibration, resolve_modes
from shortcuts.calibration.table import continued_table
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.jump import LowRankJumps
from shortcuts.prompts import read_prompts


def resolve_model(cfg_model: str | None, artifact: JumpArtifact) -> str:
    """The model to load: the one named, else the artifact's base model when it is a folder here, else
    the SmolLM2 asset."""
    if cfg_model:
        return cfg_model
    base = Path(artifact.base_model)
    return str(base) if base.is_absolute() and base.is_dir() else str(default_model_dir())


def run_agreement(cfg: AgreementConfig) -> dict[str, Any]:
    if cfg.max_prompts < 1 or cfg.new_tokens < 2:
        raise ValueError(f"max_prompts={cfg.max_prompts} must be >= 1 and new_tokens={cfg.new_tokens} >= 2")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    artifact = JumpArtifact.load(cfg.jump)
    lm = CausalLM.load(resolve_model(cfg.model, artifact), dtype=cfg.dtype, device=cfg.device)
    artifact.check_model(lm)
    L = lm.num_layers
    overrides = Overrides(gate=cfg.gate, threshold=cfg.threshold, min_layer=cfg.min_layer,  # type: ignore[arg-type]
                          stride=cfg.stride)
    modes = resolve_modes(StoredCalibration.from_extra(artifact.extra), overrides, L, cfg.quantization)
    s, exact = modes["approximate"].settings, modes["exact"].settings
    gate = LearnedGate.from_extra(artifact.extra)
    if gate is None and "learned" in (s.gate, exact.gate):
        raise ValueError(f"{cfg.jump} has no learned gate (extra['gate']); use --gate confidence or entropy")
    prompts = read_prompts(lm, cfg.prompts, cfg.max_prompts)
    jump = artifact.jump.to(lm.device)
    engine = precision_engine(lm, artifact, cfg.quantization, cfg.compile)
    head = engine.exit_head if engine is not None else ExitHead(lm, jump)
    table = continued_table(lm, head, prompts, cfg.new_tokens, with_entropy="entropy" in (s.gate, exact.gate),
                            engine=engine)
    level, picked = replay(table, s, gate)
    agree = picked == table.final_top
    models, skip, ms = _costs(cfg, lm, jump, gate)
    first = oracle_levels(table)["first_hit"].float().mean()
    return {
        "agreement": float(agree.float().mean()), "agreement_lower": bootstrap_lower_bound(agree, table.prompt),
        "mean_exit_layer": float(level.float().mean()), "num_layers": L,
        "exit_rate": float((level < L).float().mean()), "ceiling_mean_exit_layer": float(first),
        "ceiling_speedup": L / float(first),
        "predicted_speedup": predicted_speedup(_cost(models, s.gate), level, s, L, skip),
        "setting": modes["approximate"].report(),
        "exact": {"setting": modes["exact"].report(), **replay_exact(table, exact, _cost(models, exact.gate), skip,
                                                                     gate)},
        "tokens": len(table), "prompts": table.num_prompts,
        "costs": {"source": cfg.costs, "check_blocks": _cost(models, s.gate).check,
                  "lens_check_blocks": _cost(models, s.gate).lens, "head_blocks": _cost(models, s.gate).head,
                  "skipped_layer_blocks": skip, "ms": ms},
        "lens_levels": list(jump.lens_levels),
        "jump": cfg.jump, "model": lm.name, "quantization": cfg.quantization, "compiled": cfg.compile,
    }


def _cost(models: dict[str, CostModel], gate: str) -> CostModel:
    """A gate kind's cost model; patience's check (the exit head's top-1) costs about confidence's."""
    return models.get(gate, models["confidence"])


def _costs(cfg: AgreementConfig, lm: CausalLM, jump: LowRankJumps,
           gate: LearnedGate | None) -> tuple[dict[str, CostModel], float, dict[str, float]]:
    """Cost models per gate kind, a skipped layer's cost (blocks) and the timings (ms) they come from."""
    kind = cfg.costs
    if kind == "flops":
        model = CostModel.from_model(lm, jump.config.rank if jump.is_pure else None).with_lens(jump.lens_levels)
        return {"confidence": model, "entropy": model, "learned": model}, 0.0, {}
    if kind != "measured":
        raise ValueError(f"costs={kind!r} must be measured or flops")
    ms = measure(lm, jump, gate, repeats=20, quantization=cfg.quantization, compile=cfg.compile)
    models, skip = cost_models(ms, jump.lens_levels)
    return models, skip, ms
