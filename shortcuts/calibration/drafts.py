"""Exact mode's draft policy, chosen by timing: which source drafts (``engine.drafts``), how many tokens
at most, which n-gram lengths, which exit setting.

Exact mode's output is the full model's whatever it drafts, so the only question is time. Every
candidate (``candidates``) decodes the same prompts with the engine, arms interleaved prompt by prompt
(``timing.time_arms``), each workload (e.g. grounded chat requests and open generation) on its own, and
is compared with never drafting (draft "none") on each. ``choose`` keeps the candidate fastest on the
workload that drafts pay on (the first) among those never slower than ``floor`` on any workload and faster
than ``margin`` on the first; else never drafting. Each ``auto`` candidate starts from a blank record
of what drafts were accepted (``drafts.DraftStats``), so no candidate learns from another's run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from shortcuts.adapter import CausalLM
from shortcuts.calibration.setting import ModeSetting
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.drafts import DraftStats
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import LowRankJumps
from shortcuts.timing import Arm, time_arms

NEVER_NAME = "none"


@dataclass(frozen=True)
class DraftCandidate:
    name: str
    setting: ExitSettings  # mode "exact"

    def mode_setting(self, **measured: Any) -> ModeSetting:
        s = self.setting
        return ModeSetting(gate=s.gate, threshold=s.threshold, min_layer=s.min_layer, stride=s.stride,
                           patience=s.patience, max_draft=s.max_draft, draft=s.draft, ngram_min=s.ngram_min,
                           ngram_max=s.ngram_max, measured=measured)


def candidates(num_layers: int, exit_setting: ExitSettings | None, max_drafts: tuple[int, ...] = (4, 8, 12),
               ngram_ranges: tuple[tuple[int, int], ...] = ((1, 4), (2, 4))) -> list[DraftCandidate]:
    """Never drafting, then ``auto`` at every max_draft x n-gram range (its exit part at ``exit_setting``
    when one is given, else without exit drafts: threshold 1.0), the fixed ``ngram`` policy at the middle
    max_draft, and exit drafting alone at ``exit_setting``."""
    no_exit = ExitSettings(mode="exact", threshold=1.0)
    exits = exit_setting if exit_setting is not None else no_exit
    exits = replace(exits, mode="exact", kv_policy="catchup")
    out = [DraftCandidate(NEVER_NAME, replace(no_exit, draft="none"))]
    for lo, hi in ngram_ranges:
        for d in max_drafts:
            out.append(DraftCandidate(f"auto x{d} n{lo}-{hi}", replace(no_exit, draft="auto", max_draft=d,
                                                                       ngram_min=lo, ngram_max=hi)))
    middle = max_drafts[len(max_drafts) // 2]
    lo, hi = ngram_ranges[0]
    out.append(DraftCandidate(f"ngram x{middle} n{lo}-{hi}", replace(no_exit, draft="ngram", max_draft=middle,
                                                                     ngram_min=lo, ngram_max=hi)))
    if exit_setting is not None and exits.check_levels(num_layers):
        out.append(DraftCandidate(f"exit {exits.threshold:g}@{exits.min_layer}/{exits.stride}",
                                  replace(exits, draft="exit", max_draft=4)))
        out.append(DraftCandidate(f"auto+exit x{middle} n{lo}-{hi}", replace(exits, draft="auto", max_draft=middle,
                                                                            ngram_min=lo, ngram_max=hi)))
    return out


def time_candidates(lm: CausalLM, jump: LowRankJumps | None, learned: LearnedGate | None,
                    workloads: dict[str, list[list[int]]], cands: list[DraftCandidate],
                    new_tokens: int) -> dict[str, dict[str, float]]:
    """Each candidate's speed against never drafting (tokens/s ratio), per workload: arms interleaved
    prompt by prompt, every candidate ``new_tokens`` tokens per prompt (EOS ignored)."""
    dec = EarlyExitDecoder(lm, jump, learned_gate=learned)
    dec.step_costs  # timed once, before any arm runs  # noqa: B018
    speeds: dict[str, dict[str, float]] = {c.name: {} for c in cands}
    for workload, prompts in workloads.items():
        arms: dict[str, Arm] = {c.name: _arm(dec, c, new_tokens) for c in cands}
        timed = time_arms(arms, prompts)
        tok_s = {k: sum(map(len, v["tokens"])) / v["seconds"] for k, v in timed.items()}
        for name, v in tok_s.items():
            speeds[name][workload] = round(v / tok_s[NEVER_NAME], 4)
    return speeds


def _arm(dec: EarlyExitDecoder, c: DraftCandidate, new_tokens: int) -> Arm:
    stats = DraftStats()  # this candidate's own record of accepted drafts
    g = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=c.setting)

    def run(ids: list[int]) -> list[int]:
        dec.draft_stats = stats
        return dec.generate(ids, g).tokens

    return run


def choose(cands: list[DraftCandidate], speeds: dict[str, dict[str, float]], margin: float = 1.03,
           floor: float = 0.98) -> DraftCandidate:
    """The candidate fastest on the first workload, among those at least ``margin`` there and at least
    ``floor`` on every workload; never drafting when none is."""
    never = next(c for c in cands if c.name == NEVER_NAME)
    first = next(iter(next(iter(speeds.values()))), None)
    if first is None:
        return never
    ok = [c for c in cands if c.name != NEVER_NAME and speeds[c.name][first] >= margin
          and all(v >= floor for v in speeds[c.name].values())]
    return max(ok, key=lambda c: speeds[c.name][first], default=never)
