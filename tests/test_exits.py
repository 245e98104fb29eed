"""Exits that pay (issue 9): per-level normalisation of the shared jump, the centred selection
score, the learned gate, the calibration search and ``onejump agreement`` on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny
from test_math import randomized

from shortcuts.artifact import JumpArtifact
from shortcuts.engine.exit_head import ExitHead
from shortcuts.heads import HeadContext, jump_logits
from shortcuts.jump import JumpConfig, LowRankJumps, cosine_score

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def level_normed(d: int, rank: int, levels: int, seed: int = 0) -> LowRankJumps:
    g = torch.Generator().manual_seed(seed)
    jump = randomized(LowRankJumps(JumpConfig(d, rank), n=1), seed)
    mean, var = torch.randn(levels, d, generator=g), torch.rand(levels, d, generator=g) + 0.2
    return jump.with_level_norm(mean, var)


# --- per-level normalisation ------------------------------------------------------------------------
def test_level_norm_is_each_levels_own_batchnorm() -> None:
    """Level i of an (m, B, d) input is standardised with level i's statistics, then the shared
    BN affine, A and B; ``at_level(i)`` is the same jump as a plain bank of one."""
    jump = level_normed(16, 4, levels=3)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    mean, var = jump.level_norm  # type: ignore[misc]
    for i in range(3):
        z = (x[i] - mean[i]) / torch.sqrt(var[i] + jump.config.bn_eps) * jump.bn_weight[0] + jump.bn_bias[0]
        want = z @ jump.lora_A[0].T @ jump.lora_B[0].T + jump.bias[0]
        torch.testing.assert_close(jump(x)[i], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(jump.at_level(i)(x[i : i + 1])[0], want, rtol=1e-5, atol=1e-5)
        assert jump.at_level(i).level_norm is None
    assert jump.num_parameters() == 2 * 16 * 4 + 4 + 16 + 2 * 16 * 3  # 2·d per level, counted


def test_level_norm_fold_equals_unfolded() -> None:
    """z = A·(h ⊙ scale_l) + c_l (one d-sized scale per level, A shared) equals A·BN_l(h)."""
    jump = level_normed(16, 4, levels=3, seed=2)
    x = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(3))
    scale, c = jump.level_folded()
    assert scale.shape == (3, 16)
    assert c.shape == (3, 4)
    folded = x * scale[:, None] @ jump.lora_A[0].T + c[:, None]
    torch.testing.assert_close(folded, jump.project(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_exit_head_folds_level_norm(arch: str, tmp_path) -> None:
    """The engine's fused check on a level-normalised jump equals lm_head(norm(jump_l(h))) at every
    level, also after an artifact round trip (format /2)."""
    lm = build_tiny(arch)
    jump = level_normed(lm.hidden_size, 4, levels=lm.num_layers - 1, seed=4)
    art = JumpArtifact(jump, "tiny", lm.fingerprint(), lm.num_layers, 1, [0.0], "words")
    loaded = JumpArtifact.load(art.save(tmp_path / "j.safetensors"))
    assert loaded.metadata()["format"] == "onejump.jump/2"
    head, ctx = ExitHead(lm, loaded.jump), HeadContext.from_model(lm)
    h = torch.randn(lm.num_layers - 1, 3, lm.hidden_size, generator=torch.Generator().manual_seed(5))
    together = jump_logits(jump, h, ctx)  # all levels at once, each with its own statistics
    for level in range(1, lm.num_layers):
        want = ctx.full(jump.at_level(level - 1)(h[level - 1 : level])[0])
        torch.testing.assert_close(head(h[level - 1], level), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together[level - 1], want, rtol=1e-4, atol=1e-4)


def test_plain_artifact_keeps_format_1(tmp_path) -> None:
    lm = build_tiny("llama")
    jump = randomized(LowRankJumps(JumpConfig(lm.hidden_size, 4), n=1))
    art = JumpArtifact(jump, "tiny", lm.fingerprint(), lm.num_layers, 1, [0.0], "words")
    loaded = JumpArtifact.load(art.save(tmp_path / "j.safetensors"))
    assert loaded.metadata()["format"] == "onejump.jump/1"
    assert loaded.jump.level_norm is None


# --- the centred score ---------------------------------------------------------------------------------
def test_centred_score_ignores_the_common_direction() -> None:
    """Final states sharing a large common direction: the paper's score gives a constant predictor
    (the mean) nearly full marks; centred on the mean it scores 0, and a predictor of the
    sample-specific part scores full marks."""
    g = torch.Generator().manual_seed(0)
    common = 10 * torch.randn(32, generator=g)
    final = common + torch.randn(200, 32, generator=g)
    mean = final.mean(0)
    constant = mean.expand(1, 200, 32)
    assert float(cosine_score(constant, final)) / 200 > 0.9
    assert float(cosine_score(constant, final, center=mean)) == 0.0
    assert float(cosine_score(final[None], final, center=mean)) == pytest.approx(200, rel=1e-5)
    noisy = final + 3 * torch.randn(200, 32, generator=g)
    assert float(cosine_score(noisy[None], final, center=mean)) < float(cosine_score(noisy[None], final)) - 50
