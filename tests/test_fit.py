"""``onejump fit``'s recipe and the logit-lens switch: decode-matched traces, per-level exit heads in the
engine and the artifact, lens-aware costs and search, and the command end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.models import build_tiny, prompt_ids, settings, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.artifact import FORMAT, FORMAT_LENS, JumpArtifact
from shortcuts.calibration import StoredCalibration
from shortcuts.calibration.costs import CostModel, predicted_speedup
from shortcuts.calibration.lens import JUMP, LENS, better_levels, calibrate_heads, merge
from shortcuts.calibration.search import SearchSpace, search
from shortcuts.calibration.table import LevelTable
from shortcuts.calibration.traces import decode_traces, trace_states
from shortcuts.cli import main
from shortcuts.engine import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.settings import ExitSettings
from shortcuts.jump import JumpConfig, LowRankJumps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _jump(lm: CausalLM, seed: int = 0) -> LowRankJumps:
    torch.manual_seed(seed)
    jump = LowRankJumps(JumpConfig(lm.hidden_size, 4), n=1)
    with torch.no_grad():
        jump.lora_B.normal_()
        jump.bias.normal_()
    return jump.eval()


# --- the engine's exit head and the artifact ----------------------------------------------------------------
def test_lens_levels_use_the_models_own_head(tiny_lm: CausalLM) -> None:
    jump = _jump(tiny_lm).with_lens([2])
    head, plain = ExitHead(tiny_lm, jump), ExitHead(tiny_lm, jump, lens_levels=())
    h = 3 * torch.randn(4, tiny_lm.hidden_size)
    with torch.no_grad():
        lens, jumped = tiny_lm.head(h).float(), tiny_lm.head(jump(h[None])[0]).float()
    assert head.levels[2].kind == "identity"
    assert torch.allclose(head(h, 2), lens, atol=1e-4)
    for level in (1, 3):
        assert torch.allclose(head(h, level), jumped, atol=1e-4)
        assert torch.allclose(plain(h, level), jumped, atol=1e-4)
    assert torch.allclose(plain(h, 2), jumped, atol=1e-4)
    with pytest.raises(ValueError, match=r"lens levels \[4\]"):
        ExitHead(tiny_lm, jump, lens_levels=(4,))
    with pytest.raises(ValueError, match="integers >= 1"):
        jump.with_lens([0])


def test_lens_levels_round_trip_and_old_artifacts_load(tmp_path: Path, make_tiny) -> None:
    lm = make_tiny("llama")
    art = JumpArtifact(_jump(lm), lm.name, lm.fingerprint(), lm.num_layers, 0, [], "words.txt")
    old = art.save(tmp_path / "old.safetensors")
    assert JumpArtifact.load(old).metadata()["format"] == FORMAT
    assert JumpArtifact.load(old).jump.lens_levels == ()
    art.jump.with_lens([3, 2])
    loaded = JumpArtifact.load(art.save(tmp_path / "lens.safetensors"))
    assert loaded.metadata()["format"] == FORMAT_LENS
    assert loaded.jump.lens_levels == (2, 3)
    assert ExitHead(lm, loaded.jump).levels[3].kind == "identity"


def test_the_engine_exits_through_the_lens_as_the_identity_head_does() -> None:
    """A jump whose every level is the lens decodes exactly as the identity exit head (jump None); exact mode
    stays the full model's output."""
    lm = sharpen(build_tiny("llama"))
    ids = prompt_ids(lm)
    lensed = EarlyExitDecoder(lm, _jump(lm).with_lens([1, 2, 3]))
    identity = EarlyExitDecoder(lm, None)
    s = settings(24, mode="approximate", threshold=0.4)
    a, b = lensed.generate(ids, s), identity.generate(ids, s)
    assert sum(t.kind == "exited" for t in a.trace) > 0
    assert a.tokens == b.tokens
    assert [t.exit_layer for t in a.trace] == [t.exit_layer for t in b.trace]
    off = lensed.generate(ids, settings(24, mode="off")).tokens
    assert lensed.generate(ids, settings(24, mode="exact", threshold=0.3)).tokens == off


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_decode_traces_equal_a_second_pass(arch: str) -> None:
    lm = build_tiny(arch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, lm.vocab_size, (int(n),), generator=g).tolist() for n in (5, 9, 7)]
    traces, conts = decode_traces(lm, prompts, 6, batch_size=2)
    ref = trace_states(lm, prompts, conts, batch_size=2)
    assert traces.states.shape == ref.states.shape == (3 * 5, lm.num_layers + 1, lm.hidden_size)
    assert torch.equal(traces.prompt, ref.prompt)
    assert torch.equal(traces.step, ref.step)
    assert torch.allclose(traces.states.float(), ref.states.float(), atol=2e-2, rtol=1e-2)


# --- costs and the search ----------------------------------------------------------------------------------
def test_lens_checks_cost_a_full_head() -> None:
    cost = CostModel(check=0.1, head=2.0, lens=2.5).with_lens([3])
    s = ExitSettings(mode="approximate", threshold=0.5, min_layer=1)
    level = torch.tensor([1, 3, 4])
    assert cost.check_blocks(level, s, 4).tolist() == pytest.approx([0.1, 2.7, 2.7])
    # (4 + 2) / mean(1 + 0.1, 3 + 2.7, 4 + 2.7 + 2)
    assert predicted_speedup(cost, level, s, 4) == pytest.approx(6 / ((1.1 + 5.7 + 8.7) / 3))


def _table(conf: list[list[float]], top: list[list[int]], final: list[int], prompts: list[int]) -> LevelTable:
    c = torch.tensor(conf)
    return LevelTable(c, -torch.log(c.clamp_min(1e-6)), torch.tensor(top), torch.tensor(final), torch.tensor(prompts),
                      c.shape[1] + 1)


def _tables(n: int = 40) -> dict[str, LevelTable]:
    """Four layers; the jump is unsure everywhere, the lens sure and right at level 3."""
    final = [i % 5 for i in range(n)]
    prompts = [i // 4 for i in range(n)]
    jump = _table([[0.2, 0.3, 0.3]] * n, [[f + 1, f + 1, f + 1] for f in final], final, prompts)
    lens = _table([[0.0, 0.0, 0.95]] * n, [[-1, -1, f] for f in final], final, prompts)
    return {JUMP: jump, LENS: lens}


def test_the_lens_is_taken_where_it_predicts_better_and_only_when_it_pays() -> None:
    tables = _tables()
    assert better_levels(tables[JUMP], tables[LENS]) == (3,)
    merged = merge(tables[JUMP], tables[LENS], (3,))
    assert merged.confidence[:, 2].tolist() == pytest.approx([0.95] * 40)
    assert torch.equal(merged.top[:, :2], tables[JUMP].top[:, :2])
    space = SearchSpace(("confidence",), (1,), (1,), 0.95)
    cheap = {"block": 1.0, "block x4": 1.0, "full head": 4.0, "check confidence": 0.1, "check lens": 1.0}
    choice, options = calibrate_heads(tables, cheap, space)
    assert set(options) == {JUMP, LENS}
    assert choice.lens_levels == (3,)
    assert options[JUMP].speedup == 1.0  # the jump alone never reaches the target
    assert choice.speedup > 1.0
    dear = {**cheap, "check lens": 8.0}  # a lens check dearer than the head and the block it saves
    choice, _ = calibrate_heads(tables, dear, space)
    assert choice.lens_levels == ()
    choice, options = calibrate_heads(tables, cheap, space, lens=False)
    assert set(options) == {JUMP}


def test_patience_is_searched() -> None:
    n = 40
    final = [i % 5 for i in range(n)]
    t = _table([[0.1, 0.1, 0.1]] * n, [[f, f, f] for f in final], final, [i // 4 for i in range(n)])
    found = search(t, 0.95, {"patience": CostModel(check=0.05, head=2.0)}, None, (1,), (1,))
    assert found["patience"].gate == "patience"
    assert found["patience"].patience == 2
    assert found["patience"].mean_exit_layer == 2.0
    assert found["patience"].exit_settings().patience == 2
    assert found["patience"].mode_setting().patience == 2


# --- the command ----------------------------------------------------------------------------------------------
TINY = ["--fit-prompts", "24", "--val-prompts", "6", "--test-prompts", "8", "--gate-prompts", "8",
        "--new-tokens", "6", "--per-prompt", "3", "--rank", "4", "--threads", "1", "--no-plots"]


def test_fit_writes_a_ready_artifact(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fit"
    args = ["fit", "--model", str(tiny_folder), "--corpus", str(word_corpus), "--eval-corpus", str(word_corpus),
            "--out-dir", str(out), *TINY]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "estimated time:" in printed
    assert "stored setting on test" in printed
    r = json.loads((out / "results.json").read_text())
    assert r["split"] == "by sentence (no titles)"
    assert set(r["test"]) == {"identity", "jump", "exit_head", "stored_setting", "by_option_and_gate"}
    assert set(r["test"]["by_option_and_gate"]["jump"]) == {"confidence", "entropy", "learned", "patience"}
    assert len(r["test"]["jump"]["precision"]) == 3
    assert set(r["options"]) <= {"jump", "lens"}
    assert r["samples"]["fit_rows"] == 24 * 3
    art = JumpArtifact.load(out / "jump.safetensors")
    assert art.jump.level_norm is not None  # per-level normalisation
    assert list(art.jump.lens_levels) == r["lens_levels"]
    stored = StoredCalibration.from_extra(art.extra)
    approx = stored.by_precision["none"].approximate
    assert approx is not None
    assert approx.gate == r["calibration"]["gate"]
    assert "| exit head served |" in (out / "summary.md").read_text()
    for option in r["options"]:  # each option searched, with its own setting
        assert list(JumpArtifact.load(out / f"jump-{option}.safetensors").jump.lens_levels) == \
            r["options"][option]["lens_levels"]
    assert main(["agreement", "--jump", str(out / "jump.safetensors"), "--model", str(tiny_folder), "--prompts",
                 str(word_corpus), "--max-prompts", "4", "--new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lens_levels"] == r["lens_levels"]
    recal = tmp_path / "recalibrated.safetensors"
    assert main(["calibrate", "--jump", str(out / "jump.safetensors"), "--model", str(tiny_folder), "--corpus",
                 str(word_corpus), "--prompts", "6", "--new-tokens", "4", "--offset", "0", "--out", str(recal)]) == 0
    again = JumpArtifact.load(recal)
    assert set(again.extra["exit_heads"]) <= {"jump", "lens"}
    assert StoredCalibration.from_extra(again.extra).by_precision["none"].approximate is not None


def test_fit_refuses_bad_input_before_loading(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base = ["fit", "--model", str(tiny_folder), "--corpus", str(word_corpus), "--eval-corpus", str(word_corpus),
            "--out-dir", str(tmp_path / "o"), *TINY]
    assert main([*base, "--corpus", str(tmp_path / "missing.jsonl")]) == 2
    assert "corpus not found" in capsys.readouterr().err
    assert main([*base, "--fit-prompts", "5000"]) == 2
    assert "fit prompts" in capsys.readouterr().err
    assert main([*base, "--mse-epochs", "0", "--kl-epochs", "0"]) == 2
    assert "mse_epochs + kl_epochs" in capsys.readouterr().err


def test_convert_refuses_what_is_not_a_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.bin").write_bytes(b"nope")
    assert main(["convert", str(tmp_path / "x.bin"), str(tmp_path / "out")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
