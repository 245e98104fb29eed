"""Training jump banks: one jump per exit level (N-NJTC), or one jump on all levels (joint)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from shortcuts.heads import HeadContext, jump_logits
from shortcuts.jump import ALL, JumpConfig, LowRankJumps, mse


class Objective(Protocol):
    """What a jump is trained against: ``target`` runs once per batch, ``loss`` per level slice."""

    def target(self, final: Tensor) -> Tensor: ...

    def loss(self, jumps: LowRankJumps, x: Tensor, target: Tensor, sl: slice) -> Tensor: ...


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    level_chunk: int = 4  # KL: levels per backward pass, to bound the (levels, batch, V) logits

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError(f"epochs, batch_size and lr must be positive; got {self}")


class MSEToFinal:
    """N-NJTC's objective: mean squared error to the final state (mean over batch and d)."""

    def target(self, final: Tensor) -> Tensor:
        return final

    def loss(self, jumps: LowRankJumps, x: Tensor, target: Tensor, sl: slice = ALL) -> Tensor:
        return mse(jumps(x, sl), target)


@dataclass
class KLToModel:
    """KL(p_model || p_jump) of the next-token distributions, mean over the batch.

    For pure jumps without soft-capping the logits are linear in z_aug (see LowRankHead), so
    KL = sum p log p + logsumexp(l) - (p @ M_aug)·z_aug: one pass over the vocabulary instead of
    log-softmax, KL and their gradients, each a pass over (levels, batch, V)."""

    ctx: HeadContext

    def target(self, final: Tensor) -> Tensor:
        return F.log_softmax(self.ctx.full(final), dim=-1)  # (B, V)

    def loss(self, jumps: LowRankJumps, x: Tensor, target: Tensor, sl: slice = ALL) -> Tensor:
        if jumps.is_pure and not self.ctx.softcap:
            head = self.ctx.low_rank(jumps.lora_B[sl], jumps.bias[sl])
            z_aug, M_aug = head.augmented(jumps.project(x, sl)), head.M_aug
            p = target.exp()
            neg_entropy = (p * target).sum(-1)  # (B,)
            expected = ((p @ M_aug) * z_aug).sum(-1)  # (n, B): E_p[logit]
            lse = torch.logsumexp(z_aug @ M_aug.transpose(1, 2), dim=-1)  # (n, B)
            return (neg_entropy + lse - expected).mean(-1).sum()
        logp = F.log_softmax(jump_logits(jumps, x, self.ctx, sl=sl), dim=-1)  # (n, B, V)
        kl = F.kl_div(logp, target.expand_as(logp), log_target=True, reduction="none")
        return kl.sum(-1).mean(-1).sum()


def _step(jumps: LowRankJumps, objective: Objective, x: Tensor, final: Tensor, chunk: int | None,
          repeat: int = 1) -> float:
    """Forward and backward one batch; with ``chunk``, levels go through in slices (same gradient,
    less memory: KL's logits are (levels, batch, V)). ``repeat``: x holds that many copies (levels)
    of the batch, level-major, and ``final`` one: the target is computed once and repeated (KL's is a
    pass of the full head, the cost that dominates a joint step at a large vocabulary)."""
    with torch.no_grad():
        target = objective.target(final)
        if repeat > 1:
            target = target.repeat(repeat, *([1] * (target.dim() - 1)))
    chunk = chunk or x.shape[0]
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        sl = slice(start, min(start + chunk, x.shape[0])) if jumps.n > 1 else ALL
        loss = objective.loss(jumps, x[start : start + chunk], target, sl)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def init_from_data(jumps: LowRankJumps, inputs: Tensor, final: Tensor, sample: int = 2048,
                   set_bias: bool = True) -> float:
    """Data-dependent start: a pure jump's bias begins at the mean final state. Returns the scale
    of what B·z + b must still explain (RMS of final - mean, or of final - h for a residual jump),
    which sets the step size of B and b, so training does not depend on the model's units."""
    idx = torch.arange(min(sample, final.shape[0]))
    if jumps.is_pure:
        mean = final.mean(0)
        if set_bias:
            jumps.bias.copy_(mean.expand_as(jumps.bias))
        return float((final[idx] - mean).square().mean().sqrt())
    return float((final[idx] - inputs[:, idx]).square().mean().sqrt())


def train_bank(jumps: LowRankJumps, inputs: Tensor, final: Tensor, objective: Objective, cfg: TrainConfig,
               desc: str = "train", chunk: int | None = None, data_init: bool = True) -> list[float]:
    """Train ``jumps`` on inputs (n, N, d) -> final (N, d). Returns the mean loss per epoch.

    ``n`` equals the bank size (one jump per level) or the bank has one jump and the levels are
    pooled (the joint jump): then each batch is all levels of a slice of samples."""
    if jumps.n not in (1, inputs.shape[0]):
        raise ValueError(f"a bank of {jumps.n} jumps cannot train on {inputs.shape[0]} levels")
    gen = torch.Generator().manual_seed(cfg.seed)
    out_scale = init_from_data(jumps, inputs, final, set_bias=data_init)
    head = [jumps.lora_B, jumps.bias]
    rest = [p for p in jumps.parameters() if all(p is not q for q in head)]
    groups: list[dict[str, Any]] = [{"params": rest}, {"params": head, "lr": cfg.lr * max(out_scale, 1e-3)}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    joint = jumps.n == 1 and inputs.shape[0] > 1
    n_samples, history = inputs.shape[1], []
    starts = range(0, n_samples, cfg.batch_size)
    jumps.train()
    # one bar over every step of every epoch: a long KL epoch shows its progress (and its time left)
    with tqdm(total=cfg.epochs * len(starts), desc=desc, unit="step") as bar:
        for epoch in range(cfg.epochs):
            order, total, steps = torch.randperm(n_samples, generator=gen), 0.0, 0
            for start in starts:
                bar.update(1)
                idx = order[start : start + cfg.batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm needs two samples
                x, y = inputs[:, idx], final[idx]
                if joint:
                    x = x.reshape(1, -1, x.shape[-1])
                opt.zero_grad(set_to_none=True)
                total += _step(jumps, objective, x, y, None if joint else chunk, inputs.shape[0] if joint else 1)
                opt.step()
                steps += 1
            history.append(total / max(steps, 1))
            bar.set_postfix(epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{history[-1]:.4g}")
    jumps.eval()
    return history


# --- the recipe that works: one jump for every level, on per-level standardised inputs ---------------------
def level_stats(by_level: Tensor) -> tuple[Tensor, Tensor]:
    """Each level's input mean and variance over the samples: (L-1, N, d) -> (L-1, d), (L-1, d)."""
    return by_level.mean(1), by_level.var(1, unbiased=False)


def compose_level_norm(jump: LowRankJumps, mean: Tensor, var: Tensor) -> LowRankJumps:
    """A jump trained on per-level standardised inputs (x - mean_l) / sqrt(var_l + eps), as one jump on
    raw inputs with per-level BatchNorm statistics (exact: both standardisations are affine)."""
    eps = jump.config.bn_eps
    s = torch.sqrt(var + eps)  # (L-1, d)
    return jump.with_level_norm(mean + s * jump.running_mean, s.square() * (jump.running_var + eps) - eps)


@dataclass
class JointConfig:
    """The joint jump's schedule: MSE to the final state, then KL to the model's distribution."""

    rank: int = 32
    mse_epochs: int = 4
    kl_epochs: int = 1
    mse_batch: int = 32  # samples per step (each with all its levels)
    kl_batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    level_norm: bool = True


def train_joint(inputs: Tensor, final: Tensor, ctx: HeadContext, cfg: JointConfig) -> LowRankJumps:
    """One pure jump on all levels pooled (inputs (L-1, N, d) -> final (N, d)): MSE then KL, on per-level
    standardised inputs (``cfg.level_norm``, folded back into per-level statistics) or raw ones."""
    mean, var = level_stats(inputs)
    x = (inputs - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5) if cfg.level_norm else inputs
    torch.manual_seed(cfg.seed)
    jump = LowRankJumps(JumpConfig(inputs.shape[-1], cfg.rank, objective="kl"), n=1)
    if cfg.mse_epochs > 0:
        train_bank(jump, x, final, MSEToFinal(), TrainConfig(epochs=cfg.mse_epochs, batch_size=cfg.mse_batch,
                                                             lr=cfg.lr, seed=cfg.seed), desc="joint mse")
    if cfg.kl_epochs > 0:
        train_bank(jump, x, final, KLToModel(ctx), TrainConfig(epochs=cfg.kl_epochs, batch_size=cfg.kl_batch,
                                                               lr=cfg.lr, seed=cfg.seed),
                   desc="joint kl", data_init=cfg.mse_epochs == 0)
    return compose_level_norm(jump, mean, var) if cfg.level_norm else jump.eval()


def train_per_level(inputs: Tensor, final: Tensor, ctx: HeadContext, rank: int, kl_epochs: int, mse_epochs: int = 20,
                    seed: int = 0) -> tuple[LowRankJumps, LowRankJumps]:
    """N-NJTC banks (one pure jump per level): MSE, then KL from it. Returns both."""
    torch.manual_seed(seed)
    mse_bank = LowRankJumps(JumpConfig(inputs.shape[-1], rank), n=inputs.shape[0])
    train_bank(mse_bank, inputs, final, MSEToFinal(), TrainConfig(epochs=mse_epochs, seed=seed), desc="bank mse")
    kl = LowRankJumps(JumpConfig(inputs.shape[-1], rank, objective="kl"), n=inputs.shape[0])
    kl.load_state_dict(mse_bank.state_dict())
    train_bank(kl, inputs, final, KLToModel(ctx), TrainConfig(epochs=kl_epochs, seed=seed), desc="bank kl",
               chunk=4, data_init=False)
    return mse_bank, kl
