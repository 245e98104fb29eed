"""The quality-speed frontier of approximate mode: the stored setting and more aggressive ones, timed and
scored against full depth on the same prompts.

    python -m shortcuts.lab.frontier --jump docs/results/smollm2-135m/jump.safetensors \\
        --prompts docs/exits/heldout20-seed2027.jsonl --max-prompts 20 --new-tokens 48 --chat \\
        --out docs/fit/frontier-smollm2

Arms, interleaved prompt by prompt (the order rotates): full depth (``off``), then approximate mode at the
artifact's stored setting (``calibration.resolve``) and at the same gate with lower thresholds (``--scales``
of the stored threshold; patience: fewer checks in a row). For each setting: speed against full depth
(sum of full depth's seconds over the setting's, one thread), the free-running tokens equal to full
depth's position by position (``same_as_off``), ROUGE-L F1 of the generated tokens against full depth's
(longest common subsequence), exit rate and mean exit layer. ``--chat`` wraps each prompt as a user message
of the model's chat template (chat requests), else prompts are plain text to continue. A plot of quality
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
from shortcuts.collect import read_corpus
from shortcuts.engine import EarlyExitDecoder
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import ExitSettings, GenerationSettings


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


def prompts_of(lm: CausalLM, path: str, n: int, chat: bool) -> list[list[int]]:
    texts = read_corpus(path)[:n]
    if not chat:
        return [lm.tokenizer(t)["input_ids"][-64:] for t in texts]
    return [list(lm.tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True))
            for t in texts]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    art = JumpArtifact.load(args.jump)
    lm = CausalLM.load(resolve_model(args.model, art))
    art.check_model(lm)
    stored = resolve(StoredCalibration.from_extra(art.extra), Overrides(), lm.num_layers).settings
    arms = {"off": ExitSettings(mode="off"), **settings_of(stored, args.scales)}
    dec = EarlyExitDecoder(lm, art.jump.to(lm.device), learned_gate=LearnedGate.from_extra(art.extra))
    prompts = prompts_of(lm, args.prompts, args.max_prompts, args.chat)
    seconds = dict.fromkeys(arms, 0.0)
    tokens: dict[str, list[list[int]]] = {k: [] for k in arms}
    levels: dict[str, list[int]] = {k: [] for k in arms}
    names = list(arms)
    for i, ids in enumerate(prompts):
        for name in names[i % len(names):] + names[: i % len(names)]:
            gs = GenerationSettings(max_new_tokens=args.new_tokens, stop_token_ids=(), exit=arms[name])
            t0 = time.perf_counter()
            g = dec.generate(ids, gs)
            seconds[name] += time.perf_counter() - t0
            tokens[name].append(g.tokens)
            levels[name] += [t.exit_layer for t in g.trace]
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    return report(lm, arms, seconds, tokens, levels, args)


def report(lm: CausalLM, arms: dict[str, ExitSettings], seconds: dict[str, float], tokens: dict[str, list[list[int]]],
           levels: dict[str, list[int]], args: argparse.Namespace) -> dict[str, Any]:
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
            "exit_rate": round(float((lv < L).float().mean()), 4), "mean_exit": round(float(lv.mean()), 3)}
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
    p.add_argument("--chat", action="store_true")
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
              f"exit rate {v['exit_rate']:.3f}  mean exit {v['mean_exit']:.2f}")


if __name__ == "__main__":
    main()
