"""``onejump calibrate``: the exit setting with the best predicted speed at a target greedy agreement.

The full model continues held-out prompts greedily; one teacher-forced pass tabulates what every
exit level would decide (``agreement.level_table``); gate kinds (confidence, entropy, and the learned
gate, trained on teacher-forced tables of *training* prompts, ``--gate-corpus``) x thresholds x first
exit level x stride are replayed on it and ranked by the speed-up predicted from costs measured on
this machine (``costs.measure``: a block, the full head, a check of each gate), among those whose
bootstrap lower bound (over prompts) on agreement reaches the target. What is stored in the
artifact's metadata: ``shortcuts.lab.exits`` (``extra["calibration"]`` is what the server reads)"""

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
    gates: tuple[str, ...] = ("confidence",)  # of confidence, entropy, learned
    min_layers: tuple[int, ...] = ()  # first exit levels to try; () = 1 and every sixth of the depth
    stride: int = 1
    strides: tuple[int, ...] = ()  # check every stride-th level; () = (stride,)
    gate_corpus: str | None = None  # training prompts of the learned gate (.jsonl with titles: fit articles)
    gate_prompts: int = 100
    device: str = "cpu"
    dtype: str = "float32"


def run_calibrate(cfg: CalibrateConfig) -> tuple[Calibration, Path]:
    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.lab.agreement import Calibration, fit_learned_gate, held_out_prompts
    from shortcuts.lab.costs import measure
    from shortcuts.lab.exits import SearchSpace, calibrate_setting, learned_gate_of, store, table_of

    if not 0.0 < cfg.target <= 1.0 or not 0.5 <= cfg.confidence < 1.0:
        raise ValueError(f"target={cfg.target} must be in (0, 1] and confidence={cfg.confidence} in [0.5, 1)")
    if cfg.prompts < 1 or cfg.new_tokens < 2 or cfg.offset < 0:
        raise ValueError(f"prompts={cfg.prompts} must be >= 1, new_tokens={cfg.new_tokens} >= 2, offset >= 0")
    if bad := [g for g in cfg.gates if g not in ("confidence", "entropy", "learned")]:
        raise ValueError(f"gates {bad} cannot be calibrated; use confidence, entropy and/or learned")
    artifact = JumpArtifact.load(cfg.jump)  # fails fast on a bad artifact, before the model loads
    lm = CausalLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    artifact.check_model(lm)
    L = lm.num_layers
    space = SearchSpace(tuple(cfg.gates), tuple(cfg.min_layers), tuple(cfg.strides or (cfg.stride,)), cfg.target,
                        cfg.confidence)
    if bad_layers := [m for m in space.first_levels(L) if not 1 <= m < L]:
        raise ValueError(f"min_layer {bad_layers} must be in [1, {L - 1}]")
    gate = learned_gate_of(artifact.extra)
    if "learned" in cfg.gates and cfg.gate_corpus and cfg.gate_prompts > 0:
        gate = fit_learned_gate(table_of(lm, artifact, gate_prompts(lm, cfg), cfg.new_tokens))
    prompts = held_out_prompts(lm, cfg.corpus, cfg.prompts, offset=cfg.offset)
    table = table_of(lm, artifact, prompts, cfg.new_tokens)
    ms = measure(lm, artifact.jump.to(lm.device), gate)
    found = calibrate_setting(table, ms, gate, space)
    store(artifact, found, gate, ms, _provenance(cfg))
    return Calibration(**found["calibration"]), artifact.save(cfg.out or cfg.jump)


def gate_prompts(lm: object, cfg: CalibrateConfig) -> list[list[int]]:
    """The learned gate's training prompts: the fit articles of a titled .jsonl (``traces.article_split``),
    else the whole corpus."""
    from shortcuts.collect import read_corpus
    from shortcuts.lab.traces import article_split, tokenize_prompts

    assert cfg.gate_corpus is not None
    path = Path(cfg.gate_corpus)
    try:
        texts = article_split(path)[0]
    except (KeyError, ValueError):
        texts = read_corpus(path)
    return tokenize_prompts(lm, texts, cfg.gate_prompts, seed=7)  # type: ignore[arg-type]


def _provenance(cfg: CalibrateConfig) -> dict[str, Any]:
    return {"corpus": Path(cfg.corpus).name, "offset": cfg.offset, "new_tokens": cfg.new_tokens,
            "method": "teacher-forced greedy agreement, bootstrap over prompts; speed from measured costs"}
