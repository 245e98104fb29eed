"""The model's head as plain float32 tensors, and the fused exit head of a pure low-rank jump.

Fused head. A pure jump estimates the final state as y = B·z + b with z = A·BN(h) in R^r.
Let P be the centring projector for LayerNorm (I for RMSNorm), B_c = P·B, b_c = P·b, so
y_c = B_c·z + b_c. Then

    s²     = |y_c|² / d = (zᵀ G z + 2 gᵀ z + g0) / d,  G = B_cᵀB_c, g = B_cᵀb_c, g0 = b_cᵀb_c
    logits = (M·z + m0) / sqrt(s² + eps) + W_U·β,      M = W_U·diag(γ)·B_c  (V×r), m0 = W_U·(γ⊙b_c)

so ``lm_head(norm(jump(h)))`` costs V·r + r² multiply-adds instead of V·d + d·r. A residual
jump (h + B·z) needs W_U·h, a full head pass, so it uses ``HeadContext.full``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM, NormSpec, soft_cap
from shortcuts.jump import ALL, LowRankJumps


@dataclass(frozen=True)
class HeadContext:
    """lm_head ∘ final_norm as tensors: W_U (V, d), the norm's gain/bias/eps, soft-cap."""

    norm: NormSpec
    unembedding: Tensor  # (V, d)
    softcap: float | None = None

    @classmethod
    def from_model(cls, lm: CausalLM) -> HeadContext:
        return cls(lm.norm_spec(), lm.unembedding(), lm.softcap)

    def to(self, device: str | torch.device, copy: bool = False) -> HeadContext:
        """On ``device``; ``copy``: new tensors even where they already are there."""
        n = self.norm
        bias = None if n.bias is None else n.bias.to(device, copy=copy)
        return HeadContext(NormSpec(n.kind, n.weight.to(device, copy=copy), bias, n.eps),
                           self.unembedding.to(device, copy=copy), self.softcap)

    @property
    def hidden_size(self) -> int:
        return self.unembedding.shape[1]

    def normalize(self, y: Tensor) -> Tensor:
        y = y.float()
        if self.norm.kind == "layer":
            y = y - y.mean(-1, keepdim=True)
        out = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.norm.eps) * self.norm.weight
        return out if self.norm.bias is None else out + self.norm.bias

    def full(self, y: Tensor) -> Tensor:
        """Logits of a final-state estimate. (..., d) -> (..., V)."""
        return soft_cap(self.normalize(y) @ self.unembedding.T, self.softcap)

    def low_rank(self, lora_B: Tensor, bias: Tensor) -> LowRankHead:
        """The fused head for y = B·z + b. lora_B (n, d, r), bias (n, d)."""
        if self.norm.kind == "layer":
            lora_B = lora_B - lora_B.mean(1, keepdim=True)
            bias = bias - bias.mean(-1, keepdim=True)
        gamma = self.norm.weight
        M = torch.einsum("vd,ndr->nvr", self.unembedding, gamma[:, None] * lora_B)  # (n, V, r)
        m0 = (gamma * bias) @ self.unembedding.T  # (n, V)
        shift = torch.zeros_like(m0) if self.norm.bias is None else (self.unembedding @ self.norm.bias).expand_as(m0)
        G = lora_B.transpose(1, 2) @ lora_B  # (n, r, r)
        g = torch.einsum("ndr,nd->nr", lora_B, bias)  # (n, r)
        g0 = bias.square().sum(-1)  # (n,)
        M_aug = torch.cat([M, m0.unsqueeze(-1), shift.unsqueeze(-1)], dim=-1)  # (n, V, r+2), built once
        return LowRankHead(M_aug, G, g, g0, self.hidden_size, self.norm.eps, self.softcap)


@dataclass(frozen=True)
class LowRankHead:
    """Precomputed terms of the fused head for ``n`` pure jumps (see the module docstring)."""

    M_aug: Tensor  # (n, V, r+2): [M, m0, W_U·β]
    G: Tensor  # (n, r, r)
    g: Tensor  # (n, r)
    g0: Tensor  # (n,)
    hidden_size: int
    eps: float
    softcap: float | None

    def inv_scale(self, z: Tensor) -> Tensor:
        """1 / sqrt(s² + eps) for z (n, B, r) -> (n, B, 1)."""
        quad = ((z @ self.G + 2 * self.g.unsqueeze(1)) * z).sum(-1)  # zᵀGz + 2gᵀz, (n, B)
        s2 = (quad + self.g0[:, None]) / self.hidden_size
        return torch.rsqrt(s2.clamp_min(0) + self.eps).unsqueeze(-1)

    def augmented(self, z: Tensor) -> Tensor:
        """z_aug = [z·inv, inv, 1], so logits (before soft-capping) = z_aug @ M_aug^T. (n, B, r+2)"""
        inv = self.inv_scale(z)
        return torch.cat([z * inv, inv, torch.ones_like(inv)], dim=-1)

    def __call__(self, z: Tensor) -> Tensor:
        """Logits from z = A·BN(h). (n, B, r) -> (n, B, V)."""
        return soft_cap(self.augmented(z) @ self.M_aug.transpose(1, 2), self.softcap)


def jump_logits(jumps: LowRankJumps, x: Tensor, ctx: HeadContext, fused: LowRankHead | None = None,
                sl: slice = ALL) -> Tensor:
    """Logits of head(jump(x)) for x (n, B, d): fused for pure jumps, a full head otherwise.

    ``sl`` picks a slice of the bank's jumps. A bank of one jump applied to several levels
    (x of shape (L, B, d)) is run as one batch, unless it carries per-level statistics for those
    L levels (``LowRankJumps.with_level_norm``): then level i is normalised with its own."""
    per_level = jumps.level_norm is not None and x.shape[0] == jumps.level_norm[0].shape[0]
    if jumps.n == 1 and x.shape[0] > 1 and not per_level:
        return jump_logits(jumps, x.reshape(1, -1, x.shape[-1]), ctx, fused).reshape(*x.shape[:2], -1)
    if jumps.is_pure:
        fused = fused or ctx.low_rank(jumps.lora_B[sl], jumps.bias[sl])
        return fused(jumps.project(x, sl))
    return ctx.full(jumps(x, sl))
