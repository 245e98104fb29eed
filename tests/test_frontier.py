"""``shortcuts.lab.frontier``: ROUGE-L, the settings it adds, and a run on a tiny model whose arms are what they
say (full depth equals itself; an always-firing gate at level 1 exits every token and runs fewer blocks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.engine.settings import ExitSettings
from shortcuts.jump import JumpConfig, LowRankJumps
from shortcuts.lab import frontier

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rouge_l_is_the_lcs_f1() -> None:
    assert frontier.rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert frontier.rouge_l([1, 2, 3], [4, 5]) == 0.0
    # LCS of (1 2 3 4) and (1 3 4 9 9 9) is 3: P = 3/4, R = 3/6
    assert frontier.rouge_l([1, 2, 3, 4], [1, 3, 4, 9, 9, 9]) == pytest.approx(2 * 0.75 * 0.5 / 1.25)
    assert frontier.rouge_l([], []) == 1.0


def test_settings_are_parsed_and_scaled() -> None:
    s = frontier.parse_setting("confidence:0.3:10:4")
    assert (s.mode, s.gate, s.threshold, s.min_layer, s.stride) == ("approximate", "confidence", 0.3, 10, 4)
    assert frontier.parse_setting("patience:3:2:1").patience == 3
    with pytest.raises(argparse.ArgumentTypeError, match="gate:threshold"):
        frontier.parse_setting("confidence:0.3")
    stored = ExitSettings(mode="approximate", gate="entropy", threshold=1.0)
    scaled = frontier.settings_of(stored, [0.5])
    assert scaled["stored"] == stored
    assert [s.threshold for s in scaled.values()] == [1.0, 2.0]


def _artifact(lm: CausalLM, folder: Path, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    jump = LowRankJumps(JumpConfig(lm.hidden_size, 4), n=1)
    with torch.no_grad():
        jump.lora_B.normal_()
        jump.bias.normal_()
    return JumpArtifact(jump.eval(), str(folder), lm.fingerprint(), lm.num_layers, 0, [], "words.txt").save(path)


def test_a_run_reports_every_arm_against_full_depth(tiny_folder: Path, word_corpus: Path, tmp_path: Path) -> None:
    lm = CausalLM.load(str(tiny_folder))
    main_jump = _artifact(lm, tiny_folder, tmp_path / "a.safetensors", 0)
    other = _artifact(lm, tiny_folder, tmp_path / "b.safetensors", 1)
    out = tmp_path / "frontier"
    frontier.main(["--jump", str(main_jump), "--model", str(tiny_folder), "--prompts", str(word_corpus),
                   "--max-prompts", "3", "--new-tokens", "5", "--scales", "0.5", "--setting", "confidence:0:1:1",
                   "--also-jump", str(other), "--out", str(out)])
    r = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").is_file()
    s = r["settings"]
    assert set(s) == {"off", "stored", "confidence 0.45", "confidence 0 @1/1", "stored@b"}
    assert s["off"]["same_as_off"] == s["off"]["rouge_l"] == 1.0
    assert s["off"]["exit_rate"] == 0.0
    assert s["off"]["blocks_per_step"] == lm.num_layers
    # every decoded token leaves after block 1 (the first token of each answer comes from the prefill, at full
    # depth); nothing goes deeper later, so catch-up never runs the skipped blocks: one block per fed token
    always = s["confidence 0 @1/1"]
    assert always["exit_rate"] == pytest.approx(4 / 5)
    assert always["mean_exit"] == pytest.approx((4 + 4) / 5)
    assert always["blocks_per_step"] == 1.0
