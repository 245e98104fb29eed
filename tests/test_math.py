"""Tier 1: the math on tiny modules with fixed seeds."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import randomized

from shortcuts.adapter import NormSpec
from shortcuts.evaluate import choose, ojfa_scores, precision_at_1, surprisal
from shortcuts.heads import HeadContext, jump_logits
from shortcuts.jump import JumpConfig, LowRankJumps, cosine_score
from shortcuts.train import KLToModel, MSEToFinal, TrainConfig, train_bank

D, R = 16, 4


@pytest.mark.parametrize(("rank", "form"), [(0, "pure"), (D, "pure"), (D + 3, "pure"), (-1, "residual")])
def test_config_rejects_bad_rank(rank: int, form: str) -> None:
    with pytest.raises(ValueError, match="rank"):
        JumpConfig(D, rank, form=form)  # type: ignore[arg-type]


def test_config_rejects_unknown_variant() -> None:
    with pytest.raises(ValueError, match="unknown jump variant"):
        JumpConfig.from_variant("sideways-mse", D, R)
    with pytest.raises(ValueError, match="form"):
        JumpConfig(D, R, form="diagonal")  # type: ignore[arg-type]


def test_shapes_and_init() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 10, D)
    pure = LowRankJumps(JumpConfig(D, R), n=3).eval()
    residual = LowRankJumps(JumpConfig(D, R, form="residual"), n=3).eval()
    assert pure.project(x).shape == (3, 10, R)
    assert pure(x).shape == (3, 10, D)
    assert torch.equal(pure(x), torch.zeros_like(x))  # B = 0, b = 0: a pure jump starts at zero
    assert torch.equal(residual(x), x)  # ...and a residual jump starts as the identity
    assert pure.lora_A.abs().max() <= 1 / math.sqrt(D) + 1e-6  # Kaiming-uniform bound of nn.Linear


def test_batchnorm_train_and_eval() -> None:
    torch.manual_seed(0)
    bank = LowRankJumps(JumpConfig(D, R), n=2)
    x = 5 + 3 * torch.randn(2, 256, D)
    normed = bank.normalize(x)
    assert torch.allclose(normed.mean(1), torch.zeros(2, D), atol=1e-5)
    assert torch.allclose(normed.var(1, unbiased=False), torch.ones(2, D), atol=1e-3)
    assert torch.allclose(bank.running_mean, 0.1 * x.mean(1), atol=1e-5)  # one step of momentum 0.1
    bank.eval()
    expected = (x - bank.running_mean[:, None]) / torch.sqrt(bank.running_var[:, None] + 1e-5)
    assert torch.allclose(bank.normalize(x), expected, atol=1e-5)


def test_select_fold_and_broadcast() -> None:
    torch.manual_seed(0)
    bank = randomized(LowRankJumps(JumpConfig(D, R), n=3))
    x = torch.randn(3, 7, D)
    for j in range(3):
        assert torch.allclose(bank.select(j)(x[j : j + 1])[0], bank(x)[j], atol=1e-5)
    a_eff, c = bank.folded()
    assert torch.allclose(x @ a_eff.transpose(1, 2) + c[:, None], bank.project(x), atol=1e-4)
    one = bank.select(1)
    per_level = torch.stack([one(x[i : i + 1])[0] for i in range(3)])
    assert torch.allclose(one(x), per_level, atol=1e-5)  # one jump at every level = broadcast
    assert bank.num_parameters() == 3 * (2 * D * R + R + D)
    with pytest.raises(IndexError):
        bank.select(3)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_head_equals_full_head(kind: str, softcap: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    norm = NormSpec(kind, 1 + torch.rand(D, generator=g), torch.randn(D, generator=g) if kind == "layer" else None,
                    1e-5)
    ctx = HeadContext(norm, torch.randn(50, D, generator=g), softcap)
    bank = randomized(LowRankJumps(JumpConfig(D, R), n=2), seed=2)
    x = 3 * torch.randn(2, 9, D, generator=g)
    fused = jump_logits(bank, x, ctx)
    full = ctx.full(bank(x))
    assert fused.shape == (2, 9, 50)
    assert torch.allclose(fused, full, rtol=1e-4, atol=1e-4)


def test_head_normalize_matches_torch_layers() -> None:
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    ctx = HeadContext(NormSpec("layer", ln.weight.detach(), ln.bias.detach(), ln.eps), torch.eye(D))
    x = torch.randn(5, D)
    assert torch.allclose(ctx.normalize(x), ln(x), atol=1e-5)
    rms = torch.nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        rms.weight.normal_()
    ctx = HeadContext(NormSpec("rms", rms.weight.detach(), None, 1e-6), torch.eye(D))
    assert torch.allclose(ctx.normalize(x), rms(x), atol=1e-5)


def test_precision_and_surprisal_on_hand_made_logits() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    target = torch.tensor([1, 0, 0, 0])
    assert precision_at_1(logits, target).item() == pytest.approx(3 / 4)  # ties go to the first index
    expected = (-math.log(3 / 4) - math.log(math.e**2 / (math.e**2 + 1)) - math.log(1 / (1 + math.e))
                - math.log(1 / 2)) / 4
    assert surprisal(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_score_on_hand_made_vectors() -> None:
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    pred = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [1.0, math.sqrt(3.0)]])  # cos 1, -1, 0, 0.5
    assert cosine_score(pred, target).item() == pytest.approx(1 - 1 + 0 + 0.25)


def test_ojfa_scores_and_choice() -> None:
    bank = LowRankJumps(JumpConfig(2, 1), n=3).eval()  # B = 0, so jump j outputs its bias
    with torch.no_grad():
        bank.bias.copy_(torch.tensor([[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0]]))
    levels, n = 3, 5
    final = torch.tensor([[1.0, 0.0]]).repeat(n, 1)
    scores = ojfa_scores(bank, torch.randn(levels, n, 2), final)
    assert scores == pytest.approx([0.0, levels * n, -levels * n])
    assert choose(scores) == 1
    assert choose([1.0, 3.0, 3.0]) == 1  # first on ties
    with pytest.raises(ValueError, match="no scores"):
        choose([])


@pytest.mark.slow
def test_training_recovers_a_low_rank_map() -> None:
    """Final = W·h + c with W of rank R: MSE training should fit it far better than the mean."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, R, generator=g) @ torch.randn(R, D, generator=g) / 4
    h = torch.randn(2, 1024, D, generator=g)
    final = h[0] @ W.T + 10.0
    torch.manual_seed(0)
    bank = LowRankJumps(JumpConfig(D, R), n=2)
    history = train_bank(bank, h, final, MSEToFinal(), TrainConfig(epochs=60, batch_size=128, lr=1e-2))
    baseline = (final - final.mean(0)).square().mean().item()
    fitted = (bank.select(0)(h[:1])[0] - final).square().mean().item()
    assert history[-1] < history[0]
    assert fitted < 0.05 * baseline  # level 0's inputs determine the target...
    unfit = (bank.select(1)(h[1:])[0] - final).square().mean().item()
    assert unfit > 0.5 * baseline  # ...level 1's are noise, so its jump cannot beat the mean


def test_kl_training_lowers_kl() -> None:
    g = torch.Generator().manual_seed(0)
    ctx = HeadContext(NormSpec("rms", torch.ones(D), None, 1e-6), torch.randn(30, D, generator=g))
    h = torch.randn(1, 512, D, generator=g)
    final = h[0] @ (torch.randn(D, R, generator=g) @ torch.randn(R, D, generator=g)).T
    torch.manual_seed(0)
    bank = LowRankJumps(JumpConfig(D, R, objective="kl"), n=1)
    objective = KLToModel(ctx)
    before = objective.loss(bank.eval(), h, objective.target(final)).item()
    train_bank(bank, h, final, objective, TrainConfig(epochs=30, batch_size=128, lr=1e-2))
    after = objective.loss(bank, h, objective.target(final)).item()
    assert after < 0.3 * before


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_fast_kl_equals_plain_kl(kind: str) -> None:
    """The one-pass KL of a pure jump equals log-softmax + kl_div on the full logits."""
    g = torch.Generator().manual_seed(3)
    norm = NormSpec(kind, 1 + torch.rand(D, generator=g), torch.randn(D, generator=g) if kind == "layer" else None,
                    1e-5)
    ctx = HeadContext(norm, torch.randn(40, D, generator=g))
    bank = randomized(LowRankJumps(JumpConfig(D, R, objective="kl"), n=3), seed=4)
    x, final = torch.randn(3, 8, D, generator=g), torch.randn(8, D, generator=g)
    objective = KLToModel(ctx)
    target = objective.target(final)
    fast = objective.loss(bank, x, target)
    logp = torch.log_softmax(ctx.full(bank(x)), -1)
    plain = torch.nn.functional.kl_div(logp, target.expand_as(logp), log_target=True, reduction="none")
    assert fast.item() == pytest.approx(plain.sum(-1).mean(-1).sum().item(), rel=1e-4)


@pytest.mark.parametrize("objective", ["mse", "kl"])
def test_joint_step_computes_the_target_once(objective: str) -> None:
    """A joint batch (every level of the same samples, level-major) gets the same loss and gradient
    from one target repeated per level as from the target of the repeated final states."""
    from shortcuts.train import _step

    g = torch.Generator().manual_seed(5)
    ctx = HeadContext(NormSpec("rms", 1 + torch.rand(D, generator=g), None, 1e-6), torch.randn(40, D, generator=g))
    obj = MSEToFinal() if objective == "mse" else KLToModel(ctx)
    levels, batch = 3, 6
    x, final = torch.randn(levels, batch, D, generator=g), torch.randn(batch, D, generator=g)
    grads, losses = [], []
    for y, repeat in ((final.repeat(levels, 1), 1), (final, levels)):
        torch.manual_seed(6)
        bank = randomized(LowRankJumps(JumpConfig(D, R, objective="kl"), n=1), seed=6).train()
        losses.append(_step(bank, obj, x.reshape(1, -1, D), y, None, repeat))
        grads.append(torch.cat([p.grad.flatten() for p in bank.parameters() if p.grad is not None]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
