"""The N-NJTC jump: BatchNorm over d, then a low-rank map A (d→r), B (r→d).

Written like a LoRA layer: the factors ``lora_A`` and ``lora_B`` are kept separate, ``lora_A``
starts Kaiming-uniform and ``lora_B`` starts at zero, so a *residual* jump (h + B·A·BN(h)) is
the identity at initialisation and a *pure* jump (B·A·BN(h) + b) starts at zero.

A ``LowRankJumps`` module holds ``n`` independent jumps stacked along a leading axis, so all
exit levels train in one batched pass. Inputs are ``(n, B, d)``; a bank of one jump broadcasts
over any leading size, which is how OJFA reuses one jump at every level.
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

    def normalize(self, x: Tensor, sl: slice = ALL) -> Tensor:
        """BatchNorm per jump over the batch axis. x: (n, B, d) -> (n, B, d); ``sl`` picks jumps."""
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
        state = {k: v[index : index + 1].detach().clone() for k, v in self.state_dict().items()}
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
        return self.n * (2 * d * r + r + d)


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the batch and d, summed over the jumps. (n, B, d) vs (B, d)."""
    return F.mse_loss(pred, target.expand_as(pred), reduction="none").mean(dim=(1, 2)).sum()


def cosine_score(pred: Tensor, target: Tensor) -> Tensor:
    """OJFA's score: sum over samples of sign(cos)·cos². (..., B, d) vs (B, d) -> (...)."""
    cos = F.cosine_similarity(pred, target.expand_as(pred), dim=-1)
    return (cos.sign() * cos.square()).sum(-1)
