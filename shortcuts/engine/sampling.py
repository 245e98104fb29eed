"""Picking tokens: greedy, temperature + top-p sampling, and the speculative accept/reject rule."""

from __future__ import annotations

import torch
from torch import Tensor


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on the model's device (draws happen where the logits are: nothing of
    vocabulary size crosses to the host), seeded, or from OS entropy when seed is None. A seed
    reproduces its tokens on the same kind of device."""
    gen = torch.Generator(device=torch.device(device))
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def distribution(logits: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """The sampling distribution: softmax(logits / T) cut to the smallest set with mass >= top_p
    (the most likely token is always kept) and renormalised. (V,) -> (V,) float32.
    temperature 0 (or one too small for float32, < 1e-30) gives the one-hot of the argmax."""
    logits = logits.float()
    if temperature < 1e-30:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, dim=-1)  # no inf - inf
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # mass before a token already reaches top_p
    outside[..., 0] = False  # the most likely token stays, even for a top_p that rounds to 0
    sorted_p = sorted_p.masked_fill(outside, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p / sorted_p.sum())


def sample(probs: Tensor, generator: torch.Generator) -> int:
    """One token id drawn from probs (V,) with the generator (on the probabilities' device)."""
    return int(torch.multinomial(probs.float(), 1, generator=generator))


def pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """Greedy (temperature 0) or sampled token from logits (V,)."""
    if temperature < 1e-30:
        return int(logits.argmax())
    return sample(distribution(logits, temperature, top_p), generator)


def speculative_accept(p: Tensor, q: Tensor, token: int, generator: torch.Generator) -> int | None:
    """Leviathan et al.'s rule for a token drawn from the draft distribution q (V,) when the target
    is p (V,): keep it with probability min(1, p/q); return None if kept, else a replacement
    drawn from normalise(max(p - q, 0)). The result is distributed exactly as p."""
    p, q = p.float(), q.float()
    ratio = float(p[token]) / max(float(q[token]), 1e-30)
    if ratio >= 1.0 or float(torch.rand((), generator=generator, device=p.device)) < ratio:
        return None
    residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    return sample(residual / total if total > 0 else p, generator)
