"""``onejump fit``: the recipe that works, calibrated, in one command (docs/exits.md, docs/fit.md).

1. **Decode-matched data** (``shortcuts.calibration.traces``): corpus sentences cut to 32 tokens are continued
   greedily by the model; one pass keeps every level's state at every decode step. Fit prompts and
   validation prompts come from disjoint articles of a titled .jsonl (``prompts.article_split``), test
   prompts from the eval corpus.
2. **One jump for every level** (``train.train_joint``): a pure rank-r jump trained on all levels at once,
   on per-level standardised inputs (folded into per-level statistics), MSE to the final state, then KL to
   the model's next-token distribution.
3. **Calibrated with measured costs** (``calibration.lens.calibrate_heads``): the exit head is the jump at
   every level, or the logit lens at the levels where the lens predicts better (calibrated for its cost: a
   lens check is a full head); gate kinds x thresholds x first level x stride are searched on the
   validation prompts' teacher-forced table at the target agreement (95% lower bound over prompts), with a
   block, the head and each check timed here (``calibration.costs.measure``).
4. **A ready artifact** (``jump.safetensors``): the jump, its lens levels and the stored setting
   (``StoredCalibration``, ``extra["exit"]``), what the server, ``bench`` and ``agreement`` run. The test
   prompts report precision@1 per level (identity, jump, the exit head), the ceilings, and the stored
   setting replayed (``results.json``, ``summary.md``, ``precision.png``).

``--study`` runs the paper's comparison instead (``shortcuts.study``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.calibrate import store
from shortcuts.calibration.costs import cost_models, measure, predicted_speedup
from shortcuts.calibration.lens import JUMP, LENS, HeadChoice, calibrate_heads, lens_candidates, merge, precision
from shortcuts.calibration.replay import bootstrap_lower_bound, oracle_levels, replay
from shortcuts.calibration.search import Calibration, SearchSpace
from shortcuts.calibration.table import LevelTable, states_table
from shortcuts.calibration.traces import Traces, decode_traces
from shortcuts.collect import read_corpus
from shortcuts.config import FitConfig
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.errors import CorpusError
from shortcuts.heads import HeadContext
from shortcuts.jump import LowRankJumps
from shortcuts.prompts import article_split, tokenize_prompts
from shortcuts.train import JointConfig, train_joint, train_per_level


@dataclass
class Texts:
    fit: list[str]
    val: list[str]
    test: list[str]
    split: str  # how fit and validation were separated


def read_texts(cfg: FitConfig) -> Texts:
    """The corpora, read before the model loads (a bad corpus fails first). A .jsonl with titles splits
    fit/validation by article; otherwise 1 sentence in 10 (shuffled) is validation."""
    texts = read_corpus(cfg.corpus)
    test = read_corpus(cfg.eval_corpus)
    try:
        fit, val = article_split(Path(cfg.corpus))
        split = "by article (titles)"
    except (KeyError, ValueError, TypeError, AttributeError):
        shuffled = list(texts)
        random.Random(cfg.seed).shuffle(shuffled)
        cut = max(1, len(shuffled) // 10)
        fit, val, split = shuffled[cut:], shuffled[:cut], "by sentence (no titles)"
    return Texts(fit, val, test, split)


def _prompts(lm: CausalLM, texts: list[str], n: int, seed: int, name: str) -> list[list[int]]:
    try:
        return tokenize_prompts(lm, texts, n, seed)
    except ValueError as e:
        raise CorpusError(f"{name} prompts: {e} (sentences of 8+ tokens; lower --{name}-prompts)") from e


def threads(asked: int | None) -> int:
    """Torch threads: as asked; else torch's default, or 1 when the machine's load already fills its cores
    (OpenMP threads that wait on each other on a busy machine run many times slower than one thread)."""
    if asked:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if os.getloadavg()[0] >= cores else torch.get_num_threads()


# --- the plan and its estimate -----------------------------------------------------------------------
@torch.inference_mode()
def estimate(lm: CausalLM, cfg: FitConfig, sample: list[list[int]]) -> dict[str, float]:
    """Seconds per phase, from work timed here on one batch of ``sample`` prompts (generation with the states
    kept, 2 and 6 new tokens; a full head on 256 rows). Rough (the machine's load moves it); printed first."""
    from shortcuts.calibration.traces import generate_keeping_states

    times = []
    for n in (2, 6):
        t0 = time.perf_counter()
        generate_keeping_states(lm, sample, n)
        times.append(time.perf_counter() - t0)
    per_token = max(0.0, (times[1] - times[0]) / 4)
    per_prompt = (times[0] + per_token * (cfg.new_tokens - 2)) / len(sample)
    ctx = HeadContext.from_model(lm)
    h = torch.randn(256, lm.hidden_size)
    t0 = time.perf_counter()
    ctx.full(h)
    t_head = (time.perf_counter() - t0) / 256
    L, steps, d, r = lm.num_layers, cfg.new_tokens - 1, lm.hidden_size, cfg.rank
    prompts = cfg.fit_prompts + cfg.val_prompts + cfg.test_prompts
    samples = cfg.fit_prompts * cfg.per_prompt
    kl_step = 16 + 3 * r + 3 * (L - 1) * 16 * (r + 2) / d  # target, the fused head's terms, the loss: full heads
    lens_rows = ((cfg.val_prompts + cfg.gate_prompts) * len(lens_candidates(L)) + cfg.test_prompts * (L - 1)) * steps
    jump_rows = (cfg.val_prompts + cfg.gate_prompts + cfg.test_prompts) * steps * (L - 1)
    return {"collect": prompts * per_prompt,
            "train": cfg.kl_epochs * samples / 16 * kl_step * t_head + samples * cfg.mse_epochs * (L - 1) * 4e-5,
            "tables": (lens_rows + jump_rows * (r + 1) / d) * t_head, "calibrate": 90.0}


# --- steps ---------------------------------------------------------------------------------------------
def collect(lm: CausalLM, cfg: FitConfig, texts: Texts) -> dict[str, Traces]:
    """Decode-matched traces of the fit, validation and test prompts."""
    prompts = {"fit": _prompts(lm, texts.fit, cfg.fit_prompts, cfg.seed, "fit"),
               "val": _prompts(lm, texts.val, cfg.val_prompts, cfg.seed + 1, "val"),
               "test": _prompts(lm, texts.test, cfg.test_prompts, cfg.seed + 2, "test")}
    return {k: decode_traces(lm, p, cfg.new_tokens, desc=f"{k} prompts", batch_size=cfg.batch_size)[0]
            for k, p in prompts.items()}


def train(traces: Traces, ctx: HeadContext, cfg: FitConfig) -> tuple[LowRankJumps, Tensor, Tensor]:
    """The joint jump with per-level normalisation on ``per_prompt`` steps of each fit prompt; returns the
    jump and its training inputs (L-1, N, d) and targets (N, d) (the comparison banks reuse them)."""
    rows = traces.sample(cfg.per_prompt, seed=cfg.seed)
    x, y = traces.levels(rows), traces.final(rows)
    jc = JointConfig(rank=cfg.rank, mse_epochs=cfg.mse_epochs, kl_epochs=cfg.kl_epochs, lr=cfg.lr, seed=cfg.seed)
    return train_joint(x, y, ctx, jc), x, y


def tables(lm: CausalLM, ctx: HeadContext, jump: LowRankJumps | None, traces: Traces, name: str,
           levels: tuple[int, ...] | None = None, with_entropy: bool = True) -> LevelTable:
    """The teacher-forced table of the jump (at every level) or of the lens (``jump`` None) on ``traces``."""
    head = ExitHead(lm, jump, lens_levels=()) if jump is not None else ExitHead(lm, None)
    return states_table(head, ctx.full, traces.states, traces.prompt, lm.num_layers, with_entropy=with_entropy,
                        levels=levels, desc=f"{name} table, {'jump' if jump is not None else 'lens'}")


def replay_report(table: LevelTable, c: Calibration, learned: LearnedGate | None, lens_levels: tuple[int, ...],
                  ms: dict[str, float]) -> dict[str, Any]:
    """A setting replayed on a table (held-out prompts): agreement, lower bound, exits, predicted speed-up."""
    s = c.exit_settings()
    models, skip = cost_models(ms, lens_levels)
    level, picked = replay(table, s, learned)
    agree = picked == table.final_top
    L = table.num_layers
    return {"gate": c.gate, "threshold": c.threshold, "patience": c.patience, "min_layer": c.min_layer,
            "stride": c.stride, "agreement": round(float(agree.float().mean()), 4),
            "lower_bound": round(bootstrap_lower_bound(agree, table.prompt), 4),
            "mean_exit": round(float(level.float().mean()), 3),
            "exit_rate": round(float((level < L).float().mean()), 4),
            "predicted_speedup": round(predicted_speedup(models[s.gate], level, s, L, skip), 4),
            "tokens": len(table), "prompts": table.num_prompts}


def test_replays(test: dict[str, LevelTable], options: dict[str, HeadChoice],
                 ms: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every option's best setting of each gate kind, replayed on the test prompts."""
    out = {}
    for name, choice in options.items():
        table = merge(test[JUMP], test["identity"], choice.lens_levels)
        out[name] = {g: replay_report(table, c, choice.learned, choice.lens_levels, ms)
                     for g, c in choice.found.by_gate.items()}
    return out


def summary(table: LevelTable) -> dict[str, Any]:
    p = precision(table)
    first = float(oracle_levels(table)["first_hit"].float().mean())
    return {"precision": [round(float(x), 4) for x in p], "mean_precision": round(float(p.mean()), 4),
            "ceiling_mean_exit": round(first, 3), "ceiling_speedup": round(table.num_layers / first, 4)}


# --- the command ---------------------------------------------------------------------------------------
def run_fit(cfg: FitConfig, log: Any = print) -> dict[str, Any]:
    """The whole recipe; writes ``jump.safetensors``, ``results.json``, ``summary.md`` (and a plot) to
    ``cfg.out_dir``. ``log``: where progress lines go."""
    t0, out, timing = time.perf_counter(), Path(cfg.out_dir), {}
    texts = read_texts(cfg)
    torch.set_num_threads(threads(cfg.threads))
    lm = CausalLM.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if lm.device.type != "cpu" and cfg.device == "cpu":
        raise ValueError("fit runs where the model is")
    ctx = HeadContext.from_model(lm).to("cpu")
    _plan(lm, cfg, texts, log)
    traces = collect(lm, cfg, texts)
    timing["collect"] = time.perf_counter() - t0
    jump, x, y = train(traces["fit"], ctx, cfg)
    timing["train"] = time.perf_counter() - t0 - sum(timing.values())
    results, options = _calibrate(lm, ctx, cfg, jump, traces, log)
    timing["calibrate"] = time.perf_counter() - t0 - sum(timing.values())
    if cfg.all_level:
        results["all_level"] = _all_level(lm, ctx, cfg, x, y, traces["test"])
        timing["all_level"] = time.perf_counter() - t0 - sum(timing.values())
    timing["total"] = time.perf_counter() - t0
    results.update(model=cfg.model, num_layers=lm.num_layers, hidden_size=lm.hidden_size, vocab_size=lm.vocab_size,
                   rank=cfg.rank, split=texts.split, config=asdict(cfg),
                   samples={"fit_rows": int(x.shape[1]), **{k: len(t) for k, t in traces.items()}},
                   parameters=jump.num_parameters(), timing_s={k: round(v, 1) for k, v in timing.items()})
    _save(out, lm, cfg, jump, results, options)
    return results


def _plan(lm: CausalLM, cfg: FitConfig, texts: Texts, log: Any) -> None:
    sample = _prompts(lm, texts.fit, min(cfg.batch_size, cfg.fit_prompts), cfg.seed + 9, "fit")
    est = estimate(lm, cfg, sample)
    log(f"onejump fit: {lm.name} ({lm.num_layers} layers, d={lm.hidden_size}, V={lm.vocab_size}), "
        f"{torch.get_num_threads()} threads (load {os.getloadavg()[0]:.1f}); prompts: {cfg.fit_prompts} fit, "
        f"{cfg.val_prompts} validation "
        f"(split {texts.split}), {cfg.test_prompts} test, {cfg.new_tokens} new tokens each")
    log("estimated time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in est.items())
        + f"; total about {sum(est.values()) / 60:.0f} min")


def _calibrate(lm: CausalLM, ctx: HeadContext, cfg: FitConfig, jump: LowRankJumps, traces: dict[str, Traces],
               log: Any) -> tuple[dict[str, Any], dict[str, HeadChoice]]:
    L, cand = lm.num_layers, lens_candidates(lm.num_layers)
    val = {JUMP: tables(lm, ctx, jump, traces["val"], "val"), LENS: tables(lm, ctx, None, traces["val"], "val", cand)}
    gate = traces["fit"].first_prompts(cfg.gate_prompts)
    fit = None
    if "learned" in cfg.gates and cfg.gate_prompts > 0:
        fit = {JUMP: tables(lm, ctx, jump, gate, "gate", with_entropy=False),
               LENS: tables(lm, ctx, None, gate, "gate", cand, with_entropy=False)}
    gates = tuple(g for g in cfg.gates if g != "learned" or fit is not None)
    space = SearchSpace(gates, cfg.min_layers, cfg.strides, cfg.target)
    ms = measure(lm, jump, _any_gate(fit))
    choice, options = calibrate_heads(val, ms, space, fit, lens=cfg.lens)
    jump.with_lens(choice.lens_levels)
    test = {JUMP: tables(lm, ctx, jump, traces["test"], "test"),
            "identity": tables(lm, ctx, None, traces["test"], "test")}
    head_test = merge(test[JUMP], test["identity"], choice.lens_levels)
    best = choice.found.best
    log(f"stored: {best.gate} {best.threshold if best.gate != 'patience' else best.patience} from level "
        f"{best.min_layer} every {best.stride}, lens at {list(choice.lens_levels) or 'no level'}; validation lower "
        f"bound {best.lower_bound:.3f}, predicted {best.predicted_speedup:.3f}x")
    return {"choice": "lens" if choice.lens_levels else "jump", "lens_levels": list(choice.lens_levels),
            "calibration": best.as_dict(), "options": {k: c.report(L) for k, c in options.items()},
            "costs_ms": {k: round(v, 4) for k, v in ms.items()},
            "test": {"identity": summary(test["identity"]), "jump": summary(test[JUMP]),
                     "exit_head": summary(head_test),
                     "stored_setting": replay_report(head_test, best, choice.learned, choice.lens_levels, ms),
                     "by_option_and_gate": test_replays(test, options, ms)}}, options


def _any_gate(fit: dict[str, LevelTable] | None) -> LearnedGate | None:
    """A learned gate to time the learned check with (its weights do not change the time)."""
    from shortcuts.calibration.replay import fit_learned_gate

    return fit_learned_gate(fit[JUMP]) if fit is not None else None


def _all_level(lm: CausalLM, ctx: HeadContext, cfg: FitConfig, x: Tensor, y: Tensor, test: Traces) -> dict[str, Any]:
    """The comparison: one jump per level (N-NJTC, MSE then KL) on the same samples, on the test prompts."""
    _, bank = train_per_level(x, y, ctx, cfg.rank, kl_epochs=max(1, cfg.kl_epochs * 2), seed=cfg.seed)
    return {**summary(tables(lm, ctx, bank, test, "test", with_entropy=False)), "parameters": bank.num_parameters()}


def _save(out: Path, lm: CausalLM, cfg: FitConfig, jump: LowRankJumps, results: dict[str, Any],
          options: dict[str, HeadChoice]) -> None:
    """``jump.safetensors``: the chosen exit head and its setting; ``jump-<option>.safetensors``: each option
    searched (the jump everywhere; the lens where it predicts better) with its own setting, for comparisons."""
    report = {k: results[k] for k in ("test", "options", "lens_levels", "timing_s", "samples", "split")}
    for name, choice in options.items():
        art = JumpArtifact(copy.deepcopy(jump).with_lens(choice.lens_levels), cfg.model, lm.fingerprint(),
                           lm.num_layers, 0, [], str(cfg.corpus),
                           {"fit": {**report, "recipe": "joint jump, per-level norm, decode-matched, MSE then KL"}})
        store(art, choice.found, choice.learned, results["costs_ms"],
              {"corpus": f"{Path(cfg.corpus).name} (validation prompts, decode-matched)", "new_tokens": cfg.new_tokens})
        art.extra["exit_heads"] = results["options"]
        art.save(out / f"jump-{name}.safetensors")
        if name == results["choice"]:
            results["artifact"] = str(art.save(out / "jump.safetensors"))
    write_outputs(out, results, cfg.plots)


def write_outputs(out: Path, results: dict[str, Any], plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "summary.md").write_text(summary_markdown(results))
    if plots:
        plot_precision(results, out / "precision.png")


def summary_markdown(r: dict[str, Any]) -> str:
    t, c = r["test"], r["calibration"]
    rows = [("identity (logit lens)", t["identity"]), ("joint jump", t["jump"]), ("exit head served", t["exit_head"])]
    if "all_level" in r:
        rows.append(("all-level jumps (comparison)", r["all_level"]))
    s = t["stored_setting"]
    lines = [f"# onejump fit: {r['model']}", "",
             f"{r['num_layers']} layers, d = {r['hidden_size']}, V = {r['vocab_size']}; rank {r['rank']}; "
             f"lens at levels {r['lens_levels'] or 'none'}; time {r['timing_s']}", "",
             "| exit head (test prompts) | mean precision@1 | ceiling: mean exit (speed-up) |", "|---|---|---|"]
    lines += [f"| {name} | {m['mean_precision']:.3f} | {m['ceiling_mean_exit']:.2f} ({m['ceiling_speedup']:.3f}x) |"
              for name, m in rows]
    lines += ["", f"Stored setting: {c['gate']} threshold {c['threshold']} (patience {c['patience']}), from level "
              f"{c['min_layer']} every {c['stride']}: validation lower bound {c['lower_bound']:.3f}, predicted "
              f"{c['predicted_speedup']:.3f}x. On the test prompts: agreement {s['agreement']:.3f} (lower bound "
              f"{s['lower_bound']:.3f}), exit rate {s['exit_rate']:.3f}, mean exit {s['mean_exit']:.2f}, predicted "
              f"{s['predicted_speedup']:.3f}x.", "",
              "| level | " + " | ".join(str(i + 1) for i in range(r["num_layers"] - 1)) + " |",
              "|---" * r["num_layers"] + "|"]
    lines += [f"| {name} | " + " | ".join(f"{p:.2f}" for p in m["precision"]) + " |" for name, m in rows]
    lines += ["", "Each exit head's best setting of each gate (chosen on validation), on the test prompts:", "",
              "| exit head | gate | setting (threshold or patience, first level, stride) | agreement (lower bound) | "
              "exit rate | mean exit | predicted |", "|---|---|---|---|---|---|---|"]
    for option, by_gate in t["by_option_and_gate"].items():
        for g, x in by_gate.items():
            knob = x["patience"] if g == "patience" else x["threshold"]
            lines.append(f"| {option} | {g} | {knob}, {x['min_layer']}, {x['stride']} | {x['agreement']:.3f} "
                         f"({x['lower_bound']:.3f}) | {x['exit_rate']:.3f} | {x['mean_exit']:.2f} | "
                         f"{x['predicted_speedup']:.3f}x |")
    return "\n".join(lines) + "\n"


def plot_precision(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    t = {"identity (logit lens)": r["test"]["identity"], "joint jump": r["test"]["jump"],
         "exit head served": r["test"]["exit_head"]}
    if "all_level" in r:
        t["all-level jumps"] = r["all_level"]
    for name, m in t.items():
        ax.plot(range(1, r["num_layers"]), m["precision"], marker=".", label=f"{name} ({m['mean_precision']:.3f})")
    ax.set_xlabel("exit level")
    ax.set_ylabel("precision@1 (test prompts)")
    ax.set_title(f"{Path(r['model']).name}: exit heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
