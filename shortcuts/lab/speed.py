"""``onejump bench``: the side-by-side timed run on anyone's prompts.

Arms, interleaved prompt by prompt (the order rotates, so a noisy neighbour hits every arm alike):
Hugging Face ``generate`` (the baseline), our full depth (``off``), ``approximate`` and ``exact``
at the artifact's stored exit setting (or the flags given); with ``--compile`` also the same three
engine arms with compiled blocks (``*_compiled``). Every arm generates exactly ``--new-tokens``
tokens per prompt (EOS ignored), so tokens/s compare like with like. ``same_as_off`` is the
fraction of generated tokens equal, position by position, to full depth's.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.engine.settings import ExitSettings, Mode

Arm = Callable[[list[int]], list[int]]


def stored_exit(extra: dict[str, Any], args: argparse.Namespace, num_layers: int) -> ExitSettings:
    """The exit setting to time: the flags given, else the artifact's calibration, else threshold 0.9."""
    from shortcuts.engine.settings import ExitSettings

    cal = extra.get("calibration", {})
    gate = args.gate or cal.get("gate", "confidence")
    threshold = args.threshold if args.threshold is not None else float(cal.get("threshold", 0.9))
    min_layer = args.min_layer or int(cal.get("min_layer", 1))
    stride = args.stride or int(cal.get("stride", 1))
    s = ExitSettings(mode="approximate", gate=gate, threshold=threshold, min_layer=min_layer, stride=stride)
    s.check_levels(num_layers)
    return s


def stored_exact(extra: dict[str, Any], args: argparse.Namespace, approximate: ExitSettings) -> ExitSettings:
    """Exact mode's setting: the flags given (as for approximate), else the artifact's exact
    calibration (``extra["calibration_exact"]``), else the approximate setting."""
    from dataclasses import replace

    from shortcuts.artifact import exact_setting

    flags = (args.gate, args.threshold, args.min_layer, args.stride)
    own = exact_setting(extra.get("calibration_exact"), approximate.gate) if flags == (None, None, None, None) else None
    return replace(approximate, mode="exact", **(own or {}))


def engine_arms(lm: CausalLM, jump: Any, exits: ExitSettings, exact: ExitSettings, new_tokens: int,
                compile: bool) -> dict[str, Arm]:
    from dataclasses import replace

    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.settings import GenerationSettings

    arms: dict[str, Arm] = {}
    variants = [("", False), ("_compiled", True)] if compile else [("", False)]
    for suffix, compiled in variants:
        dec = EarlyExitDecoder(lm, jump, compile=compiled)
        if compiled:
            print(f"compiled blocks in {dec.compile_seconds:.1f}s", file=sys.stderr)
        runs: tuple[tuple[Mode, ExitSettings], ...] = (("off", exits), ("approximate", exits), ("exact", exact))
        for mode, setting in runs:
            s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=replace(setting, mode=mode))
            arms[mode + suffix] = lambda ids, dec=dec, s=s: dec.generate(ids, s).tokens  # type: ignore[misc]
    return arms


def time_arms(arms: dict[str, Arm], prompts: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Seconds and tokens per arm, arms interleaved prompt by prompt (after one warm-up prompt)."""
    from tqdm import tqdm

    names = list(arms)
    for name in names:
        arms[name](prompts[0])
    out: dict[str, dict[str, Any]] = {n: {"seconds": 0.0, "tokens": []} for n in names}
    for k, ids in enumerate(tqdm(prompts, desc="bench", unit="prompt")):
        for name in names[k % len(names):] + names[: k % len(names)]:
            t0 = time.perf_counter()
            tokens = arms[name](ids)
            out[name]["seconds"] += time.perf_counter() - t0
            out[name]["tokens"].append(tokens)
    return out


def summarize(timed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    off = [t for seq in timed["off"]["tokens"] for t in seq]
    tok_s, same = {}, {}
    for name, r in timed.items():
        flat = [t for seq in r["tokens"] for t in seq]
        tok_s[name] = len(flat) / r["seconds"]
        same[name] = sum(a == b for a, b in zip(flat, off, strict=False)) / max(len(off), 1)
    return {"tok_s": tok_s, "speedup": {n: v / tok_s["off"] for n, v in tok_s.items()}, "same_as_off": same}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.lab.bench import hf_generate
    from shortcuts.lab.traces import read_prompts
    from shortcuts.placement import parse_device_map

    if args.threads:
        torch.set_num_threads(args.threads)
    artifact = JumpArtifact.load(args.jump)
    device_map = parse_device_map(args.device_map) if args.device_map else None
    lm = CausalLM.load(args.model, dtype=args.dtype, device=args.device, device_map=device_map)
    artifact.check_model(lm)
    exits = stored_exit(artifact.extra, args, lm.num_layers)
    exact = stored_exact(artifact.extra, args, exits)
    prompts = read_prompts(lm, args.prompts, args.max_prompts, max_tokens=256)
    arms: dict[str, Arm] = {"hf_generate": lambda ids: hf_generate(lm, ids, args.new_tokens)}
    arms.update(engine_arms(lm, artifact.jump.to(lm.device), exits, exact, args.new_tokens, args.compile))
    result = summarize(time_arms(arms, prompts))
    keys = ("gate", "threshold", "min_layer", "stride")
    return {**result, "setting": {k: getattr(exits, k) for k in keys},
            "exact_setting": {k: getattr(exact, k) for k in (*keys, "max_draft")},
            "model": str(args.model), "jump": str(args.jump), "placement": lm.placement().describe(),
            "num_layers": lm.num_layers, "prompts": len(prompts),
            "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}


def text_report(r: dict[str, Any]) -> str:
    lines = [f"{r['prompts']} prompts x {r['new_tokens']} tokens, {r['threads']} thread(s), on {r['placement']}, "
             f"setting {r['setting']}, exact {r['exact_setting']}",
             f"{'arm':<22} {'tok/s':>8} {'vs off':>7} {'same as off':>12}"]
    for name, v in r["tok_s"].items():
        lines.append(f"{name:<22} {v:8.2f} {r['speedup'][name]:7.2f} {r['same_as_off'][name]:12.3f}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("bench", help="time HF generate, full depth, approximate and exact side by side on prompts")
    model_args(p)
    p.add_argument("--jump", required=True, help="jump artifact (its stored exit setting is timed)")
    p.add_argument("--device-map", default=None, help="one model over several devices instead of --device: "
                   "cuda:0,cuda:1 (blocks split evenly), auto, balanced, sequential, or a JSON map (docs/scale.md)")
    p.add_argument("--prompts", required=True, help=".jsonl ({\"text\": ...} per line) or text, one prompt per line")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the engine arms with compiled blocks")
    p.add_argument("--gate", choices=["confidence", "entropy", "patience"], default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
