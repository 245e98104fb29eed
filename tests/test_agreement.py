"""Teacher-forced exit statistics: the replayed gates against real decoding, the oracle ceiling and
the calibration, on tiny random models (see test_engine for ``sharpen`` and ``fitted_jump``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.models import arch_params, build_tiny, fitted_jump, prompt_ids, settings, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.calibration.costs import CostModel
from shortcuts.calibration.replay import bootstrap_lower_bound, checks, oracle_levels, replay
from shortcuts.calibration.search import Calibration, fastest, search
from shortcuts.calibration.table import LevelTable, continuations, level_table
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.settings import ExitSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prompts(lm) -> list[list[int]]:
    base = prompt_ids(lm)
    return [base, base[3:], base[:7]]


@pytest.mark.parametrize("arch", arch_params())
def test_replayed_gate_equals_teacher_forced_decoding(arch: str) -> None:
    """With catch-up the decoder sees the full model's states, so the table's replay of a gate
    gives exactly the decoder's exit levels and picks, step by step."""
    lm = sharpen(build_tiny(arch))
    dec = EarlyExitDecoder(lm, fitted_jump(lm))
    prompts = _prompts(lm)
    conts = continuations(lm, prompts, new_tokens=20)
    assert all(len(c) == 20 for c in conts)
    table = level_table(lm, dec.exit_head, prompts, conts, batch_size=2)
    assert len(table) == 3 * 19
    assert table.num_prompts == 3
    exits = 0
    for gate, threshold in (("confidence", 0.4), ("entropy", 1.5), ("patience", 0.0)):
        s = settings(mode="approximate", gate=gate, threshold=threshold, patience=2)
        level, picked = replay(table, s.exit)
        followed = [t for p, c in zip(prompts, conts, strict=True) for t in dec.follow(p, c, s)]
        assert level.tolist() == [t.exit_layer for t in followed]
        assert picked.tolist() == [t.token for t in followed]
        exits += int((level < lm.num_layers).sum())
    assert exits > 0
    full = [t.token for p, c in zip(prompts, conts, strict=True) for t in dec.follow(p, c, settings(mode="off"))]
    assert table.final_top.tolist() == full


def _table(top: list[list[int]], final: list[int], conf: list[list[float]], prompt: list[int]) -> LevelTable:
    t = torch.tensor(top)
    return LevelTable(torch.tensor(conf), torch.zeros(t.shape), t, torch.tensor(final), torch.tensor(prompt),
                      t.shape[1] + 1)


def test_oracle_levels_first_hit_and_stable() -> None:
    # L = 5, levels 1..4; final tokens 7, 7, 7
    table = _table([[7, 1, 7, 7], [1, 2, 3, 4], [1, 7, 2, 7]], [7, 7, 7], [[0.5] * 4] * 3, [0, 1, 2])
    oracle = oracle_levels(table)
    assert oracle["first_hit"].tolist() == [1, 5, 2]
    assert oracle["stable"].tolist() == [3, 5, 4]


def test_replay_respects_threshold_min_layer_and_stride() -> None:
    table = _table([[1, 2, 7, 7]], [7], [[0.9, 0.2, 0.95, 0.99]], [0])
    cases = {(0.8, 1, 1): (1, 1), (0.8, 2, 1): (3, 7), (0.97, 1, 1): (4, 7), (0.8, 2, 2): (4, 7), (1.0, 1, 1): (5, 7)}
    for (threshold, min_layer, stride), want in cases.items():
        s = ExitSettings(mode="approximate", threshold=threshold, min_layer=min_layer, stride=stride)
        level, picked = replay(table, s)
        assert (int(level[0]), int(picked[0])) == want, (threshold, min_layer, stride)


def test_bootstrap_lower_bound() -> None:
    prompt = torch.arange(20).repeat_interleave(10)
    assert bootstrap_lower_bound(torch.ones(200, dtype=torch.bool), prompt) == 1.0
    agree = torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.8
    bound = bootstrap_lower_bound(agree, prompt, confidence=0.95)
    assert bound < float(agree.float().mean()) < 1.0
    assert bound > bootstrap_lower_bound(agree, prompt, confidence=0.99)


def calibrate(table: LevelTable, target: float, gates: tuple[str, ...] = ("confidence",),
              min_layers: tuple[int, ...] = (1,), cost: CostModel | None = None) -> Calibration:
    """The fastest setting of ``gates`` (one cost model for all) that reaches ``target``."""
    return fastest(search(table, target, {g: cost or CostModel() for g in gates}, None, min_layers))


def test_calibrate_picks_the_shallowest_gate_that_reaches_the_target() -> None:
    """Level 1 is right when its confidence is >= 0.6 and wrong below; the calibration must exit
    there exactly for the confident, right ones."""
    g = torch.Generator().manual_seed(0)
    n = 400
    conf1 = torch.rand(n, generator=g)
    right = conf1 >= 0.6
    final = torch.full((n,), 7)
    top1 = torch.where(right, final, torch.full((n,), 3))
    top = torch.stack([top1, final, final], 1)
    conf = torch.stack([conf1, torch.full((n,), 0.3), torch.full((n,), 0.3)], 1)
    table = LevelTable(conf, torch.zeros(n, 3), top, final, torch.arange(n) // 4, 4)
    cal = calibrate(table, target=0.99, gates=("confidence",))
    assert 0.59 <= cal.threshold <= 0.62
    assert cal.agreement == 1.0
    assert cal.lower_bound >= 0.99
    assert cal.mean_exit_layer == pytest.approx(1 + 3 * float((~(conf1 >= cal.threshold)).float().mean()))
    never = calibrate(table, target=1.0, gates=("entropy",))  # entropy 0 everywhere: every exit is taken
    assert (never.gate, never.threshold, never.mean_exit_layer) == ("confidence", 1.0, 4.0)
    with pytest.raises(ValueError, match="target"):
        calibrate(table, target=1.5)


def test_calibrate_weighs_check_cost_against_depth() -> None:
    """Only level 3 (of L = 4) is right and confident: with free checks any first level will do,
    with costly checks the calibration starts checking at level 3 and says what that buys."""
    n = 80
    final = torch.full((n,), 7)
    top = torch.tensor([3, 3, 7]).repeat(n, 1)
    conf = torch.tensor([0.1, 0.2, 0.9]).repeat(n, 1)
    table = LevelTable(conf, torch.zeros(n, 3), top, final, torch.arange(n) // 4, 4)
    free = calibrate(table, 0.95, ("confidence",), min_layers=(1, 3))
    costly = calibrate(table, 0.95, ("confidence",), min_layers=(1, 3), cost=CostModel(check=0.5, head=2.0))
    assert free.mean_exit_layer == costly.mean_exit_layer == 3.0
    assert free.predicted_speedup == pytest.approx(4 / 3)
    assert costly.min_layer == 3
    assert costly.predicted_speedup == pytest.approx((4 + 2.0) / (3 + 0.5))
    level = torch.tensor([3, 4])
    s = ExitSettings(mode="approximate", min_layer=2)
    assert checks(level, s, 4).tolist() == [2, 2]


@pytest.mark.slow
def test_sweep_runs_every_section_on_a_tiny_model(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                                  make_tiny: Callable[..., CausalLM]) -> None:
    import json

    from support.models import tiny_artifact

    from shortcuts.lab import sweep

    jump = tiny_artifact(make_tiny("llama")).save(tmp_path / "jump.safetensors")
    out = tmp_path / "sweep"
    args = ["--model", str(tiny_folder), "--jumps", f"tiny={jump}", "--corpus", str(word_corpus), "--prompts", "4",
            "--new-tokens", "6", "--thresholds", "0.05,0.5", "--speed-prompts", "1", "--speed-thresholds", "0.05",
            "--exact-thresholds", "0.05", "--drift-prompts", "1", "--drift-tokens", "9", "--min-layer", "1",
            "--out", str(out)]
    assert sweep.main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert set(r["quality"]) == {"tiny", "identity"}
    rows = r["quality"]["tiny"]["rows"]
    assert [row["threshold"] for row in rows] == [0.05, 0.5]
    assert all(sum(row["histogram"]) == 4 * 5 for row in rows)
    assert rows[0]["mean_exit_layer"] <= rows[1]["mean_exit_layer"]
    assert set(r["speed"]) == {"off", "HF generate", "approximate t=0.05", "exact t=0.05"}
    assert r["speed"]["exact t=0.05"]["free_running_same"] == 1.0  # exact mode is the full model's output
    assert set(r["drift"]) == {"off", "catchup", "copy"}
    assert (out / "speedup_vs_agreement.png").stat().st_size > 1000
    assert "## Ceiling and calibration" in (out / "report.md").read_text()


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_learned_gate_in_the_decoder_equals_its_replay(arch: str) -> None:
    """The decoder's learned gate (features built at each check from the exit logits, the states
    before and after the block, the previous check's top-1) decides exactly as the table's replay,
    step by step. The previous token's confidence is weighted 0 here: the table stands in the first
    step's own confidence for the prefill's, which the decoder knows (tested apart below)."""
    from shortcuts.engine.learned_gate import FEATURES, LearnedGate, feature_names

    lm = sharpen(build_tiny(arch))
    L = lm.num_layers
    weights = torch.randn(len(feature_names(L)), generator=torch.Generator().manual_seed(3))
    weights[FEATURES.index("prev_confidence")] = 0.0
    weights[FEATURES.index("confidence")] = 6.0
    gate = LearnedGate(weights, -2.0, L)
    dec = EarlyExitDecoder(lm, fitted_jump(lm), learned_gate=gate)
    prompts = _prompts(lm)
    conts = continuations(lm, prompts, new_tokens=20)
    table = level_table(lm, dec.exit_head, prompts, conts, batch_size=2)
    exits = 0
    for threshold, min_layer, stride in ((0.5, 1, 1), (0.3, 2, 1), (0.6, 1, 2)):
        s = settings(mode="approximate", gate="learned", threshold=threshold, min_layer=min_layer, stride=stride)
        level, picked = replay(table, s.exit, gate)
        followed = [t for p, c in zip(prompts, conts, strict=True) for t in dec.follow(p, c, s)]
        assert level.tolist() == [t.exit_layer for t in followed]
        assert picked.tolist() == [t.token for t in followed]
        exits += int((level < L).sum())
    assert 0 < exits < len(table) * 3


def test_learned_gate_sees_the_confidence_that_decided_the_previous_token() -> None:
    """prev_confidence is the trace's last confidence (the head that decided the token now fed), and
    a gate that weighs it changes decisions; without a learned gate in the artifact the setting is refused."""
    from shortcuts.engine.learned_gate import FEATURES, LearnedGate, feature_names

    lm = sharpen(build_tiny("llama"))
    L, jump = lm.num_layers, fitted_jump(lm)
    names = feature_names(L)
    only_prev = torch.zeros(len(names))
    only_prev[FEATURES.index("prev_confidence")] = 40.0
    gate = LearnedGate(only_prev, -12.0, L)  # leaves iff the previous token was decided with confidence > 0.3
    dec = EarlyExitDecoder(lm, jump, learned_gate=gate)
    gen = dec.generate(prompt_ids(lm), settings(16, mode="approximate", gate="learned", threshold=0.5))
    outcomes = set()
    for prev, t in zip(gen.trace, gen.trace[1:], strict=False):
        assert (t.exit_layer == 1) == (prev.confidence > 0.3)
        outcomes.add(t.exit_layer == 1)
    assert outcomes == {True, False}
    with pytest.raises(ValueError, match="learned gate"):
        EarlyExitDecoder(lm, jump).generate(prompt_ids(lm), settings(mode="approximate", gate="learned"))
