"""``onejump calibrate``: the exit setting with the best predicted speed at a target greedy agreement.

The full model continues held-out prompts greedily; one teacher-forced pass tabulates what every
exit level would decide (``table.level_table``); gate kinds (confidence, entropy, and the learned
gate, trained on teacher-forced tables of *training* prompts, ``--gate-corpus``) x thresholds x first
exit level x stride are replayed on it (``search.calibrate``) and ranked by the speed-up predicted from
costs measured on this machine (``costs.measure``: a block, the full head, a check of each gate), among
those whose bootstrap lower bound (over prompts) on agreement reaches the target.

What ``store`` writes in the artifact's metadata:

- ``extra["exit"]`` (``setting.StoredCalibration``): the fastest setting of any gate and stride, as
  approximate mode's setting at the precision it was measured at; what the server, ``bench`` and
  ``agreement`` run (``setting.resolve``). ``store_exact`` writes exact mode's there too;
- ``extra["gate"]``: the learned gate with its calibrated threshold and levels;
- ``extra["calibration_search"]``: the best of each gate kind, and ``extra["costs_ms"]``;
- ``extra["exit_heads"]``: each exit-head option searched (the jump everywhere; the logit lens where it
  predicts better, ``lens.calibrate_heads``) and its result; the chosen option's lens levels are the
  artifact's ``lens_levels`` (``LowRankJumps.with_lens``), which every reader's exit head then uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.config import CALIBRATED_GATES, CalibrateConfig
from shortcuts.calibration.costs import measure
from shortcuts.calibration.exact import ExactCalibration
from shortcuts.calibration.lens import JUMP, LENS, calibrate_heads, lens_candidates
from shortcuts.calibration.replay import fit_learned_gate
from shortcuts.calibration.search import Calibration, Found, SearchSpace
from shortcuts.calibration.setting import DENSE, Overrides, StoredCalibration, resolve
from shortcuts.calibration.table import (
    LevelTable,
    TableHead,
    continuations,
    engine_continuations,
    engine_tables,
    level_tables,
)
from shortcuts.collect import read_corpus
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import Quantization
from shortcuts.prompts import article_split, held_out_prompts, read_prompts, tokenize_prompts

if TYPE_CHECKING:
    from shortcuts.calibration.drafts import DraftCandidate


@dataclass(frozen=True)
class Calibrated:
    """What ``run_calibrate`` stored: approximate mode's setting (None with ``exact_only``), exact mode's
    draft policy with every candidate's timed speed per workload (None without ``exact_prompts``)."""

    approximate: Calibration | None
    exact: DraftCandidate | None
    exact_speeds: dict[str, dict[str, float]]
    path: Path


def run_calibrate(cfg: CalibrateConfig) -> Calibrated:
    """Calibrate ``cfg.jump`` and save it (in place unless ``cfg.out``): approximate mode's setting (unless
    ``exact_only``) and, with ``exact_prompts``, exact mode's draft policy (``calibrate_exact``)."""
    if not 0.0 < cfg.target <= 1.0 or not 0.5 <= cfg.confidence < 1.0:
        raise ValueError(f"target={cfg.target} must be in (0, 1] and confidence={cfg.confidence} in [0.5, 1)")
    if cfg.prompts < 1 or cfg.new_tokens < 2 or cfg.offset < 0:
        raise ValueError(f"prompts={cfg.prompts} must be >= 1, new_tokens={cfg.new_tokens} >= 2, offset >= 0")
    if bad := [g for g in cfg.gates if g not in CALIBRATED_GATES]:
        raise ValueError(f"gates {bad} cannot be calibrated; use {', '.join(CALIBRATED_GATES)}")
    if cfg.exact_only and not cfg.exact_prompts:
        raise ValueError("exact_only needs exact_prompts (--exact-prompts): the prompts the draft policy is timed on")
    artifact = JumpArtifact.load(cfg.jump)  # fails fast on a bad artifact, before the model loads
    lm = CausalLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    artifact.check_model(lm)
    best = None if cfg.exact_only else calibrate_approximate(lm, artifact, cfg)
    exact, speeds = calibrate_exact(lm, artifact, cfg) if cfg.exact_prompts else (None, {})
    return Calibrated(best, exact, speeds, artifact.save(cfg.out or cfg.jump))


def calibrate_approximate(lm: CausalLM, artifact: JumpArtifact, cfg: CalibrateConfig) -> Calibration:
    """Approximate mode's setting (module docstring), stored in ``artifact`` (not saved)."""
    L = lm.num_layers
    space = SearchSpace(tuple(cfg.gates), tuple(cfg.min_layers), tuple(cfg.strides or (cfg.stride,)), cfg.target,
                        cfg.confidence)
    if bad_layers := [m for m in space.first_levels(L) if not 1 <= m < L]:
        raise ValueError(f"min_layer {bad_layers} must be in [1, {L - 1}]")
    gate = LearnedGate.from_extra(artifact.extra)
    engine = precision_engine(lm, artifact, cfg.quantization, cfg.compile)
    fit = None
    if "learned" in cfg.gates and cfg.gate_corpus and cfg.gate_prompts > 0:
        fit = tables_of(lm, artifact, gate_prompts(lm, cfg), cfg.new_tokens, engine, cfg.lens)
    prompts = held_out_prompts(lm, cfg.corpus, cfg.prompts, offset=cfg.offset)
    val = tables_of(lm, artifact, prompts, cfg.new_tokens, engine, cfg.lens)
    timed_gate = gate or (fit_learned_gate(fit[JUMP]) if fit else None)
    ms = measure(lm, artifact.jump.to(lm.device), timed_gate, quantization=cfg.quantization, compile=cfg.compile)
    # the lens levels belong to the artifact, not to a precision: another precision keeps the dense model's
    only = None if cfg.quantization == DENSE else artifact.jump.lens_levels
    choice, options = calibrate_heads(val, ms, space, fit, gate, lens=cfg.lens, only=only)
    artifact.jump.with_lens(choice.lens_levels)
    store(artifact, choice.found, choice.learned, ms, _provenance(cfg), precision=cfg.quantization)
    if cfg.quantization == DENSE:
        artifact.extra["exit_heads"] = {k: c.report(L) for k, c in options.items()}
    return choice.found.best


def calibrate_exact(lm: CausalLM, artifact: JumpArtifact,
                    cfg: CalibrateConfig) -> tuple[DraftCandidate, dict[str, dict[str, float]]]:
    """Exact mode's draft policy, timed on ``cfg.exact_prompts`` (``calibration.drafts``; its exit drafts at
    approximate mode's stored setting), stored in ``artifact`` (not saved). Timed on the dense model: stored
    for precision "none" (a quantized server reads it as measured at "none")."""
    from shortcuts.calibration.drafts import candidates, choose, time_candidates
    from shortcuts.engine.decoder import DEFAULT_MAX_SEQ_LEN

    stored = StoredCalibration.from_extra(artifact.extra)
    cal, _ = stored.lookup(DENSE)
    exit_setting = None if cal is None or cal.approximate is None else \
        resolve(stored, Overrides(), lm.num_layers, DENSE, "approximate").settings
    room = DEFAULT_MAX_SEQ_LEN - cfg.new_tokens - 1
    workloads = {Path(f).stem: read_prompts(lm, f, cfg.exact_max_prompts, max_tokens=room) for f in cfg.exact_prompts}
    cands = candidates(lm.num_layers, exit_setting)
    speeds = time_candidates(lm, artifact.jump.to(lm.device), LearnedGate.from_extra(artifact.extra), workloads,
                             cands, cfg.new_tokens)
    best = choose(cands, speeds)
    measured = {"timed_speedup_vs_never": speeds[best.name], "candidates": speeds,
                "prompts": {k: len(v) for k, v in workloads.items()}, "new_tokens": cfg.new_tokens,
                "method": "engine timed against never drafting, arms interleaved; the fastest on the first "
                          "workload that is never slower than 0.98x on any"}
    stored.with_setting(DENSE, "exact", best.mode_setting(**measured)).to_extra(artifact.extra)
    return best, speeds


def precision_engine(lm: CausalLM, artifact: JumpArtifact, quantization: Quantization,
                     compile: bool = False) -> EarlyExitDecoder | None:
    """The engine a calibration at weight format ``quantization`` reads its table from; None for the dense
    model run eagerly (the model's own forward gives the same states, faster for a whole corpus)."""
    if quantization == DENSE and not compile:
        return None
    return EarlyExitDecoder(lm, artifact.jump.to(lm.device), quantization=quantization, compile=compile)


def tables_of(lm: CausalLM, artifact: JumpArtifact, prompts: list[list[int]], new_tokens: int,
              engine: EarlyExitDecoder | None = None, lens: bool = True) -> dict[str, LevelTable]:
    """The level tables of the artifact's jump (at every level, ``JUMP``) and of the logit lens (at its
    candidate levels and the artifact's lens levels, ``LENS``) on ``prompts`` continued by the full model, from
    one pass (by ``engine`` at its weight format when given)."""
    runner = engine.runner if engine is not None else None
    jump = artifact.jump.to(lm.device)
    heads = {JUMP: TableHead(ExitHead(lm, jump, runner, lens_levels=()))}
    if lens or jump.lens_levels:
        levels = tuple(sorted({*lens_candidates(lm.num_layers), *jump.lens_levels}))
        heads[LENS] = TableHead(ExitHead(lm, None, runner), levels)
    if engine is not None:
        return engine_tables(engine, heads, prompts, engine_continuations(engine, prompts, new_tokens))
    return level_tables(lm, heads, prompts, continuations(lm, prompts, new_tokens))


def gate_prompts(lm: CausalLM, cfg: CalibrateConfig) -> list[list[int]]:
    """The learned gate's training prompts: the fit articles of a titled .jsonl (``prompts.article_split``),
    else the whole corpus."""
    assert cfg.gate_corpus is not None
    path = Path(cfg.gate_corpus)
    try:
        texts = article_split(path)[0]
    except (KeyError, ValueError):
        texts = read_corpus(path)
    return tokenize_prompts(lm, texts, cfg.gate_prompts, seed=7)


def _provenance(cfg: CalibrateConfig) -> dict[str, Any]:
    return {"corpus": Path(cfg.corpus).name, "offset": cfg.offset, "new_tokens": cfg.new_tokens,
            "method": "teacher-forced greedy agreement, bootstrap over prompts; speed from measured costs",
            **({"compiled": True} if cfg.compile else {})}


def store(artifact: JumpArtifact, found: Found, gate: LearnedGate | None, ms: dict[str, float],
          provenance: dict[str, Any], precision: str = DENSE) -> None:
    """Write a calibration's result into the artifact's metadata (see the module docstring). At a precision
    other than the dense model's, only that precision's setting is written, with its costs in ``measured``
    (the search summary, the costs and the learned gate stay the dense model's)."""
    ex = artifact.extra
    ex.pop("exit_setting", None)  # older artifacts kept the best setting apart from what the server ran
    stored = StoredCalibration.from_extra(ex)
    if precision != DENSE:
        provenance = {**provenance, "costs_ms": {k: round(v, 4) for k, v in ms.items()}}
    stored.with_setting(precision, "approximate", found.best.mode_setting(**provenance)).to_extra(ex)
    if precision != DENSE:
        return
    ex["calibration_search"] = {g: c.as_dict() for g, c in found.by_gate.items()}
    ex["costs_ms"] = {k: round(v, 4) for k, v in ms.items()}
    if gate is not None:
        learned = found.by_gate.get("learned")
        gate.threshold = learned.threshold if learned is not None else 1.0
        ex["gate"] = {**gate.to_dict(), "min_layer": learned.min_layer if learned else 1,
                      "stride": learned.stride if learned else 1}


def store_exact(artifact: JumpArtifact, exact: ExactCalibration, provenance: dict[str, Any],
                precision: str = DENSE) -> None:
    """Write exact mode's calibrated setting into the artifact's ``extra["exit"]``."""
    stored = StoredCalibration.from_extra(artifact.extra)
    stored.with_setting(precision, "exact", exact.mode_setting(**provenance)).to_extra(artifact.extra)
