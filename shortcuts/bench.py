"""``onejump bench``: the side-by-side timed run on anyone's prompts.

Arms, interleaved prompt by prompt (the order rotates, so a noisy neighbour hits every arm alike):
Hugging Face ``generate`` (the baseline), Hugging Face's prompt lookup (``hf_prompt_lookup``:
``generate(prompt_lookup_num_tokens=10)``, greedy, the same prompts), our full depth (``off``),
``approximate`` and ``exact`` at the setting the server would run for this artifact and these flags
(``calibration.resolve``); with ``--compile`` also the same three engine arms with compiled blocks
(``*_compiled``). Every arm generates exactly ``--new-tokens`` tokens per prompt (EOS ignored), so
tokens/s compare like with like. ``same_as_off`` is the fraction of generated tokens equal, position by
position, to full depth's. ``setting`` and ``exact_setting`` are the resolved settings' reports
(``Resolved.report``); ``exact_drafts`` says where exact mode's drafts came from: drafted and accepted
tokens by source, full-depth passes, and tokens per pass. Prompt files: ``shortcuts.prompts`` (text
lines, ``{"text": ...}``, ``{"messages": [...]}`` chat requests).

Imports of torch and the engine stay inside the functions that run: ``onejump --help`` builds this
command's parser without loading them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from shortcuts.calibration.setting import DENSE, Overrides, StoredCalibration, resolve_modes
from shortcuts.engine.settings import DRAFT_POLICIES, GATES, Mode
from shortcuts.timing import Arm, time_arms

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.engine.sequence import Generation, Stats
    from shortcuts.engine.settings import ExitSettings
    from shortcuts.jump import LowRankJumps


PROMPT_LOOKUP_TOKENS = 10  # Hugging Face's documented example value of prompt_lookup_num_tokens


def overrides(args: argparse.Namespace) -> Overrides:
    """The exit flags given (None: not given)."""
    return Overrides(gate=args.gate, threshold=args.threshold, min_layer=args.min_layer, stride=args.stride,
                     draft=getattr(args, "draft", None), max_draft=getattr(args, "max_draft", None),
                     ngram_min=getattr(args, "ngram_min", None), ngram_max=getattr(args, "ngram_max", None))


def hf_generate(lm: CausalLM, ids: list[int], n: int, **kw: int) -> list[int]:
    """Exactly ``n`` greedy tokens from Hugging Face ``generate`` (EOS suppressed), the baseline."""
    import torch

    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids], device=lm.device), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                            device=lm.device), **kw)
    return out[0, len(ids):].tolist()


def engine_arms(lm: CausalLM, jump: LowRankJumps, learned: LearnedGate | None, exits: ExitSettings,
                exact: ExitSettings, new_tokens: int, compile: bool,
                stats: list[Stats] | None = None) -> dict[str, Arm]:
    """Full depth, approximate and exact mode as arms (and compiled copies with ``compile``); ``stats``
    collects the exact arm's ``Stats`` of every call, in order."""
    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.settings import GenerationSettings

    arms: dict[str, Arm] = {}
    variants = [("", False), ("_compiled", True)] if compile else [("", False)]
    for suffix, compiled in variants:
        dec = EarlyExitDecoder(lm, jump, compile=compiled, learned_gate=learned)
        if compiled:
            print(f"compiled blocks in {dec.compile_seconds:.1f}s", file=sys.stderr)
        runs: tuple[tuple[Mode, ExitSettings], ...] = (("off", exits), ("approximate", exits), ("exact", exact))
        for mode, setting in runs:
            s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=replace(setting, mode=mode))
            keep = stats if mode == "exact" and not suffix else None
            arms[mode + suffix] = lambda ids, dec=dec, s=s, keep=keep: _tokens(dec.generate(ids, s), keep)  # type: ignore[misc]
    return arms


def _tokens(g: Generation, keep: list[Stats] | None) -> list[int]:
    if keep is not None:
        keep.append(g.stats)
    return g.tokens


def draft_report(stats: list[Stats]) -> dict[str, Any]:
    """Exact mode's drafts over the timed calls: drafted and accepted tokens by source, full-depth passes
    (verifications), and tokens decided per pass."""
    drafted: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for st in stats:
        for into, counts in ((drafted, st.drafted_by), (accepted, st.accepted_by)):
            for source, n in counts.items():
                into[source] = into.get(source, 0) + n
    passes = sum(st.verifications for st in stats)
    tokens = passes + sum(accepted.values())
    return {"drafted": drafted, "accepted": accepted,
            "acceptance": {k: round(accepted.get(k, 0) / n, 4) for k, n in drafted.items() if n},
            "verifications": passes, "tokens_per_verification": round(tokens / passes, 3) if passes else None}


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
    from shortcuts.engine.decoder import DEFAULT_MAX_SEQ_LEN
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.placement import parse_device_map
    from shortcuts.prompts import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    artifact = JumpArtifact.load(args.jump)
    device_map = parse_device_map(args.device_map) if args.device_map else None
    lm = CausalLM.load(args.model, dtype=args.dtype, device=args.device, device_map=device_map)
    artifact.check_model(lm)
    modes = resolve_modes(StoredCalibration.from_extra(artifact.extra), overrides(args), lm.num_layers, DENSE)
    context = getattr(lm.config, "max_position_embeddings", None) or lm.config.n_positions
    room = min(int(context), DEFAULT_MAX_SEQ_LEN) - args.new_tokens - 1  # what the engine's context leaves
    prompts = read_prompts(lm, args.prompts, args.max_prompts, max_tokens=room)
    arms: dict[str, Arm] = {"hf_generate": lambda ids: hf_generate(lm, ids, args.new_tokens),
                            "hf_prompt_lookup": lambda ids: hf_generate(
                                lm, ids, args.new_tokens, prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)}
    stats: list[Stats] = []
    arms.update(engine_arms(lm, artifact.jump.to(lm.device), LearnedGate.from_extra(artifact.extra),
                            modes["approximate"].settings, modes["exact"].settings, args.new_tokens, args.compile,
                            stats))
    result = summarize(time_arms(arms, prompts))
    return {**result, "setting": modes["approximate"].report(), "exact_setting": modes["exact"].report(),
            "exact_drafts": draft_report(stats[1:]),  # the first call is time_arms' warm-up
            "model": str(args.model), "jump": str(args.jump), "placement": lm.placement().describe(),
            "num_layers": lm.num_layers, "prompts": len(prompts),
            "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}


def text_report(r: dict[str, Any]) -> str:
    keys = ("gate", "threshold", "min_layer", "stride", "source")
    setting = {k: r["setting"][k] for k in keys}
    exact = {k: r["exact_setting"][k] for k in (*keys, "max_draft", "draft", "ngram_min", "ngram_max")}
    lines = [f"{r['prompts']} prompts x {r['new_tokens']} tokens, {r['threads']} thread(s), on {r['placement']}, "
             f"setting {setting}, exact {exact}",
             f"{'arm':<22} {'tok/s':>8} {'vs off':>7} {'same as off':>12}"]
    for name, v in r["tok_s"].items():
        lines.append(f"{name:<22} {v:8.2f} {r['speedup'][name]:7.2f} {r['same_as_off'][name]:12.3f}")
    d = r.get("exact_drafts")
    if d:
        lines.append(f"exact drafts: drafted {d['drafted']}, accepted {d['accepted']}, "
                     f"{d['tokens_per_verification']} tokens per full-depth pass")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("bench", help="time HF generate, full depth, approximate and exact side by side on prompts")
    model_args(p)
    p.add_argument("--jump", required=True, help="jump artifact (its stored exit setting is timed)")
    p.add_argument("--device-map", default=None, help="one model over several devices instead of --device: "
                   "cuda:0,cuda:1 (blocks split evenly), auto, balanced, sequential, or a JSON map (docs/scale.md)")
    p.add_argument("--prompts", required=True, help="a prompt file: .jsonl lines {\"text\": ...} or {\"messages\": "
                   "[...]} (a chat request: the model's chat template), or text, one prompt per line")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the engine arms with compiled blocks")
    p.add_argument("--gate", choices=GATES, default=None, help="exit flags: override the artifact's stored setting")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--draft", choices=DRAFT_POLICIES, default=None, help="exact mode's draft source (default: the "
                   "artifact's calibrated policy, else auto)")
    p.add_argument("--max-draft", type=int, default=None)
    p.add_argument("--ngram-min", type=int, default=None)
    p.add_argument("--ngram-max", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
