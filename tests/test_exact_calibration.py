"""Exact mode's own calibration: the replay against the engine, its cost arithmetic, the search,
and what the server and the bench take from the artifact."""

from __future__ import annotations

import argparse

import pytest
import torch
from support.models import build_tiny, fitted_jump, prompt_ids, settings, sharpen

from shortcuts.calibration.costs import CostModel
from shortcuts.calibration.exact import NEVER, ExactCalibration, exact_speedup, replay_exact, search_exact, timed_choice
from shortcuts.calibration.replay import checks, replay
from shortcuts.calibration.table import LevelTable, continuations, level_table
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.settings import ExitSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(levels: list[list[int]], right: list[list[bool]], L: int = 10) -> LevelTable:
    """A hand-made table whose confidence gate at 0.5 (checked at every level) exits at ``levels``
    (L: no exit), with the exit's top-1 right or wrong as ``right`` says; one list per prompt."""
    conf, top, final, prompt = [], [], [], []
    for p, (lv, ok) in enumerate(zip(levels, right, strict=True)):
        for level, good in zip(lv, ok, strict=True):
            c = torch.zeros(L - 1)
            if level < L:
                c[level - 1 :] = 0.9
            conf.append(c)
            top.append(torch.full((L - 1,), 7 if good else 8))
            final.append(7)
            prompt.append(p)
    return LevelTable(torch.stack(conf), torch.zeros(len(conf), L - 1), torch.stack(top), torch.tensor(final),
                      torch.tensor(prompt), L)


def _speed(table: LevelTable, max_draft: int, cost: CostModel, skip: float = 0.0) -> tuple[float, int, int]:
    s = ExitSettings(mode="approximate", gate="confidence", threshold=0.5, min_layer=1, stride=1)
    level, picked = replay(table, s)
    return exact_speedup(table, level, picked == table.final_top, checks(level, s, table.num_layers),
                         max_draft, cost, skip)


def test_exact_speedup_counts_drafting_verification_and_rejections() -> None:
    L, head, check = 10, 2.0, 0.5
    cost = CostModel(check=check, head=head)
    # two right drafts at level 3, then a step that does not exit: one cycle, 3 tokens
    speed, drafted, accepted = _speed(_table([[3, 3, L]], [[True, True, True]]), 4, cost)
    spent = 2 * (3 + 3 * check) + (L + (L - 1) * check + head)  # the verify step checked every level, no exit
    assert (drafted, accepted) == (2, 2)
    assert speed == pytest.approx(3 * (L + head) / spent)
    # the first draft wrong: 1 token from the cycle, then the replay goes on from the next step
    speed, drafted, accepted = _speed(_table([[3, L, L]], [[False, True, True]]), 4, cost)
    first = (3 + 3 * check) + (L + (L - 1) * check + head)
    rest = L + (L - 1) * check + head  # steps 1 and 2 (after the correction) go full depth
    assert (drafted, accepted) == (1, 0)
    assert speed == pytest.approx(3 * (L + head) / (first + 2 * rest))
    # max_draft 1: the second draft's step verifies at full depth without checking
    speed, drafted, accepted = _speed(_table([[3, 3, L]], [[True, True, True]]), 1, cost, skip=0.1)
    assert (drafted, accepted) == (1, 1)
    cycle = (3 + 3 * check + 0.1 * (L - 3)) + (L + head)
    assert speed == pytest.approx(3 * (L + head) / (cycle + L + (L - 1) * check + head))


def test_search_never_drafts_when_drafts_are_wrong_and_drafts_when_they_pay() -> None:
    cost = CostModel(check=0.2, head=2.0)
    wrong = _table([[2] * 12] * 3, [[False] * 12] * 3)
    assert search_exact(wrong, cost, 0.0) == [NEVER]
    good = _table([[2] * 12] * 3, [[True] * 12] * 3)
    ranked = search_exact(good, cost, 0.0, max_drafts=(1, 2, 4), keep=3)
    assert len(ranked) == 3
    assert [c.predicted_speedup for c in ranked] == sorted((c.predicted_speedup for c in ranked), reverse=True)
    best = ranked[0]
    assert best.threshold < 1.0
    assert best.max_draft == 4
    assert best.predicted_speedup > 2.0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_replayed_exact_mode_drafts_and_accepts_what_the_engine_does(arch: str) -> None:
    """Greedy exact mode with one draft per verification: the replay's drafts and acceptances are
    the engine's, step for step (every draft is made on the full model's prefix)."""
    lm = sharpen(build_tiny(arch))
    dec = EarlyExitDecoder(lm, fitted_jump(lm))
    base = prompt_ids(lm)
    prompts = [base, base[3:], base[:7]]
    conts = continuations(lm, prompts, new_tokens=16)
    table = level_table(lm, dec.exit_head, prompts, conts, batch_size=3, with_entropy=False)
    drafted = 0
    for threshold in (0.3, 0.5, 0.7):
        c = ExactCalibration("confidence", threshold, 2, 1, 1, 0.0, 0, 0)
        replayed = replay_exact(table, c.exit_settings(), CostModel(check=0.1, head=1.0), 0.0)
        engine = [dec.generate(p, settings(n=16, mode="exact", draft="exit", threshold=threshold, min_layer=2,
                                             max_draft=1))
                  for p in prompts]
        assert [g.tokens for g in engine] == conts
        assert replayed["drafted"] == sum(g.stats.drafted for g in engine)
        assert replayed["accepted"] == sum(g.stats.accepted for g in engine)
        drafted += replayed["drafted"]
    assert drafted > 0


def test_timed_choice_keeps_never_drafting_unless_a_candidate_is_faster() -> None:
    """A candidate that cannot be faster (it drafts at the first level with a zero threshold and
    every draft is re-run) is not chosen over never drafting."""
    lm = sharpen(build_tiny("llama"))
    jump = fitted_jump(lm)
    base = prompt_ids(lm)
    slow = ExactCalibration("confidence", 0.0, 1, 1, 1, 9.9, 0, 0)
    chosen, speed = timed_choice(lm, jump, [base, base[2:]], [slow], new_tokens=6, margin=10.0)
    assert chosen == NEVER
    assert set(speed) == {"1@1/1 x1", "0@1/1 x1"}
    assert speed["1@1/1 x1"] == 1.0


def test_server_and_bench_take_exact_modes_own_setting() -> None:
    from service.config import Settings
    from service.loading import exit_policy
    from shortcuts.bench import overrides
    from shortcuts.calibration import StoredCalibration, resolve_modes

    cal = {"gate": "confidence", "threshold": 0.6, "min_layer": 4, "stride": 2}
    own = {"mode": "exact", "gate": "confidence", "threshold": 1.0, "min_layer": 1, "stride": 1, "max_draft": 2}
    fields = ("gate", "threshold", "min_layer", "stride", "max_draft")
    extra = {"calibration": cal, "calibration_exact": own}
    d = exit_policy(extra, Settings(model="m"), 8).report()
    assert {k: d["approximate"][k] for k in fields[:4]} == {"gate": "confidence", "threshold": 0.6, "min_layer": 4,
                                                             "stride": 2}
    assert {k: d["exact"][k] for k in fields} == {"gate": "confidence", "threshold": 1.0, "min_layer": 1, "stride": 1,
                                                  "max_draft": 2}
    flagged = exit_policy(extra, Settings(model="m", exit_threshold=0.8), 8).report()
    assert flagged["exact"]["threshold"] == flagged["approximate"]["threshold"] == 0.8  # flags set both modes
    assert flagged["exact"]["min_layer"] == 1  # field by field: the rest is exact mode's own setting
    stored = StoredCalibration.from_extra({"calibration": cal, "calibration_exact": own})
    args = argparse.Namespace(gate=None, threshold=None, min_layer=None, stride=None)
    modes = resolve_modes(stored, overrides(args), 8)
    approx, exact = modes["approximate"].settings, modes["exact"].settings
    assert (approx.threshold, exact.mode, exact.threshold, exact.max_draft) == (0.6, "exact", 1.0, 2)
    args.threshold = 0.7
    assert resolve_modes(stored, overrides(args), 8)["exact"].settings.threshold == 0.7


# --- the draft policy, chosen by timing --------------------------------------------------------------------
def test_draft_candidates_and_the_choice_rule() -> None:
    from shortcuts.calibration.drafts import NEVER_NAME, DraftCandidate, candidates, choose

    plain = candidates(num_layers=4, exit_setting=None)
    assert plain[0].name == NEVER_NAME
    assert plain[0].setting.draft == "none"
    assert {c.setting.draft for c in plain} == {"none", "auto", "ngram"}  # no exit setting: no exit drafts
    assert all(c.setting.threshold == 1.0 for c in plain)  # auto without exit checks
    exits = ExitSettings(mode="approximate", threshold=0.6, min_layer=2)
    with_exit = candidates(4, exits)
    assert {c.setting.draft for c in with_exit} == {"none", "auto", "ngram", "exit"}
    assert any(c.setting.draft == "auto" and c.setting.threshold == 0.6 for c in with_exit)
    assert len(candidates(4, ExitSettings(mode="approximate", threshold=1.0))) == len(plain)  # no check level
    a, b, c = (DraftCandidate(n, ExitSettings(mode="exact", draft="auto")) for n in ("a", "b", "c"))
    never = plain[0]
    speeds = {NEVER_NAME: {"grounded": 1.0, "open": 1.0}, "a": {"grounded": 1.8, "open": 0.95},
              "b": {"grounded": 1.5, "open": 1.0}, "c": {"grounded": 1.6, "open": 0.99}}
    assert choose([never, a, b, c], speeds) is c  # a loses on open generation
    assert choose([never, a], speeds) is never
    assert choose([never, b], {NEVER_NAME: {"g": 1.0}, "b": {"g": 1.02}}) is never  # under the margin


def test_exact_only_calibration_stores_a_timed_draft_policy(tmp_path) -> None:
    """``onejump calibrate --exact-only --exact-prompts``: exact mode's setting becomes one of the timed
    candidates, with every candidate's speed per workload; approximate mode's stored setting stays."""
    import json

    from support.models import save_tiny, tiny_artifact

    from shortcuts.adapter import CausalLM
    from shortcuts.calibration.calibrate import run_calibrate
    from shortcuts.calibration.config import CalibrateConfig
    from shortcuts.calibration.drafts import candidates
    from shortcuts.calibration.setting import ModeSetting, Overrides, StoredCalibration, resolve

    folder = save_tiny(tmp_path / "tiny")
    lm = CausalLM.load(str(folder))
    art = tiny_artifact(lm)
    StoredCalibration().with_setting("none", "approximate", ModeSetting(threshold=0.7, min_layer=2)).to_extra(
        art.extra)
    path = art.save(tmp_path / "jump.safetensors")
    grounded = tmp_path / "grounded.jsonl"
    grounded.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the king of the river " * k}]})
                                + "\n" for k in (2, 3)))
    opened = tmp_path / "open.txt"
    opened.write_text("the war\nthe old city\n")
    done = run_calibrate(CalibrateConfig(jump=str(path), model=str(folder), corpus="-", new_tokens=6,
                                         exact_prompts=(str(grounded), str(opened)), exact_only=True))
    assert done.approximate is None
    assert done.exact is not None
    names = [c.name for c in candidates(lm.num_layers, ExitSettings(mode="approximate", threshold=0.7, min_layer=2))]
    assert set(done.exact_speeds) == set(names)
    assert all(set(v) == {"grounded", "open"} for v in done.exact_speeds.values())
    stored = StoredCalibration.from_extra(type(art).load(path).extra)
    exact = resolve(stored, Overrides(mode="exact"), lm.num_layers)
    assert exact.source == "calibration"
    assert exact.settings.draft == done.exact.setting.draft
    assert exact.settings.max_draft == done.exact.setting.max_draft
    assert resolve(stored, Overrides(), lm.num_layers).settings.threshold == 0.7  # approximate's setting kept
    with pytest.raises(ValueError, match="exact_prompts"):
        run_calibrate(CalibrateConfig(jump=str(path), model=str(folder), corpus="-", exact_only=True))
