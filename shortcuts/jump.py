"""The N-NJTC jump: BatchNorm over d, then a low-rank map A (d→r), B (r→d).

Written like a LoRA layer: the factors ``lora_A`` and ``lora_B`` are kept separate, ``lora_A``
starts Kaiming-uniform and ``lora_B`` starts at zero, so a *residual* jump (h + B·A·BN(h)) is
the identity at initialisation and a *pure* jump (B·A·BN(h) + b) starts at zero.

A ``LowRankJumps`` module holds ``n`` independent jumps stacked along a leading axis, so all
exit levels train in one batched pass. Inputs are ``(n, B, d)``; a bank of one jump broadcasts
over any leading size, which is how OJFA reuses one jump at every level.

Per-level normalisation (``with_level_norm``): a bank of one jump may carry each exit level's own
input mean and variance (m, d), used by BatchNorm in place of its single running statistics, so the
shared A and B see every level's states standardised alike. It costs 2·d numbers per level and, in
the fused exit head, a d-sized elementwise scale before the shared A (``level_folded``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shortcuts.config import VARIANTS

JumpForm = Literal["pure", "residual"]
Objective = Literal["mse", "kl"]
ALL = slice(None)


@dataclass
class JumpConfig:
    hidden_size: int
    rank: int
    form: JumpForm = "pure"
    objective: Objective = "mse"
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive; got {self.hidden_size=}")
        if not 0 < self.rank < self.hidden_size:
            raise ValueError(f"rank must satisfy 0 < rank < hidden_size; got {self.rank=}, {self.hidden_size=}")
        if self.form not in ("pure", "residual"):
            raise ValueError(f"form must be 'pure' or 'residual'; got {self.form=}")
        if self.objective not in ("mse", "kl"):
            raise ValueError(f"objective must be 'mse' or 'kl'; got {self.objective=}")

    @property
    def variant(self) -> str:
        return f"{self.form}-{self.objective}"

    @classmethod
    def from_variant(cls, variant: str, hidden_size: int, rank: int) -> JumpConfig:
        if variant not in VARIANTS:
            raise ValueError(f"unknown jump variant {variant!r}; choose from {', '.join(VARIANTS)}")
        form, objective = variant.split("-")
        return cls(hidden_size, rank, form=form, objective=objective)  # type: ignore[arg-type]


class LowRankJumps(nn.Module):
    """``n`` N-NJTC jumps: y = B·A·BN(x) + b (pure) or x + B·A·BN(x) + b (residual)."""

    running_mean: Tensor  # buffers, (n, d)
    running_var: Tensor
    lens_levels: tuple[int, ...] = ()  # exit levels whose head is the logit lens instead (``with_lens``)

    def __init__(self, config: JumpConfig, n: int = 1):
        super().__init__()
        if n <= 0:
            raise ValueError(f"a bank needs at least one jump; got {n=}")
        self.config = config
        d, r = config.hidden_size, config.rank
        self.bn_weight = nn.Parameter(torch.ones(n, d))
        self.bn_bias = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("running_mean", torch.zeros(n, d))
        self.register_buffer("running_var", torch.ones(n, d))
        self.lora_A = nn.Parameter(torch.empty(n, r, d))
        self.lora_B = nn.Parameter(torch.zeros(n, d, r))
        self.bias = nn.Parameter(torch.zeros(n, d))
        for a in self.lora_A:  # same init as nn.Linear / peft's LoRA A
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def n(self) -> int:
        return self.lora_A.shape[0]

    @property
    def is_pure(self) -> bool:
        return self.config.form == "pure"

    @property
    def level_norm(self) -> tuple[Tensor, Tensor] | None:
        """Per-level input statistics (mean, var), each (m, d), or None."""
        mean: Tensor | None = getattr(self, "level_mean", None)
        var: Tensor | None = getattr(self, "level_var", None)
        return None if mean is None or var is None else (mean, var)

    def with_level_norm(self, mean: Tensor, var: Tensor) -> LowRankJumps:
        """A copy of this bank of one whose BatchNorm uses level i's own ``mean[i]``, ``var[i]`` (m, d) on
        inputs of level i (an input (m, B, d) in eval mode) instead of its running statistics."""
        if self.n != 1 or mean.shape != var.shape or mean.dim() != 2 or mean.shape[1] != self.config.hidden_size:
            raise ValueError(f"level norm needs a bank of one and (m, d) statistics; got {self.n=}, "
                             f"{tuple(mean.shape)=}, {tuple(var.shape)=}")
        one = self.select(0)
        one.register_buffer("level_mean", mean.detach().float().clone())
        one.register_buffer("level_var", var.detach().float().clone())
        return one

    def with_lens(self, levels: tuple[int, ...] | list[int]) -> LowRankJumps:
        """This jump, with the exit levels (1-based) whose exit head is the logit lens (the model's own final
        norm and head on h_l) instead of the jump: the levels where the lens predicts better. In place."""
        if any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 1 for lv in levels):
            raise ValueError(f"lens levels must be integers >= 1; got {levels!r}")
        self.lens_levels = tuple(sorted(set(levels)))
        return self

    def at_level(self, index: int) -> LowRankJumps:
        """The plain jump (bank of one, no level norm) this bank applies at level index ``index`` (0-based)."""
        one = self.select(0)
        if (stats := self.level_norm) is not None:
            one.running_mean.copy_(stats[0][index : index + 1])
            one.running_var.copy_(stats[1][index : index + 1])
        return one

    def level_folded(self) -> tuple[Tensor, Tensor]:
        """Level norm and BN folded around the shared A: z = A·(h ⊙ scale_l) + c_l at level index l.
        Returns scale (m, d), c (m, r): 2·d + r numbers per level, A unchanged."""
        if (stats := self.level_norm) is None:
            raise ValueError("this jump has no per-level normalisation")
        mean, var = stats
        scale = self.bn_weight[0] * torch.rsqrt(var + self.config.bn_eps)  # (m, d)
        shift = self.bn_bias[0] - mean * scale  # (m, d)
        return scale.detach(), (shift @ self.lora_A[0].T).detach()

    def normalize(self, x: Tensor, sl: slice = ALL) -> Tensor:
        """BatchNorm per jump over the batch axis. x: (n, B, d) -> (n, B, d); ``sl`` picks jumps.
        With a level norm and x of shape (m, B, d) in eval mode, level i uses its own statistics."""
        stats = self.level_norm
        if stats is not None and not self.training and x.shape[0] == stats[0].shape[0]:
            scale = self.bn_weight * torch.rsqrt(stats[1] + self.config.bn_eps)  # (m, d)
            return (x - stats[0].unsqueeze(1)) * scale.unsqueeze(1) + self.bn_bias.unsqueeze(1)
        if self.training:
            mean, var = x.mean(1), x.var(1, unbiased=False)  # (n, d)
            with torch.no_grad():
                m, count = self.config.bn_momentum, x.shape[1]
                self.running_mean[sl].lerp_(mean, m)
                self.running_var[sl].lerp_(var * count / max(count - 1, 1), m)
        else:
            mean, var = self.running_mean[sl], self.running_var[sl]
        scale = self.bn_weight[sl] * torch.rsqrt(var + self.config.bn_eps)  # (n, d)
        return (x - mean.unsqueeze(1)) * scale.unsqueeze(1) + self.bn_bias[sl].unsqueeze(1)

    def project(self, x: Tensor, sl: slice = ALL) -> Tensor:
        """z = A·BN(x). (n, B, d) -> (n, B, r)."""
        return self.normalize(x, sl) @ self.lora_A[sl].transpose(1, 2)

    def expand(self, z: Tensor, sl: slice = ALL) -> Tensor:
        """B·z + b. (n, B, r) -> (n, B, d)."""
        return z @ self.lora_B[sl].transpose(1, 2) + self.bias[sl].unsqueeze(1)

    def forward(self, x: Tensor, sl: slice = ALL) -> Tensor:
        y = self.expand(self.project(x, sl), sl)
        return x + y if self.config.form == "residual" else y

    def select(self, index: int) -> LowRankJumps:
        """A detached copy of jump ``index`` as a bank of one."""
        if not 0 <= index < self.n:
            raise IndexError(f"jump index {index} outside 0..{self.n - 1}")
        one = LowRankJumps(self.config, n=1)
        state = {k: v[index : index + 1].detach().clone() for k, v in self.state_dict().items()
                 if not k.startswith("level_")}
        one.load_state_dict(state)
        return one.eval()

    def folded(self) -> tuple[Tensor, Tensor]:
        """Eval-mode BN merged into A: z = x @ A_eff^T + c. Returns A_eff (n, r, d), c (n, r)."""
        scale = self.bn_weight * torch.rsqrt(self.running_var + self.config.bn_eps)  # (n, d)
        shift = self.bn_bias - self.running_mean * scale  # (n, d)
        a_eff = self.lora_A * scale.unsqueeze(1)
        c = torch.einsum("nrd,nd->nr", self.lora_A, shift)
        return a_eff.detach(), c.detach()

    def num_parameters(self) -> int:
        """Parameters used at inference: BN folds into A, leaving A_eff, c, B and b per jump."""
        d, r = self.config.hidden_size, self.config.rank
        levels = 0 if self.level_norm is None else 2 * d * self.level_norm[0].shape[0]
        return self.n * (2 * d * r + r + d) + levels


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the batch and d, summed over the jumps. (n, B, d) vs (B, d)."""
    return F.mse_loss(pred, target.expand_as(pred), reduction="none").mean(dim=(1, 2)).sum()


def cosine_score(pred: Tensor, target: Tensor, center: Tensor | None = None) -> Tensor:
    """OJFA's score: sum over samples of sign(cos)·cos². (..., B, d) vs (B, d) -> (...).

    With ``center`` (d,), typically the mean final state, both sides are centred first: the score
    then measures how well the jump predicts where a sample's final state differs from the
    average, not the common direction that every final state shares (a constant predictor, the
    mean itself, scores 0 here and about 0.5-0.6 per sample on the paper's score)."""
    if center is not None:
        pred, target = pred - center, target - center
    cos = F.cosine_similarity(pred, target.expand_as(pred), dim=-1)
    return (cos.sign() * cos.square()).sum(-1)
