"""Per-level quality of shortcuts: precision@1 and surprisal against the full model's top-1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcuts.heads import HeadContext, jump_logits
from shortcuts.jump import LowRankJumps, cosine_score

# A method maps an exit level's index (0-based over levels 1..L-1) to the jump used there,
# or to None for the identity shortcut (the level's state straight into the head).
Method = Callable[[int], LowRankJumps | None]


def precision_at_1(logits: Tensor, target: Tensor) -> Tensor:
    """Fraction of rows whose top-1 token equals ``target``. logits (B, V), target (B,)."""
    return (logits.argmax(-1) == target).float().mean()


def surprisal(logits: Tensor, target: Tensor) -> Tensor:
    """Mean of -log p(target) under softmax(logits), in nats. logits (B, V), target (B,)."""
    return -F.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1).mean()


@dataclass
class LevelScores:
    precision: list[float]
    surprisal: list[float]

    def mean(self) -> tuple[float, float]:
        return sum(self.precision) / len(self.precision), sum(self.surprisal) / len(self.surprisal)


@torch.no_grad()
def model_top1(final: Tensor, ctx: HeadContext, chunk: int = 512) -> Tensor:
    """The full model's top-1 token at each sample. final (N, d) -> (N,)."""
    return torch.cat([ctx.full(final[i : i + chunk]).argmax(-1) for i in range(0, len(final), chunk)])


@torch.no_grad()
def score_level(jump: LowRankJumps | None, x: Tensor, target: Tensor, ctx: HeadContext,
                chunk: int = 512) -> tuple[float, float]:
    """precision@1 and surprisal of one shortcut on one level's states x (N, d)."""
    fused = ctx.low_rank(jump.lora_B, jump.bias) if jump is not None and jump.is_pure else None
    hits, nats = 0.0, 0.0
    for i in range(0, len(x), chunk):
        xs, ts = x[i : i + chunk], target[i : i + chunk]
        logits = ctx.full(xs) if jump is None else jump_logits(jump, xs[None], ctx, fused)[0]
        hits += float(precision_at_1(logits, ts)) * len(xs)
        nats += float(surprisal(logits, ts)) * len(xs)
    return hits / len(x), nats / len(x)


def evaluate_method(method: Method, by_level: Tensor, target: Tensor, ctx: HeadContext) -> LevelScores:
    """Scores of ``method`` at every level. by_level (L-1, N, d), target (N,)."""
    pairs = [score_level(method(i), by_level[i], target, ctx) for i in range(by_level.shape[0])]
    return LevelScores([p for p, _ in pairs], [s for _, s in pairs])


@torch.no_grad()
def ojfa_scores(bank: LowRankJumps, by_level: Tensor, final: Tensor, center: Tensor | None = None,
                level_norm: tuple[Tensor, Tensor] | None = None) -> list[float]:
    """OJFA: for each jump j, sum over levels l and samples of sign(cos)·cos² between
    jump_j(h_l) and the final state. by_level (L-1, N, d), final (N, d). ``center`` (d,): score on
    centred states (``cosine_score``); ``level_norm``: score jump j with each level's own input
    statistics (mean, var), each (L-1, d), as it would be applied (``LowRankJumps.with_level_norm``)."""
    def one(j: int) -> LowRankJumps:
        return bank.select(j) if level_norm is None else bank.select(j).with_level_norm(*level_norm)

    return [float(cosine_score(one(j)(by_level), final, center).sum()) for j in range(bank.n)]


def choose(scores: list[float]) -> int:
    """The OJFA choice: the index of the best-scoring jump (first one on ties)."""
    if not scores:
        raise ValueError("no scores to choose from")
    return max(range(len(scores)), key=lambda j: (scores[j], -j))
