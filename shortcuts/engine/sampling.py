"""Picking tokens: logits processors (penalties, bias), greedy, temperature + top-k/top-p/min-p
sampling, the speculative accept/reject rule, and log-probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from shortcuts.engine.settings import GenerationSettings

TopLogprobs = tuple[tuple[int, float], ...]


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


class Processors:
    """vLLM's logits processors for one sequence, prepared once per request: the prompt's tokens as a
    mask and the bias as a dense row, per device and vocabulary size. A head's logits then cost a few
    whole-row tensor ops, whatever the number of biased tokens or the prompt's length."""

    def __init__(self, s: GenerationSettings, prompt: Sequence[int]):
        self.s = s
        self.prompt = sorted(set(prompt)) if s.repetition_penalty != 1.0 else []
        self._rows: dict[tuple[torch.device, int], tuple[Tensor | None, Tensor | None]] = {}

    def _prepared(self, device: torch.device, vocab: int) -> tuple[Tensor | None, Tensor | None]:
        """(prompt mask (V,) bool or None, bias (V,) float32 or None) on ``device``."""
        key = (device, vocab)
        if key not in self._rows:
            mask = bias = None
            if self.prompt:
                mask = torch.zeros(vocab, dtype=torch.bool)
                mask[torch.tensor([t for t in self.prompt if t < vocab], dtype=torch.long)] = True
                mask = mask.to(device)
            pairs = [(t, b) for t, b in self.s.logit_bias if t < vocab]
            if pairs:
                bias = torch.zeros(vocab, dtype=torch.float32)
                bias[torch.tensor([t for t, _ in pairs])] = torch.tensor([b for _, b in pairs], dtype=torch.float32)
                bias = bias.to(device)
            self._rows[key] = (mask, bias)
        return self._rows[key]

    def __call__(self, logits: Tensor, output: Sequence[int]) -> Tensor:
        """The processed row (V,) float32: the repetition penalty on every token of the prompt and
        the output, the frequency and presence penalties on the output's tokens, then the bias.
        The input is not changed."""
        s, given = self.s, logits
        logits = logits.float()
        dev, vocab = logits.device, logits.shape[-1]
        prompt_mask, bias = self._prepared(dev, vocab)
        out = torch.tensor(list(output), dtype=torch.long, device=dev) if output else None
        if s.repetition_penalty != 1.0 and (prompt_mask is not None or out is not None):
            seen = prompt_mask.clone() if prompt_mask is not None else torch.zeros(vocab, dtype=torch.bool, device=dev)
            if out is not None:
                seen[out] = True
            scaled = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(seen, scaled, logits)
        if out is not None and (s.frequency_penalty or s.presence_penalty):
            counts = torch.bincount(out, minlength=vocab)[:vocab].float()
            logits = logits - (s.frequency_penalty * counts + s.presence_penalty * (counts > 0).float())
        if bias is not None:
            logits = logits + bias
        return logits.clone() if logits is given else logits


def penalize(logits: Tensor, s: GenerationSettings, prompt: Sequence[int], output: Sequence[int]) -> Tensor:
    """``Processors(s, prompt)`` applied once to a row (V,); returns a new float32 row."""
    return Processors(s, prompt)(logits, output)


def distribution(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                 min_p: float = 0.0) -> Tensor:
    """The sampling distribution: softmax(logits / T), cut to the ``top_k`` most likely tokens (0:
    all), to those with at least ``min_p`` times the top probability, and to the smallest set with
    mass >= top_p (the most likely token is always kept), renormalised. (V,) -> (V,) float32.
    temperature 0 (or one too small for float32, < 1e-30) gives the one-hot of the argmax."""
    logits = logits.float()
    if temperature < 1e-30:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    probs = torch.softmax((logits - logits.max(-1, keepdim=True).values) / temperature, dim=-1)  # no inf - inf
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if min_p > 0.0:
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0.0)
    if top_k or min_p > 0.0:
        probs = probs / probs.sum(-1, keepdim=True)
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


def pick(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator, top_k: int = 0,
         min_p: float = 0.0) -> int:
    """Greedy (temperature 0) or sampled token from logits (V,)."""
    if temperature < 1e-30:
        return int(logits.argmax())
    return sample(distribution(logits, temperature, top_p, top_k, min_p), generator)


def logprobs(logits: Tensor, token: int, n: int) -> tuple[float, TopLogprobs]:
    """log softmax(logits) (V,) at ``token``, and the ``n`` most likely (token, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = lp.topk(min(n, lp.shape[-1])) if n else None
    chosen = float(lp[token])
    if top is None:
        return chosen, ()
    return chosen, tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))


def speculative_accept(p: Tensor, q: Tensor, token: int, generator: torch.Generator) -> int | None:
    """Leviathan et al.'s rule for a token drawn from the draft distribution q (V,) when the target
    is p (V,): keep it with probability min(1, p/q); return None if kept, else a replacement
    drawn from normalise(max(p - q, 0)). The result is distributed exactly as p."""
    p, q = p.float(), q.float().to(p.device)  # a draft's distribution may come from an earlier device
    ratio = float(p[token]) / max(float(q[token]), 1e-30)
    if ratio >= 1.0 or float(torch.rand((), generator=generator, device=p.device)) < ratio:
        return None
    residual = (p - q).clamp_min(0.0)
    total = float(residual.sum())
    return sample(residual / total if total > 0 else p, generator)
