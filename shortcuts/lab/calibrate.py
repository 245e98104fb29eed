"""``onejump calibrate``: the exit threshold that reaches a target greedy agreement on held-out text.

The full model continues held-out prompts greedily; one teacher-forced pass tabulates what every
exit level would decide (``agreement.level_table``); the gate and threshold with the lowest mean
exit cost (``agreement.CostModel``: layers, gate checks, the full head) whose bootstrap lower bound
(over prompts) on agreement reaches the target, with the first exit level, are stored
in the artifact's metadata (``extra["calibration"]``), where the server takes its default from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command's --help must not import torch
    from shortcuts.lab.agreement import Calibration


@dataclass
class CalibrateConfig:
    jump: str
    model: str
    corpus: str
    out: str | None = None  # default: rewrite the jump artifact in place
    target: float = 0.95
    confidence: float = 0.95
    prompts: int = 200
    new_tokens: int = 64
    offset: int = 1000  # skip the first sentences of the shuffled corpus: the sweep's prompts
    gates: tuple[str, ...] = ("confidence",)
    min_layers: tuple[int, ...] = ()  # first exit levels to try; () = 1 and every sixth of the depth
    stride: int = 1
    device: str = "cpu"
    dtype: str = "float32"


def run_calibrate(cfg: CalibrateConfig) -> tuple[Calibration, Path]:
    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.exit_head import ExitHead
    from shortcuts.engine.settings import GATES
    from shortcuts.lab.agreement import CostModel, calibrate, continuations, held_out_prompts, level_table

    if not 0.0 < cfg.target <= 1.0 or not 0.5 <= cfg.confidence < 1.0:
        raise ValueError(f"target={cfg.target} must be in (0, 1] and confidence={cfg.confidence} in [0.5, 1)")
    if cfg.prompts < 1 or cfg.new_tokens < 2 or cfg.offset < 0:
        raise ValueError(f"prompts={cfg.prompts} must be >= 1, new_tokens={cfg.new_tokens} >= 2, offset >= 0")
    if bad := [g for g in cfg.gates if g not in GATES or g == "patience"]:
        raise ValueError(f"gates {bad} cannot be calibrated; use confidence and/or entropy")
    artifact = JumpArtifact.load(cfg.jump)  # fails fast on a bad artifact, before the model loads
    lm = CausalLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    artifact.check_model(lm)
    L = lm.num_layers
    min_layers = cfg.min_layers or tuple(sorted({1, *(max(1, k * L // 6) for k in range(1, 6))}))
    if bad_layers := [m for m in min_layers if not 1 <= m < L]:
        raise ValueError(f"min_layer {bad_layers} must be in [1, {L - 1}]")
    prompts = held_out_prompts(lm, cfg.corpus, cfg.prompts, offset=cfg.offset)
    conts = continuations(lm, prompts, cfg.new_tokens)
    table = level_table(lm, ExitHead(lm, artifact.jump.to(lm.device)), prompts, conts,
                        with_entropy="entropy" in cfg.gates)
    cost = CostModel.from_model(lm, artifact.config.rank if artifact.jump.is_pure else None)
    result = calibrate(table, cfg.target, cfg.gates, cfg.confidence, min_layers, cfg.stride, cost)
    artifact.extra["calibration"] = {**result.as_dict(), **_provenance(cfg)}
    return result, artifact.save(cfg.out or cfg.jump)


def _provenance(cfg: CalibrateConfig) -> dict[str, Any]:
    return {"corpus": Path(cfg.corpus).name, "offset": cfg.offset, "new_tokens": cfg.new_tokens,
            "method": "teacher-forced greedy agreement, bootstrap over prompts"}
