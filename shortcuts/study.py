"""`onejump fit --study`: the paper's comparison. Collect states at one random position of each sentence,
train jumps for every level (N-NJTC) in several variants, choose one by OJFA, compare identity, all-level,
arbitrary and joint jumps, evaluate, save. What a user serves is ``onejump fit`` without ``--study``
(``shortcuts.fit``: the joint jump with per-level normalisation on decode-matched data)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.costs import measure
from shortcuts.calibration.search import SearchSpace, calibrate
from shortcuts.calibration.table import continuations, engine_continuations, engine_table, level_table
from shortcuts.collect import StateSet, cached_states, read_corpus, sample_sentences
from shortcuts.config import PAPER_VARIANT, StudyConfig
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.settings import QUANTIZATIONS, Quantization
from shortcuts.evaluate import LevelScores, Method, choose, evaluate_method, model_top1, ojfa_scores
from shortcuts.heads import HeadContext
from shortcuts.jump import JumpConfig, LowRankJumps
from shortcuts.prompts import article_split
from shortcuts.report import plot_methods, summary_markdown, write_plots
from shortcuts.train import KLToModel, MSEToFinal, TrainConfig, train_bank


@dataclass
class Trained:
    """Everything trained for one variant: the bank (one jump per level) and its OJFA choice."""

    bank: LowRankJumps
    scores: list[float]
    chosen: int  # index into levels 1..L-1
    loss: list[float]


def _sentences(cfg: StudyConfig) -> tuple[list[str], list[str], int]:
    """Read and sample both corpora first, so a bad corpus fails before the model loads. Returns the
    training sentences (fit, then validation), the test sentences and the number of validation ones.
    A .jsonl whose rows carry a ``title`` is split by article (``prompts.article_split``), so no
    validation sentence shares an article with a fit sentence; otherwise sentences are split."""
    n_val = max(2, round(cfg.val_fraction * cfg.n_train))
    texts = read_corpus(cfg.corpus)  # fails first on a missing or empty corpus
    test = sample_sentences(read_corpus(cfg.eval_corpus), cfg.n_test, cfg.seed + 1)
    try:
        fit_texts, val_texts = article_split(Path(cfg.corpus))
    except (KeyError, ValueError, TypeError, AttributeError):  # no titles (or not .jsonl): split sentences
        return sample_sentences(texts, cfg.n_train, cfg.seed), test, n_val
    fit = sample_sentences(fit_texts, cfg.n_train - n_val, cfg.seed)
    return fit + sample_sentences(val_texts, n_val, cfg.seed), test, n_val


def _collect(lm: CausalLM, cfg: StudyConfig, train: list[str], test: list[str], n_val: int) -> tuple[StateSet, ...]:
    cache = Path(cfg.cache) if cfg.cache else None
    kw = {"max_tokens": cfg.max_tokens, "batch_size": cfg.collect_batch}
    train_states = cached_states(lm, train, cache, seed=cfg.seed, desc="collect train", **kw)
    test_states = cached_states(lm, test, cache, seed=cfg.seed + 1, desc="collect test", **kw)
    fit_states, val_states = train_states.split(len(train_states) - n_val)
    return fit_states, val_states, test_states


def _train_variant(variant: str, fit: StateSet, val: StateSet, ctx: HeadContext, cfg: StudyConfig,
                   warm: dict[str, Trained]) -> Trained:
    """Train one jump per level. KL variants start from the same form's MSE jumps when those
    exist (KL is a pass over the vocabulary per sample; MSE gets it most of the way for free)
    and see at most ``cfg.kl_samples`` samples."""
    jc = JumpConfig.from_variant(variant, fit.levels.shape[-1], cfg.rank)
    torch.manual_seed(cfg.seed)
    bank = LowRankJumps(jc, n=fit.num_levels)
    kl = jc.objective == "kl"
    if kl:
        fit = fit.split(min(len(fit), cfg.kl_samples))[0]
        if (start := warm.get(f"{jc.form}-mse")) is not None:
            bank.load_state_dict(start.bank.state_dict())
    tc = TrainConfig(epochs=cfg.kl_epochs if kl else cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    loss = train_bank(bank, fit.by_level(), fit.final, KLToModel(ctx) if kl else MSEToFinal(), tc,
                      desc=f"train {variant}", chunk=tc.level_chunk if kl else None, data_init=not kl)
    scores = ojfa_scores(bank, val.by_level(), val.final)
    return Trained(bank, scores, choose(scores), loss)


def _train_joint(fit: StateSet, cfg: StudyConfig) -> LowRankJumps:
    torch.manual_seed(cfg.seed)
    joint = LowRankJumps(JumpConfig(fit.levels.shape[-1], cfg.rank), n=1)
    tc = TrainConfig(epochs=max(1, cfg.epochs // 2), batch_size=max(2, cfg.batch_size // 8), lr=cfg.lr,
                     seed=cfg.seed)
    train_bank(joint, fit.by_level(), fit.final, MSEToFinal(), tc, desc="train joint")
    return joint


def _fixed(jump: LowRankJumps | None) -> Method:
    return lambda _level: jump


def _per_level(bank: LowRankJumps) -> Method:
    return bank.select


def _methods(trained: dict[str, Trained], joint: LowRankJumps) -> dict[str, Method]:
    paper = trained[PAPER_VARIANT].bank
    methods: dict[str, Method] = {"identity": _fixed(None)}
    for v, t in trained.items():
        methods[f"all-level:{v}"] = _per_level(t.bank)
        methods[f"ojfa:{v}"] = _fixed(t.bank.select(t.chosen))
    for name, index in (("first", 0), ("middle", (paper.n - 1) // 2), ("last", paper.n - 1)):
        methods[f"{name}:{PAPER_VARIANT}"] = _fixed(paper.select(index))
    methods[f"joint:{PAPER_VARIANT}"] = _fixed(joint)
    return methods


def _default_variant(trained: dict[str, Trained], val: StateSet, ctx: HeadContext) -> dict[str, float]:
    """Mean validation precision of each variant's OJFA jump: the default is the best of these."""
    target = model_top1(val.final, ctx)
    return {v: evaluate_method(_fixed(t.bank.select(t.chosen)), val.by_level(), target, ctx).mean()[0]
            for v, t in trained.items()}


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """The whole pipeline; writes artifacts, results.json, summary.md and plots to cfg.out_dir."""
    t0, out = time.perf_counter(), Path(cfg.out_dir)
    if cfg.quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={cfg.quantization!r} must be one of {', '.join(QUANTIZATIONS)}")
    train_texts, test_texts, n_val = _sentences(cfg)
    lm = CausalLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    for v in cfg.variants:  # a bad rank fails now, not after collection
        JumpConfig.from_variant(v, lm.hidden_size, cfg.rank)
    ctx = HeadContext.from_model(lm).to("cpu")  # the states live on the CPU
    fit, val, test = _collect(lm, cfg, train_texts, test_texts, n_val)
    t_collect = time.perf_counter() - t0
    trained: dict[str, Trained] = {}
    for v in sorted(cfg.variants, key=lambda v: v.endswith("kl")):  # MSE first: KL warm-starts from it
        trained[v] = _train_variant(v, fit, val, ctx, cfg, trained)
    trained = {v: trained[v] for v in cfg.variants}
    joint = _train_joint(fit, cfg)
    t_train = time.perf_counter() - t0 - t_collect
    target = model_top1(test.final, ctx)
    methods = _methods(trained, joint)
    scores = {name: evaluate_method(m, test.by_level(), target, ctx)
              for name, m in tqdm(methods.items(), desc="evaluate", unit="method")}
    val_precision = _default_variant(trained, val, ctx)
    speed = _speed_by_variant(lm, cfg, trained, train_texts[len(train_texts) - n_val :])
    default = cfg.default_variant or max(val_precision, key=lambda v: (speed[v]["predicted_speedup"],
                                                                     val_precision[v]))
    results = _results(cfg, lm, trained, scores, val_precision, default, len(fit), len(val), len(test))
    results["predicted_speedup_at_target"] = speed
    results["timing_s"] = {"collect": round(t_collect, 1), "train": round(t_train, 1),
                           "total": round(time.perf_counter() - t0, 1)}
    _save_artifacts(out, lm, cfg, trained, scores, default)
    write_outputs(out, results, cfg.plots)
    return results


def _speed_by_variant(lm: CausalLM, cfg: StudyConfig, trained: dict[str, Trained],
                      val_texts: list[str]) -> dict[str, dict[str, Any]]:
    """Each variant's OJFA jump calibrated (confidence gate, first level x stride) on validation prompts
    continued greedily by the model: the best predicted speed-up whose lower bound on agreement reaches
    ``cfg.target``, from costs measured here. A residual jump's check is a full head: it rarely pays."""
    texts = [t for t in val_texts if len(lm.tokenizer(t)["input_ids"]) >= 4][: cfg.select_prompts]
    prompts = [lm.tokenizer(t)["input_ids"][:32] for t in texts]
    space = SearchSpace(("confidence",), strides=(1, 2, 3), target=cfg.target)
    quantization = cast(Quantization, cfg.quantization)  # checked by run_fit
    # at a weight format other than the dense model's, the engine at that format continues and decides
    engine = None if cfg.quantization == "none" else EarlyExitDecoder(lm, None, quantization=quantization)
    conts = continuations(lm, prompts, cfg.select_new_tokens) if engine is None else \
        engine_continuations(engine, prompts, cfg.select_new_tokens)
    out = {}
    for v, t in trained.items():
        jump = t.bank.select(t.chosen).to(lm.device)
        if engine is None:
            table = level_table(lm, ExitHead(lm, jump), prompts, conts, with_entropy=False)
        else:
            engine.exit_head = ExitHead(lm, jump, engine.runner)
            table = engine_table(engine, prompts, conts, with_entropy=False)
        ms = measure(lm, jump, None, repeats=10, quantization=quantization)
        out[v] = {**calibrate(table, ms, None, space).best.as_dict(), "quantization": cfg.quantization}
    return out


def _results(cfg: StudyConfig, lm: CausalLM, trained: dict[str, Trained], scores: dict[str, LevelScores],
             val_precision: dict[str, float], default: str, n_fit: int, n_val: int, n_test: int) -> dict[str, Any]:
    bank = trained[PAPER_VARIANT].bank
    return {
        "model": cfg.model, "num_layers": lm.num_layers, "hidden_size": lm.hidden_size, "rank": cfg.rank,
        "levels": lm.exit_levels, "samples": {"fit": n_fit, "val": n_val, "test": n_test},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
        "methods": {k: asdict(v) for k, v in scores.items()},
        "ojfa": {v: {"scores": t.scores, "chosen_level": t.chosen + 1, "train_loss": t.loss}
                 for v, t in trained.items()},
        "val_precision_of_ojfa": val_precision, "default_variant": default,
        "parameters": {"all-level": bank.num_parameters(), "ojfa": bank.select(0).num_parameters(),
                       "reduction": bank.n},
    }


def _save_artifacts(out: Path, lm: CausalLM, cfg: StudyConfig, trained: dict[str, Trained],
                    scores: dict[str, LevelScores], default: str) -> None:
    for v, t in trained.items():
        p, s = scores[f"ojfa:{v}"].mean()
        art = JumpArtifact(t.bank.select(t.chosen), cfg.model, lm.fingerprint(), lm.num_layers, t.chosen + 1,
                           t.scores, str(cfg.corpus), {"test_mean_precision": p, "test_mean_surprisal": s,
                                                       **cfg.extra})
        art.save(out / f"jump-{v}.safetensors")
        if v == default:
            art.save(out / "jump.safetensors")


def write_outputs(out: Path, results: dict[str, Any], plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary_markdown(results))
    if plots:
        write_plots(results, out)


def run_evaluate(model: str, jump_path: str, corpus: str, out_dir: str, n: int = 1000, seed: int = 1,
                 max_tokens: int = 64, device: str = "cpu", dtype: str = "float32",
                 cache: str | None = None) -> dict[str, Any]:
    """Per-level precision and surprisal of a saved jump (reused at every level) vs identity."""
    artifact = JumpArtifact.load(jump_path)
    lm = CausalLM.load(model, dtype=dtype, device=device)
    artifact.check_model(lm)
    ctx = HeadContext.from_model(lm).to("cpu")
    sentences = sample_sentences(read_corpus(corpus), n, seed)
    states = cached_states(lm, sentences, Path(cache) if cache else None, seed=seed, max_tokens=max_tokens,
                           desc="collect")
    target = model_top1(states.final, ctx)
    name = f"ojfa:{artifact.config.variant}"
    methods = {"identity": _fixed(None), name: _fixed(artifact.jump)}
    scores = {k: evaluate_method(m, states.by_level(), target, ctx) for k, m in methods.items()}
    results = {"model": model, "jump": jump_path, "corpus": corpus, "samples": len(states),
               "levels": lm.exit_levels, "trained_level": artifact.trained_level,
               "methods": {k: asdict(v) for k, v in scores.items()}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1))
    plot_methods(results, list(methods), f"{Path(jump_path).name} on {Path(corpus).name}", out / "evaluation.png")
    return results
