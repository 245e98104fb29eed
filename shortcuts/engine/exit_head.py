"""The exit head (logits of the jump's estimate of the final state) and the exit gates.

For a pure jump the head is fused: with BN folded into A (z = A_eff·h + c) and the final norm
and unembedding folded into the r-dimensional head of ``shortcuts.heads``, a check costs
d·r + V·r multiply-adds instead of the full head's V·d. Everything is precomputed once.

The big matrices are in the engine's weight format (``weights.prepare_linear``): the fused head's
(V, r) matrix, and for the identity and residual kinds the full head (the runner's own on the model's
device). The small ones (A, Q: d·r and r²) stay float32.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM, soft_cap
from shortcuts.engine.blocks import Norm, norm_of
from shortcuts.engine.settings import ExitSettings, Quantization
from shortcuts.engine.weights import Linear, head_format, linear_tensors, prepare_linear
from shortcuts.heads import HeadContext
from shortcuts.jump import LowRankJumps


class FullHead(Protocol):
    """What the exit head takes from the runner (``runner.LayerRunner``): its weight format, the final norm
    and the full head as the runner holds them, and the blocks' dtype."""

    quantization: Quantization
    final_norm: Norm
    head: Linear
    dtype: torch.dtype

HeadKind = Literal["fused", "full", "identity"]


@dataclass(frozen=True)
class LevelHead:
    """The exit head at one level, on the device of the block whose state it reads: the fused
    terms of the level's jump (``fused``), or the final norm and full head (``identity``), plus the
    jump module (``full``). Several levels on one device share one copy of what they share."""

    device: torch.device
    kind: HeadKind
    norm: Norm | None = None  # identity and full kinds: the final norm (in ``dtype``) and the full head
    head: Linear | None = None
    dtype: torch.dtype = torch.float32
    jump: LowRankJumps | None = None  # full kind, with ``j`` its index in the bank
    j: int = 0
    A_T: Tensor | None = None  # fused: (d, r), z = A_eff·(h ⊙ scale) + c
    c: Tensor | None = None  # (r,)
    scale: Tensor | None = None  # (d,) per-level normalisation, else None
    M: Linear | None = None  # (V, r) with bias m0 (V,), in the engine's weight format
    Q: Tensor | None = None  # (r+1, r+1)
    shift: Tensor | None = None  # (V,), None for RMSNorm
    eps: float = 0.0
    softcap: float | None = None

    def tensors(self) -> list[Tensor]:
        """Every tensor this level's check reads (for placement checks)."""
        own = [self.A_T, self.c, self.scale, self.Q, self.shift]
        if self.M is not None:
            own += linear_tensors(self.M)
        if self.norm is not None and self.head is not None:
            own += [self.norm.weight, self.norm.bias, *linear_tensors(self.head)]
        if self.jump is not None:
            own += list(self.jump.parameters())
        return [t for t in own if t is not None]

    def __call__(self, h: Tensor) -> Tensor:
        """Exit logits for states h (B, d), already on this device -> (B, V) float32."""
        if self.kind != "fused":
            assert self.norm is not None
            assert self.head is not None
            y = h if self.jump is None else self.jump(h.unsqueeze(0), slice(self.j, self.j + 1))[0]
            return soft_cap(self.head(self.norm(y.to(self.dtype))).float(), self.softcap)
        assert self.A_T is not None
        assert self.c is not None
        assert self.M is not None
        assert self.Q is not None
        z = torch.addmm(self.c, h if self.scale is None else h * self.scale, self.A_T)  # (B, r)
        z1 = torch.cat([z, torch.ones_like(z[:, :1])], dim=-1)  # (B, r+1)
        inv = torch.rsqrt(((z1 @ self.Q) * z1).sum(-1, keepdim=True).clamp_min(0) + self.eps)  # (B, 1)
        logits = self.M(z).mul_(inv)  # (B, V): (M·z + m0) / rms
        if self.shift is not None:
            logits += self.shift
        return soft_cap(logits, self.softcap)


class _Copies:
    """One copy per (device, name) of what the exit head made on the model's device: always for the
    fused terms (one jump's slice of the bank, so the stacked bank is freed), only on another device
    for the jump module (the model's own); the norm and full head are the runner's on the model's device
    and prepared anew (in the weight format) on another."""

    def __init__(self, source: torch.device, quantization: Quantization):
        self.source = source
        self.quantization: Quantization = head_format(quantization)
        self.made: dict[tuple[torch.device, str], object] = {}

    def tensor(self, device: torch.device, name: str, t: Tensor) -> Tensor:
        key = (device, name)
        if key not in self.made:
            self.made[key] = t.to(device, copy=True, memory_format=torch.contiguous_format)  # row-major: read once
        out = self.made[key]
        assert isinstance(out, Tensor)
        return out

    def linear(self, device: torch.device, name: str, weight: Tensor, bias: Tensor | None) -> Linear:
        """(out, in) ``weight`` prepared in the weight format on ``device``, once per (device, name)."""
        key = (device, name)
        if key not in self.made:
            self.made[key] = prepare_linear(weight, bias, self.quantization, device)
        return self.made[key]  # type: ignore[return-value]

    def full_head(self, device: torch.device, ctx: HeadContext, norm: Norm, head: Linear | None) -> tuple[Norm, Linear]:
        """The final norm and the full head on ``device``: the runner's own on the model's device."""
        if device == self.source and head is not None:
            return norm, head
        key = (device, "norm")
        if key not in self.made:
            self.made[key] = Norm(norm.kind, norm.weight.to(device, copy=True),
                                  None if norm.bias is None else norm.bias.to(device, copy=True), norm.eps)
        moved = self.made[key]
        assert isinstance(moved, Norm)
        return moved, self.linear(device, "unembedding", ctx.unembedding, None)

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
    of a later block. On one device nothing is copied but the fused terms (one per jump).

    ``runner``: the big matrices take its weight format, and the identity/full kinds use its final norm
    and head (without one: format "none", the head prepared here). Built from the model's dense head,
    so before ``LayerRunner.release_model_weights``."""

    @torch.no_grad()
    def __init__(self, lm: CausalLM, jump: LowRankJumps | None, runner: FullHead | None = None,
                 lens_levels: tuple[int, ...] | None = None):
        self.num_layers = lm.num_layers
        self.lens_levels = frozenset((jump.lens_levels if jump is not None else ()) if lens_levels is None
                                     else lens_levels)
        if bad := [lv for lv in self.lens_levels if not 1 <= lv < lm.num_layers]:
            raise ValueError(f"lens levels {sorted(bad)} must be in [1, {lm.num_layers - 1}]")
        self.placement = lm.placement()
        self.quantization: Quantization = "none" if runner is None else runner.quantization
        ctx = HeadContext.from_model(lm).to(lm.device)
        self.softcap = ctx.softcap
        self.jump = None if jump is None else jump.eval().to(lm.device)
        self.kind: HeadKind = "identity" if jump is None else "fused" if jump.is_pure else "full"
        if jump is not None:
            self._check(lm, jump)
        fused = self._fuse(jump, ctx) if jump is not None and self.kind == "fused" else {}
        copies = _Copies(lm.device, self.quantization)
        if runner is not None:
            norm, head, self.dtype = runner.final_norm, runner.head, runner.dtype
        else:
            norm, head, self.dtype = norm_of(lm.norm, lm.spec.norm_kind, lm.spec.norm_offset, None), None, \
                lm.lm_head.weight.dtype
        self.levels = {level: self._level(level, copies, fused, ctx, norm, head) for level in range(1, self.num_layers)}

    def _check(self, lm: CausalLM, jump: LowRankJumps) -> None:
        if jump.config.hidden_size != lm.hidden_size:
            raise ValueError(f"the jump is for d={jump.config.hidden_size}, the model has d={lm.hidden_size}")
        if jump.n not in (1, lm.num_layers - 1):
            raise ValueError(f"a jump bank must hold 1 jump or one per level ({lm.num_layers - 1}); got {jump.n}")
        if jump.level_norm is not None and (self.kind != "fused" or len(jump.level_norm[0]) != lm.num_layers - 1):
            raise ValueError(f"a per-level normalised jump must be pure, with statistics for {lm.num_layers - 1} "
                             "levels")

    def _fuse(self, jump: LowRankJumps, ctx: HeadContext) -> dict[str, Tensor]:
        """Per jump j, with z1 = [z, 1] and z = A_eff·h + c: logits = inv(z1)·(M·z + m0) + shift (M (V, r)
        prepared in the weight format, m0 its bias) and inv(z1) = rsqrt(z1ᵀ·Q·z1 + eps) with
        Q = [[G, g], [gᵀ, g0]] / d the final norm's mean square of B·z + b.
        Returns the terms of every jump (stacked on a first axis) on the model's device."""
        A_eff, c = (t.float() for t in jump.folded())  # (n, r, d), (n, r)
        fused = ctx.low_rank(jump.lora_B.detach().float(), jump.bias.detach().float())
        r = jump.config.rank
        top = torch.cat([fused.G, fused.g.unsqueeze(-1)], dim=-1)  # (n, r, r+1)
        bottom = torch.cat([fused.g, fused.g0.unsqueeze(-1)], dim=-1).unsqueeze(1)  # (n, 1, r+1)
        terms = {"A_T": A_eff.transpose(1, 2), "c": c,  # (n, d, r), (n, r)
                 "M": fused.M_aug[..., :r], "m0": fused.M_aug[..., r],  # (n, V, r), (n, V)
                 "Q": torch.cat([top, bottom], dim=1) / fused.hidden_size}  # (n, r+1, r+1)
        shift = fused.M_aug[..., r + 1]  # (n, V): W_U·β, zero for RMSNorm
        if bool(shift.abs().max() > 0):
            terms["shift"] = shift
        self.eps: float = fused.eps
        if jump.level_norm is not None:  # per-level normalisation: z = A·(h ⊙ scale_l) + c_l
            scale, c_l = jump.level_folded()  # (L-1, d), (L-1, r)
            terms.update(A_T=jump.lora_A.detach().float().transpose(1, 2), scale=scale.float(), c=c_l.float())
        return terms

    def _level(self, level: int, copies: _Copies, fused: dict[str, Tensor], ctx: HeadContext, norm: Norm,
               head: Linear | None) -> LevelHead:
        """The head at ``level`` on its block's device, from the copies made there so far."""
        dev, j = self.placement.check(level), self.index(level)
        if level in self.lens_levels:  # the logit lens: the model's own final norm and head on h_l
            level_norm, level_head = copies.full_head(dev, ctx, norm, head)
            return LevelHead(dev, "identity", norm=level_norm, head=level_head, dtype=self.dtype, softcap=self.softcap)
        if self.kind != "fused":
            jump = None if self.jump is None else copies.jump(dev, self.jump)
            level_norm, level_head = copies.full_head(dev, ctx, norm, head)
            return LevelHead(dev, self.kind, norm=level_norm, head=level_head, dtype=self.dtype, jump=jump, j=j,
                             softcap=self.softcap)
        per_level = "scale" in fused  # A shared by every level, c and scale per level

        def term(name: str, k: int) -> Tensor | None:
            return None if name not in fused else copies.tensor(dev, f"{name}{k}", fused[name][k])

        return LevelHead(dev, "fused", A_T=term("A_T", 0 if per_level else j),
                         c=term("c", level - 1 if per_level else j), scale=term("scale", level - 1),
                         M=copies.linear(dev, f"M{j}", fused["M"][j], fused["m0"][j]), Q=term("Q", j),
                         shift=term("shift", j), eps=self.eps, softcap=self.softcap)

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


def confidence_and_top(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max softmax probability and top-1 of each row of (n, V) logits, on their device:
    1 / sum exp(l - max l), no normalised copy (the one place the engine computes a max probability).
    A tie goes to the lowest token id, as in ``sampling.pick`` (``max(-1)`` may name another one of the
    tied tokens: a bf16 head's logits tie often, and exact mode would then differ from full depth)."""
    logits = logits.float()
    top = logits.argmax(-1)
    top_logit = logits.gather(-1, top[:, None])[:, 0]
    return 1.0 / torch.exp(logits - top_logit[:, None]).sum(-1), top


def to_host(conf: Tensor, top: Tensor) -> list[tuple[int, float]]:
    """(top-1, max probability) of each row, brought to the host together: one device sync for all rows."""
    return [(int(t), c) for t, c in torch.stack([top.to(conf.dtype), conf], dim=1).tolist()]


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
