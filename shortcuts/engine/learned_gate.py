"""A learned exit gate: a logistic model on features that are free at an exit check (CALM-style).

At a check after block ``level`` the engine has the exit head's logits, the state after the block
and the state before it (the block's input), the exit head's top-1 at this token's previous check,
and the confidence with which the previous token was decided. From these, ``gate_features``
builds one row per sequence; ``LearnedGate.score`` gives the probability that the exit head's
top-1 is the full model's; the token leaves when it reaches ``threshold``.

    gate = LearnedGate.from_extra(artifact.extra)                # or None when there is none
    feats, top, conf = gate_features(logits, level, gate.num_layers, h, h_in, prev_top, prev_conf)
    leave = gate.score(feats) >= gate.threshold                  # (B,) bool; the pick is ``top``

Features (``FEATURES``, in this order, then one indicator per level 1..L-1):

- confidence: max softmax probability of the exit head
- margin: top-1 minus top-2 probability
- log_odds: log(confidence / (1 - confidence)), clamped to [-12, 12]
- level: level / L
- agree_prev: 1 if the top-1 equals the top-1 at this token's previous check, else 0 (0 at its first check)
- delta: relative change of the state over the block just run, norm(h - h_in) / norm(h_in)
- prev_confidence: the confidence that decided the previous token (the exit head's at its exit level,
  or the full model's max probability when it went full depth; for the first generated token, the
  prefill's)
- level_is_l: 1 at level l, else 0, for l = 1..L-1 (L-1 features)

Pure torch, no engine state: stored in a jump artifact as ``extra["gate"] = gate.to_dict()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shortcuts.engine.exit_head import confidence_and_top

FEATURES = ("confidence", "margin", "log_odds", "level", "agree_prev", "delta", "prev_confidence")
KIND = "learned"


def feature_names(num_layers: int) -> list[str]:
    return [*FEATURES, *(f"level_is_{lv}" for lv in range(1, num_layers))]


def head_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From exit logits (B, V): confidence (max probability, ``confidence_and_top``), margin (top-1 minus
    top-2 probability: p_2 = p_1 exp(l_2 - l_1)) and top-1, each (B,)."""
    logits = logits.float()
    conf, top = confidence_and_top(logits)
    top2 = logits.topk(2, dim=-1).values  # (B, 2)
    return conf, conf * (1.0 - torch.exp(top2[:, 1] - top2[:, 0])), top


def build_features(confidence: Tensor, margin: Tensor, level: Tensor, agree_prev: Tensor, delta: Tensor,
                   prev_confidence: Tensor, num_layers: int) -> Tensor:
    """Feature rows from per-row values, each of the same shape S (any shape; ``level`` holds ints
    1..L-1). Returns (*S, F) float32 with F = len(FEATURES) + L - 1."""
    conf = confidence.float()
    c = conf.clamp(1e-6, 1 - 1e-6)
    log_odds = (c.log() - (1 - c).log()).clamp(-12, 12)
    onehot = torch.nn.functional.one_hot(level.long() - 1, num_layers - 1).float()
    cols = [conf, margin.float(), log_odds, level.float() / num_layers, agree_prev.float(), delta.float(),
            prev_confidence.float()]
    return torch.cat([torch.stack(cols, dim=-1), onehot], dim=-1)


def gate_features(logits: Tensor, level: int, num_layers: int, h: Tensor, h_in: Tensor, prev_top: Tensor | None,
                  prev_confidence: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Features at a check of B sequences after block ``level`` (1..L-1).

    logits (B, V): the exit head's; h, h_in (B, d): the state after and before the block;
    prev_top (B,) the exit head's top-1 at each sequence's previous check of this token, or None at
    its first check; prev_confidence (B,): the confidence that decided each sequence's previous token.
    Returns features (B, F), top-1 (B,) and confidence (B,)."""
    conf, margin, top = head_stats(logits)
    agree = torch.zeros_like(conf) if prev_top is None else (top == prev_top).float()
    delta = (h.float() - h_in.float()).norm(dim=-1) / h_in.float().norm(dim=-1).clamp_min(1e-6)
    lv = torch.full_like(top, level)
    return build_features(conf, margin, lv, agree, delta, prev_confidence.to(conf), num_layers), top, conf


@dataclass
class LearnedGate:
    """score = sigmoid(features · weights + bias); the token leaves when score >= threshold."""

    weights: Tensor  # (F,)
    bias: float
    num_layers: int
    threshold: float = 0.9
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(self.features) or tuple(feature_names(self.num_layers))
        if len(names) != self.weights.numel() or list(names) != feature_names(self.num_layers):
            raise ValueError(f"a learned gate for {self.num_layers} layers needs the features "
                             f"{feature_names(self.num_layers)}; got {list(names)} with {self.weights.numel()} weights")
        if not 0.0 <= self.threshold <= 1.0 or not math.isfinite(self.bias):
            raise ValueError(f"threshold={self.threshold} must be in [0, 1] and bias={self.bias} finite")
        self.features = names
        self.weights = self.weights.float().flatten()

    def logit(self, features: Tensor) -> Tensor:
        """(..., F) -> (...) the logistic model's log-odds."""
        return features.float() @ self.weights.to(features.device) + self.bias

    def score(self, features: Tensor) -> Tensor:
        """(..., F) -> (...) probability that the exit head's top-1 is the full model's."""
        return torch.sigmoid(self.logit(features))

    def fires(self, features: Tensor, threshold: float | None = None) -> Tensor:
        """(..., F) -> (...) bool: leave here."""
        return self.score(features) >= (self.threshold if threshold is None else threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "features": list(self.features), "weights": [round(float(w), 6) for w in self.weights],
                "bias": round(float(self.bias), 6), "num_layers": self.num_layers, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LearnedGate:
        if d.get("kind") != KIND:
            raise ValueError(f"not a learned gate: kind={d.get('kind')!r}")
        return cls(torch.tensor(d["weights"], dtype=torch.float32), float(d["bias"]), int(d["num_layers"]),
                   float(d.get("threshold", 0.9)), tuple(d["features"]))

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> LearnedGate | None:
        """The learned gate a jump artifact stores (``extra["gate"]`` of kind "learned"), else None."""
        d = extra.get("gate")
        return cls.from_dict(d) if isinstance(d, dict) and d.get("kind") == KIND else None

    @classmethod
    def fit(cls, features: Tensor, target: Tensor, num_layers: int, l2: float = 1e-3, steps: int = 200,
            weight: Tensor | None = None) -> LearnedGate:
        """Logistic regression (L-BFGS, L2 on standardised features) of ``target`` (N,) in {0, 1} on
        ``features`` (N, F); the standardisation is folded into the stored weights and bias."""
        x = features.float()
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
        xs, y = (x - mu) / sd, target.float()
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        sample_w = torch.ones_like(y) if weight is None else weight.float()
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            bce = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y, weight=sample_w)
            loss = bce + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        weights = (w / sd).detach()
        return cls(weights, float(b.detach() - (mu * weights).sum()), num_layers)
