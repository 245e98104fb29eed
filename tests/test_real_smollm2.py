"""Tier 3: the real SmolLM2-135M-Instruct (from `onejump assets`), end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.assets import default_model_dir, wiki_split
from shortcuts.cli import main
from shortcuts.collect import collect_states
from shortcuts.errors import ArtifactError
from shortcuts.heads import HeadContext

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]


def test_real_model_parts(smollm2: CausalLM) -> None:
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.vocab_size) == (30, 576, 49152)
    text = "The capital of France is"
    ids = smollm2.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = smollm2.model(**ids).logits[0, -1]
    states = collect_states(smollm2, [text], skip_first=10**6)
    assert torch.allclose(HeadContext.from_model(smollm2).full(states.final[0]), logits, atol=1e-3)
    assert smollm2.tokenizer.decode(int(logits.argmax())).strip() == "Paris"


@pytest.mark.slow
def test_fit_on_real_smollm2(tmp_path: Path, smollm2: CausalLM) -> None:
    out = tmp_path / "fit"
    code = main(["fit", "--model", str(default_model_dir()), "--corpus", str(wiki_split("train")),
                 "--eval-corpus", str(wiki_split("test")), "--out-dir", str(out), "--cache", str(tmp_path),
                 "--n-train", "160", "--n-test", "60", "--rank", "16", "--epochs", "8", "--kl-epochs", "1",
                 "--batch-size", "64", "--study"])
    assert code == 0
    r = json.loads((out / "results.json").read_text())
    ident = r["methods"]["identity"]["precision"]
    assert len(ident) == 29
    assert ident[-1] > ident[0] + 0.2  # the logit lens sharpens towards the top, as the papers report
    assert sum(r["methods"]["all-level:pure-mse"]["precision"]) / 29 > 0.05
    assert r["parameters"] == {"all-level": 29 * (2 * 576 * 16 + 16 + 576), "ojfa": 2 * 576 * 16 + 16 + 576,
                               "reduction": 29}
    for png in ("ojfa_vs_arbitrary.png", "ojfa_vs_identity_all_level.png", "variants.png", "ojfa_scores.png"):
        assert (out / png).stat().st_size > 10_000
    art = JumpArtifact.load(out / "jump.safetensors")
    art.check_model(smollm2)
    assert art.metadata()["base_model"] == str(default_model_dir())


def test_real_artifact_refuses_a_tiny_model(tmp_path: Path, smollm2: CausalLM, make_tiny) -> None:
    from support.models import tiny_artifact

    path = tiny_artifact(smollm2).save(tmp_path / "j.safetensors")
    with pytest.raises(ArtifactError, match="d=576, L=30"):
        JumpArtifact.load(path).check_model(make_tiny("llama"))
