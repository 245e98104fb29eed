"""The ``onejump`` command on a tiny saved model: a whole fit, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shortcuts.artifact import JumpArtifact
from shortcuts.calibration import StoredCalibration
from shortcuts.cli import main

TINY_FIT = ["--n-train", "120", "--n-test", "30", "--rank", "4", "--epochs", "3", "--kl-epochs", "1",
            "--batch-size", "32", "--no-plots", "--study"]


@pytest.mark.subprocess
def test_help_is_fast_and_light() -> None:
    code = "import sys, shortcuts.cli; shortcuts.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # no torch at import or for --help


@pytest.mark.slow
def test_fit_end_to_end_on_a_tiny_model(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fit"
    code = main(["fit", "--model", str(tiny_folder), "--corpus", str(word_corpus), "--eval-corpus",
                 str(word_corpus), "--out-dir", str(out), "--cache", str(tmp_path / "cache"), *TINY_FIT])
    assert code == 0
    assert "OJFA" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["levels"] == [1, 2, 3]
    assert set(results["ojfa"]) == {"pure-mse", "residual-mse", "pure-kl"}
    assert {"identity", "ojfa:pure-mse", "all-level:pure-mse", "first:pure-mse", "middle:pure-mse",
            "last:pure-mse", "joint:pure-mse"} <= set(results["methods"])
    assert results["parameters"]["reduction"] == 3
    for v in results["ojfa"]:
        art = JumpArtifact.load(out / f"jump-{v}.safetensors")
        assert art.config.variant == v
        assert art.trained_level == results["ojfa"][v]["chosen_level"]
    default = JumpArtifact.load(out / "jump.safetensors")
    assert default.config.variant == results["default_variant"]
    assert "| level |" in (out / "summary.md").read_text()

    code = main(["evaluate", "--model", str(tiny_folder), "--jump", str(out / "jump-pure-mse.safetensors"),
                 "--corpus", str(word_corpus), "--n", "20", "--out-dir", str(tmp_path / "ev"), "--cache", ""])
    assert code == 0
    assert (tmp_path / "ev" / "evaluation.png").stat().st_size > 1000
    assert main(["inspect", str(out / "jump.safetensors")]) == 0
    assert '"trained_level"' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--corpus", "MISSING.jsonl"], "corpus not found"),
        (["--corpus", "EMPTY"], "corpus is empty"),
        (["--rank", "32"], "rank must satisfy"),
        (["--variants", "pure-mse", "wobbly-mse"], "unknown variant"),
        (["--n-train", "5000"], "only 200"),
    ],
)
def test_fit_refuses_bad_input(args: list[str], message: str, tiny_folder: Path, word_corpus: Path,
                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / a) if a.endswith(".jsonl") else a
            for a in args]
    base = ["fit", "--model", str(tiny_folder), "--corpus", str(word_corpus), "--eval-corpus", str(word_corpus),
            "--out-dir", str(tmp_path / "o"), *TINY_FIT]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_evaluate_refuses_a_mismatched_or_corrupt_artifact(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                                           make_tiny, capsys: pytest.CaptureFixture[str]) -> None:
    from support.models import tiny_artifact

    wrong = tiny_artifact(make_tiny("llama", seed=7)).save(tmp_path / "wrong.safetensors")
    assert main(["evaluate", "--model", str(tiny_folder), "--jump", str(wrong), "--corpus", str(word_corpus)]) == 2
    assert "weights differ" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_fit_refuses_unknown_architecture_and_missing_model(tmp_path: Path, word_corpus: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("opt", hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                         word_embed_proj_dim=16, vocab_size=50).save_pretrained(tmp_path / "opt")
    base = ["fit", "--corpus", str(word_corpus), "--eval-corpus", str(word_corpus), *TINY_FIT]
    assert main([*base, "--model", str(tmp_path / "opt")]) == 2
    assert "'opt' is not supported" in capsys.readouterr().err
    assert main([*base, "--model", str(tmp_path / "no-such-model")]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_calibrate_stores_the_threshold_the_server_then_uses(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                                              make_tiny, capsys: pytest.CaptureFixture[str]) -> None:
    from support.models import tiny_artifact

    from service.config import Settings
    from service.loading import load_decoder

    jump = tiny_artifact(make_tiny("llama")).save(tmp_path / "jump.safetensors")
    out = tmp_path / "calibrated.safetensors"
    args = ["calibrate", "--model", str(tiny_folder), "--jump", str(jump), "--corpus", str(word_corpus),
            "--prompts", "12", "--new-tokens", "8", "--offset", "0", "--out", str(out)]
    assert main([*args, "--target", "0.5"]) == 0
    assert "saved in" in capsys.readouterr().out
    stored = StoredCalibration.from_extra(JumpArtifact.load(out).extra).lookup("none")[0]
    assert stored is not None
    assert stored.approximate is not None
    cal = {**stored.approximate.to_dict(), **stored.approximate.measured}
    assert cal["tokens"] == 12 * 7
    assert cal["prompts"] == 12
    assert cal["gate"] == "confidence"
    assert 0.0 <= cal["threshold"] <= 1.0
    assert cal["lower_bound"] >= 0.5
    assert cal["agreement"] >= cal["lower_bound"]
    assert not StoredCalibration.from_extra(JumpArtifact.load(jump).extra).by_precision  # --out leaves it alone
    _, policy = load_decoder(Settings(model=str(tiny_folder), jump=str(out)))
    defaults = policy.resolve()
    assert (defaults.settings.threshold, defaults.settings.min_layer, defaults.source) == (
        cal["threshold"], cal["min_layer"], "calibration")
    _, mine = load_decoder(Settings(model=str(tiny_folder), jump=str(out), exit_threshold=0.7, exit_min_layer=2))
    assert (mine.resolve().settings.threshold, mine.resolve().settings.min_layer) == (0.7, 2)  # flags win
    _, other = load_decoder(Settings(model=str(tiny_folder), jump=str(out), exit_gate="entropy"))
    assert other.resolve().source == "built-in"  # calibrated for another gate: not used
    assert main([*args, "--new-tokens", "1"]) == 2
    assert "new_tokens=1 >= 2" in capsys.readouterr().err
    assert main([*args, "--target", "1.5"]) == 2
    assert "target=1.5" in capsys.readouterr().err
    assert main([*args, "--gates", "entropy", "--min-layers", "9"]) == 2
    assert "min_layer [9]" in capsys.readouterr().err


def test_a_learned_gate_in_the_artifact_is_the_servers_default(tiny_folder: Path, make_tiny, tmp_path: Path) -> None:
    """An artifact calibrated for its learned gate: the server loads the gate, defaults to it with
    the calibrated threshold, first level and stride, and decodes with it; without one it refuses."""
    import torch
    from support.models import tiny_artifact

    from service.config import Settings
    from service.loading import load_decoder
    from shortcuts.engine import ExitSettings, GenerationSettings
    from shortcuts.engine.learned_gate import LearnedGate, feature_names

    lm = make_tiny("llama")
    artifact = tiny_artifact(lm)
    L = lm.num_layers
    gate = LearnedGate(torch.linspace(-1, 1, len(feature_names(L))), 0.5, L)
    artifact.extra["gate"] = gate.to_dict()
    artifact.extra["calibration"] = {"gate": "learned", "threshold": 0.3, "min_layer": 2, "stride": 1}
    path = artifact.save(tmp_path / "learned.safetensors")
    decoder, policy = load_decoder(Settings(model=str(tiny_folder), jump=str(path)))
    defaults = policy.resolve().settings
    assert (defaults.gate, defaults.threshold, defaults.min_layer, defaults.stride) == ("learned", 0.3, 2, 1)
    assert decoder.learned_gate is not None
    s = GenerationSettings(max_new_tokens=6, stop_token_ids=(),
                           exit=ExitSettings(mode="approximate", gate="learned", threshold=0.3, min_layer=2))
    assert len(decoder.generate([5, 6, 7], s).tokens) == 6
    plain = tiny_artifact(lm).save(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="holds no learned gate"):
        load_decoder(Settings(model=str(tiny_folder), jump=str(plain), exit_gate="learned"))
