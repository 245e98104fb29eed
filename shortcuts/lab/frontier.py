"""The quality-speed frontier of approximate mode: the stored setting and more aggressive ones, timed and
scored against full depth on the same prompts.

    python -m shortcuts.lab.frontier --jump docs/results/smollm2-135m/jump.safetensors \\
        --prompts docs/exits/heldout20-seed2027.jsonl --max-prompts 20 --new-tokens 48 --chat \\
        --out docs/fit/frontier-smollm2

Arms, interleaved prompt by prompt (the order rotates): full depth (``off``), then approximate mode at the
artifact's stored setting (``calibration.resolve``) and at the same gate with lower thresholds (``--scales``
of the stored threshold; patience: fewer checks in a row), at explicit settings of the same jump
(``--setting gate:threshold:min_layer:stride``), and at the stored setting of other artifacts of the same model
(``--also-jump``: each its own exit head, named ``stored@<file stem>``). For each setting: speed against full depth
(sum of full depth's seconds over the setting's, one thread), the free-running tokens equal to full
depth's position by position (``same_as_off``), ROUGE-L F1 of the generated tokens against full depth's
(longest common subsequence), exit rate and mean exit layer. ``--chat`` wraps each prompt as a user message
of the model's chat template (chat requests); a ``{"messages": ...}`` line is a chat request anyway
(``shortcuts.prompts``), any other line plain text to continue (its last 64 tokens). A plot of quality
against speed is written beside the JSON. Task scores (lm-eval) come from ``evals/report.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.agreement import resolve_model
from shortcuts.calibration.setting import Overrides, StoredCalibration, resolve
from shortcuts.engine import EarlyExitDecoder
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.prompts import encode, read_prompt_file


def rouge_l(a: list[int], b: list[int]) -> float:
    """ROUGE-L F1 of two token sequences (longest common subsequence)."""
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def settings_of(stored: ExitSettings, scales: list[float]) -> dict[str, ExitSettings]:
    """The stored setting and more aggressive ones of the same gate."""
    out = {"stored": stored}
    for k in scales:
        if stored.gate == "patience":
            p = max(1, round(stored.patience * k))
            out[f"patience {p}"] = replace(stored, patience=p)
        elif stored.gate == "entropy":
            out[f"entropy {stored.threshold / k:.3g}"] = replace(stored, threshold=round(stored.threshold / k, 4))
        else:
            out[f"{stored.gate} {stored.threshold * k:.3g}"] = replace(stored, threshold=round(stored.threshold * k, 4))
    return out


def parse_setting(spec: str) -> ExitSettings:
    """``gate:threshold:min_layer:stride`` (patience: the threshold field is the checks in a row)."""
    try:
        gate, knob, first, stride = spec.split(":")
        if gate == "patience":
            return ExitSettings(mode="approximate", gate="patience", patience=int(knob), min_layer=int(first),
                                stride=int(stride))
        return ExitSettings(mode="approximate", gate=gate, threshold=float(knob),  # type: ignore[arg-type]
                            min_layer=int(first), stride=int(stride))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--setting {spec!r}: gate:threshold:min_layer:stride ({e})") from e


def name_of(s: ExitSettings) -> str:
    knob = s.patience if s.gate == "patience" else f"{s.threshold:.3g}"
    return f"{s.gate} {knob} @{s.min_layer}/{s.stride}"


def prompts_of(lm: CausalLM, path: str, n: int, chat: bool) -> list[list[int]]:
    """Token ids of the first ``n`` prompts; ``chat``: a text line becomes a user message."""
    prompts = read_prompt_file(path)[:n]
    if chat:
        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return [ids if not isinstance(p, str) else ids[-64:] for p in prompts for ids in [encode(lm.tokenizer, p)]]


def arms_of(args: argparse.Namespace, lm: CausalLM,
            art: JumpArtifact) -> tuple[dict[str, ExitSettings], dict[str, EarlyExitDecoder]]:
    """Every arm's setting and the decoder (exit head) it runs with."""
    stored = resolve(StoredCalibration.from_extra(art.extra), Overrides(), lm.num_layers).settings
    arms = {"off": ExitSettings(mode="off"), **settings_of(stored, args.scales),
            **{name_of(s): s for s in args.setting}}
    dec = EarlyExitDecoder(lm, art.jump.to(lm.device), learned_gate=LearnedGate.from_extra(art.extra))
    decoders = dict.fromkeys(arms, dec)
    for path in args.also_jump:
        other = JumpArtifact.load(path)
        other.check_model(lm)
        name = f"stored@{Path(path).stem}"
        arms[name] = resolve(StoredCalibration.from_extra(other.extra), Overrides(), lm.num_layers).settings
        decoders[name] = EarlyExitDecoder(lm, other.jump.to(lm.device),
                                          learned_gate=LearnedGate.from_extra(other.extra))
    return arms, decoders


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    art = JumpArtifact.load(args.jump)
    lm = CausalLM.load(resolve_model(args.model, art))
    art.check_model(lm)
    arms, decoders = arms_of(args, lm, art)
    prompts = prompts_of(lm, args.prompts, args.max_prompts, args.chat)
    seconds = dict.fromkeys(arms, 0.0)
    tokens: dict[str, list[list[int]]] = {k: [] for k in arms}
    levels: dict[str, list[int]] = {k: [] for k in arms}
    work = {k: [0, 0, 0] for k in arms}  # fed tokens, (token, block) evaluations, gate checks
    names = list(arms)
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:
            gs = GenerationSettings(max_new_tokens=args.new_tokens, stop_token_ids=(), exit=arms[name])
            t0 = time.perf_counter()
            g = decoders[name].generate(ids, gs)
            seconds[name] += time.perf_counter() - t0
            tokens[name].append(g.tokens)
            levels[name] += [t.exit_layer for t in g.trace]
            w = work[name]
            w[0], w[1], w[2] = w[0] + g.stats.steps, w[1] + g.stats.layers_computed, w[2] + g.stats.exit_checks
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    return report(lm, arms, seconds, tokens, levels, work, args)


def report(lm: CausalLM, arms: dict[str, ExitSettings], seconds: dict[str, float], tokens: dict[str, list[list[int]]],
           levels: dict[str, list[int]], work: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Per arm: timed speed against ``off``, quality against ``off``'s tokens, exits, and the blocks actually
    run per fed token (catch-up included: a skipped block that catch-up runs later is not saved)."""
    L, off = lm.num_layers, tokens["off"]
    out: dict[str, Any] = {"model": lm.name, "jump": args.jump, "prompts": len(off), "new_tokens": args.new_tokens,
                           "chat": args.chat, "threads": args.threads, "settings": {}}
    for name, s in arms.items():
        same = sum(a == b for x, y in zip(tokens[name], off, strict=True) for a, b in zip(x, y, strict=True))
        lv = torch.tensor(levels[name], dtype=torch.float)
        out["settings"][name] = {
            "gate": s.gate, "threshold": s.threshold, "min_layer": s.min_layer, "stride": s.stride,
            "patience": s.patience, "speedup": round(seconds["off"] / seconds[name], 4),
            "tok_s": round(sum(map(len, tokens[name])) / seconds[name], 2),
            "same_as_off": round(same / sum(map(len, off)), 4),
            "rouge_l": round(sum(rouge_l(x, y) for x, y in zip(tokens[name], off, strict=True)) / len(off), 4),
            "exit_rate": round(float((lv < L).float().mean()), 4), "mean_exit": round(float(lv.mean()), 3),
            "blocks_per_step": round(work[name][1] / max(work[name][0], 1), 3),
            "checks_per_step": round(work[name][2] / max(work[name][0], 1), 3)}
    return out


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    s = r["settings"]
    x = [v["speedup"] for v in s.values()]
    ax.plot(x, [v["rouge_l"] for v in s.values()], "o-", label="ROUGE-L vs full depth")
    ax.plot(x, [v["same_as_off"] for v in s.values()], "s--", label="tokens equal to full depth")
    for name, v in s.items():
        ax.annotate(name, (v["speedup"], v["rouge_l"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("speed vs full depth (timed, one thread)")
    ax.set_ylabel("quality against full depth's output")
    ax.set_title(f"{Path(r['model']).name}: approximate mode, {r['prompts']} prompts x {r['new_tokens']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.frontier", description=__doc__.split("\n\n")[0])
    p.add_argument("--jump", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--scales", type=float, nargs="+", default=[0.85, 0.7, 0.55, 0.4])
    p.add_argument("--setting", type=parse_setting, action="append", default=[],
                   help="one more setting of the same jump, gate:threshold:min_layer:stride (repeatable)")
    p.add_argument("--also-jump", action="append", default=[],
                   help="another artifact of the same model: its stored setting is one more arm (repeatable)")
    p.add_argument("--chat", action="store_true", help="a text line becomes a user message (chat request)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="writes <out>.json and <out>.png")
    a = p.parse_args(argv)
    r = run(a)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    plot(r, out.with_suffix(".png"))
    for name, v in r["settings"].items():
        print(f"{name:18s} {v['speedup']:.3f}x  same_as_off {v['same_as_off']:.3f}  ROUGE-L {v['rouge_l']:.3f}  "
              f"exit rate {v['exit_rate']:.3f}  mean exit {v['mean_exit']:.2f}  blocks/step {v['blocks_per_step']:.2f}")


if __name__ == "__main__":
    main()
