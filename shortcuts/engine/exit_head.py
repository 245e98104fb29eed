"""The exit head (logits of the jump's estimate of the final state) and the exit gates.

For a pure jump the head is fused: with BN folded into A (z = A_eff·h + c) and the final norm
and unembedding folded into the r-dimensional head of ``shortcuts.heads``, a check costs
d·r + V·r multiply-adds instead of the full head's V·d. Everything is precomputed once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM, soft_cap
from shortcuts.engine.settings import ExitSettings
from shortcuts.heads import HeadContext
from shortcuts.jump import LowRankJumps

HeadKind = Literal["fused", "full", "identity"]


@dataclass(frozen=True)
class LevelHead:
    """The exit head at one level, on the device of the block whose state it reads: the fused
    terms of the level's jump (``fused``), or the final norm and unembedding (``identity``), plus the
    jump module (``full``). Several levels on one device share one copy of what they share."""

    device: torch.device
    kind: HeadKind
    ctx: HeadContext | None = None  # identity and full kinds
    jump: LowRankJumps | None = None  # full kind, with ``j`` its index in the bank
    j: int = 0
    A_T: Tensor | None = None  # fused: (d, r), z = A_eff·(h ⊙ scale) + c
    c: Tensor | None = None  # (r,)
    scale: Tensor | None = None  # (d,) per-level normalisation, else None
    W: Tensor | None = None  # (r+1, V)
    Q: Tensor | None = None  # (r+1, r+1)
    shift: Tensor | None = None  # (V,), None for RMSNorm
    eps: float = 0.0
    softcap: float | None = None

    def tensors(self) -> list[Tensor]:
        """Every tensor this level's check reads (for placement checks)."""
        own = [self.A_T, self.c, self.scale, self.W, self.Q, self.shift]
        if self.ctx is not None:
            n = self.ctx.norm
            own += [n.weight, n.bias, self.ctx.unembedding]
        if self.jump is not None:
            own += list(self.jump.parameters())
        return [t for t in own if t is not None]

    def __call__(self, h: Tensor) -> Tensor:
        """Exit logits for states h (B, d), already on this device -> (B, V) float32."""
        if self.kind != "fused":
            assert self.ctx is not None
            return self.ctx.full(h if self.jump is None else self.jump(h.unsqueeze(0), slice(self.j, self.j + 1))[0])
        assert self.A_T is not None
        assert self.c is not None
        assert self.W is not None
        assert self.Q is not None
        z = torch.addmm(self.c, h if self.scale is None else h * self.scale, self.A_T)  # (B, r)
        z1 = torch.cat([z, torch.ones_like(z[:, :1])], dim=-1)  # (B, r+1)
        inv = torch.rsqrt(((z1 @ self.Q) * z1).sum(-1, keepdim=True).clamp_min(0) + self.eps)  # (B, 1)
        logits = (z1 @ self.W).mul_(inv)  # (B, V)
        if self.shift is not None:
            logits += self.shift
        return soft_cap(logits, self.softcap)


class _Copies:
    """One copy per (device, name) of what the exit head made on the model's device: always for the
    fused terms (one jump's slice of the bank, so the stacked bank is freed), only on another device
    for the norm, unembedding and jump module (the model's own)."""

    def __init__(self, source: torch.device):
        self.source = source
        self.made: dict[tuple[torch.device, str], object] = {}

    def tensor(self, device: torch.device, name: str, t: Tensor) -> Tensor:
        key = (device, name)
        if key not in self.made:
            self.made[key] = t.to(device, copy=True, memory_format=torch.contiguous_format)  # row-major: read once
        out = self.made[key]
        assert isinstance(out, Tensor)
        return out

    def ctx(self, device: torch.device, ctx: HeadContext) -> HeadContext:
        if (device, "ctx") not in self.made:
            self.made[device, "ctx"] = ctx if device == self.source else ctx.to(device, copy=True)
        out = self.made[device, "ctx"]
        assert isinstance(out, HeadContext)
        return out

    def jump(self, device: torch.device, jump: LowRankJumps) -> LowRankJumps:
        if (device, "jump") not in self.made:
            self.made[device, "jump"] = jump if device == self.source else copy.deepcopy(jump).to(device)
        out = self.made[device, "jump"]
        assert isinstance(out, LowRankJumps)
        return out


class ExitHead:
    """Logits at an exit level: head(jump(h_l)). ``jump`` None is the identity shortcut
    (the logit lens, head(h_l)). A bank of one jump serves every level; a bank of L-1 jumps
    uses jump l-1 at level l. At ``lens_levels`` (default: the jump's own, ``LowRankJumps.with_lens``)
    the head is the logit lens instead: the levels where it predicts better than the jump (late ones),
    at the price of a full head per check.

    Each level's check runs on the device of block l (``Placement.check``): its tensors are copied
    there once, at construction (``levels``), so a token that exits at level l touches no device
    of a later block. On one device nothing is copied but the fused terms (one per jump)."""

    @torch.no_grad()
    def __init__(self, lm: CausalLM, jump: LowRankJumps | None, lens_levels: tuple[int, ...] | None = None):
        self.num_layers = lm.num_layers
        self.lens_levels = frozenset((jump.lens_levels if jump is not None else ()) if lens_levels is None
                                     else lens_levels)
        if bad := [lv for lv in self.lens_levels if not 1 <= lv < lm.num_layers]:
            raise ValueError(f"lens levels {sorted(bad)} must be in [1, {lm.num_layers - 1}]")
        self.placement = lm.placement()
        self.ctx = HeadContext.from_model(lm).to(lm.device)
        self.jump = None if jump is None else jump.eval().to(lm.device)
        self.kind: HeadKind = "identity" if jump is None else "fused" if jump.is_pure else "full"
        if jump is not None:
            self._check(lm, jump)
        fused = self._fuse(jump) if jump is not None and self.kind == "fused" else {}
        copies = _Copies(lm.device)
        self.levels = {level: self._level(level, copies, fused) for level in range(1, self.num_layers)}

    def _check(self, lm: CausalLM, jump: LowRankJumps) -> None:
        if jump.config.hidden_size != lm.hidden_size:
            raise ValueError(f"the jump is for d={jump.config.hidden_size}, the model has d={lm.hidden_size}")
        if jump.n not in (1, lm.num_layers - 1):
            raise ValueError(f"a jump bank must hold 1 jump or one per level ({lm.num_layers - 1}); got {jump.n}")
        if jump.level_norm is not None and (self.kind != "fused" or len(jump.level_norm[0]) != lm.num_layers - 1):
            raise ValueError(f"a per-level normalised jump must be pure, with statistics for {lm.num_layers - 1} "
                             "levels")

    def _fuse(self, jump: LowRankJumps) -> dict[str, Tensor]:
        """Per jump j, with z1 = [z, 1] and z = A_eff·h + c: logits = inv(z1)·(z1 @ W) + shift, where
        W = [M; m0]ᵀ (r+1, V), stored row-major so a check reads it once, and inv(z1) =
        rsqrt(z1ᵀ·Q·z1 + eps) with Q = [[G, g], [gᵀ, g0]] / d the final norm's mean square of B·z + b.
        Returns the terms of every jump (stacked on a first axis) on the model's device."""
        A_eff, c = (t.float() for t in jump.folded())  # (n, r, d), (n, r)
        fused = self.ctx.low_rank(jump.lora_B.detach().float(), jump.bias.detach().float())
        r = jump.config.rank
        top = torch.cat([fused.G, fused.g.unsqueeze(-1)], dim=-1)  # (n, r, r+1)
        bottom = torch.cat([fused.g, fused.g0.unsqueeze(-1)], dim=-1).unsqueeze(1)  # (n, 1, r+1)
        terms = {"A_T": A_eff.transpose(1, 2), "c": c,  # (n, d, r), (n, r)
                 "W": fused.M_aug[..., : r + 1].transpose(1, 2),  # (n, r+1, V)
                 "Q": torch.cat([top, bottom], dim=1) / fused.hidden_size}  # (n, r+1, r+1)
        shift = fused.M_aug[..., r + 1]  # (n, V): W_U·β, zero for RMSNorm
        if bool(shift.abs().max() > 0):
            terms["shift"] = shift
        self.eps: float = fused.eps
        if jump.level_norm is not None:  # per-level normalisation: z = A·(h ⊙ scale_l) + c_l
            scale, c_l = jump.level_folded()  # (L-1, d), (L-1, r)
            terms.update(A_T=jump.lora_A.detach().float().transpose(1, 2), scale=scale.float(), c=c_l.float())
        return terms

    def _level(self, level: int, copies: _Copies, fused: dict[str, Tensor]) -> LevelHead:
        """The head at ``level`` on its block's device, from the copies made there so far."""
        dev, j = self.placement.check(level), self.index(level)
        if level in self.lens_levels:
            return LevelHead(dev, "identity", ctx=copies.ctx(dev, self.ctx))
        if self.kind != "fused":
            jump = None if self.jump is None else copies.jump(dev, self.jump)
            return LevelHead(dev, self.kind, ctx=copies.ctx(dev, self.ctx), jump=jump, j=j)
        per_level = "scale" in fused  # A shared by every level, c and scale per level

        def term(name: str, k: int) -> Tensor | None:
            return None if name not in fused else copies.tensor(dev, f"{name}{k}", fused[name][k])

        return LevelHead(dev, "fused", A_T=term("A_T", 0 if per_level else j),
                         c=term("c", level - 1 if per_level else j), scale=term("scale", level - 1),
                         W=term("W", j), Q=term("Q", j), shift=term("shift", j), eps=self.eps, softcap=self.ctx.softcap)

    def index(self, level: int) -> int:
        """Which jump of the bank serves ``level`` (1..L-1)."""
        if not 1 <= level < self.num_layers:
            raise ValueError(f"{level=} must be in [1, {self.num_layers - 1}]")
        return 0 if self.jump is None or self.jump.n == 1 else level - 1

    @torch.inference_mode()
    def __call__(self, h: Tensor, level: int) -> Tensor:
        """Exit logits for states h (B, d) after block ``level`` -> (B, V) float32, on that block's device."""
        self.index(level)  # a level outside 1..L-1 is a ValueError
        head = self.levels[level]
        return head(h.to(head.device, torch.float32))


def max_probability(logits: Tensor) -> float:
    """max softmax(logits) for one row (V,), as 1 / sum exp(l - max l): two passes over V, no
    normalised copy and no arg-max (a third of the cost of softmax(...).max(-1) on a CPU)."""
    logits = logits.float()
    return float(1.0 / torch.exp(logits - logits.max()).sum())


def top_and_confidence(logits: Tensor) -> list[tuple[int, float]]:
    """Top-1 token and max softmax probability of each row of (n, V) logits, brought to the host
    together: one device sync for all rows."""
    conf, top = confidence_and_top(logits)
    return [(int(t), c) for t, c in torch.stack([top.to(conf.dtype), conf], dim=1).tolist()]


def confidence_and_top(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability and top-1 of each row of (n, V) logits, on their device:
    1 / sum exp(l - max l), no normalised copy."""
    logits = logits.float()
    top_logit, top = logits.max(-1)
    return 1.0 / torch.exp(logits - top_logit[:, None]).sum(-1), top


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last axis. (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class ExitGate:
    """Decides, check by check within one token's forward pass, whether the token leaves."""

    def __init__(self, settings: ExitSettings):
        self.settings = settings
        self._last_top: int | None = None
        self._streak = 0

    def reset(self) -> None:
        """Call before each token's forward pass (patience counts within one token)."""
        self._last_top, self._streak = None, 0

    def __call__(self, logits: Tensor) -> tuple[bool, float]:
        """logits (V,) of the exit head -> (exit?, confidence = max softmax probability)."""
        gate = self.settings.gate
        if gate == "confidence":
            confidence = max_probability(logits)
            return self.decide(confidence), confidence
        conf, top = torch.softmax(logits.float(), dim=-1).max(-1)
        ent = float(entropy(logits)) if gate == "entropy" else None
        return self.decide(float(conf), int(top), ent), float(conf)

    def decide(self, confidence: float, top: int | None = None, ent: float | None = None,
               score: float | None = None) -> bool:
        """The decision from the head's max probability, top-1 (patience), entropy (entropy gate) or
        the learned gate's score."""
        s = self.settings
        if s.gate == "confidence":
            return s.threshold < 1.0 and confidence >= s.threshold
        if s.gate == "learned":
            assert score is not None
            return s.threshold < 1.0 and score >= s.threshold
        if s.gate == "entropy":
            assert ent is not None
            return ent <= s.threshold
        self._streak = self._streak + 1 if top == self._last_top else 1
        self._last_top = top
        return self._streak >= s.patience
