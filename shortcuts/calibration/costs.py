"""What a decode step costs, in decoder blocks: the model calibration ranks settings by.

``CostModel``: a gate check costs ``check`` blocks, the full LM head ``head`` blocks (paid only by
tokens that go full depth), a skipped layer ``skip`` blocks (catch-up runs it later in a chunk with the
next deep token). ``measure`` times them on the machine at hand: a block (one token, 64 cached
positions, timed over a pass through every block as decoding reads them), a block on 4 tokens at once
(what catch-up runs the skipped layers in), the full LM head, and an exit check per gate kind (timed
right after a pass, with cold caches as in decoding: the fused exit head plus the gate's max
probability, entropy, or the learned gate's features and score). Medians of ``repeats`` runs, so one
busy moment on a shared machine does not set the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.calibration.replay import checks
from shortcuts.engine.cache import RowCall
from shortcuts.engine.exit_head import ExitHead, confidence_and_top, entropy, to_host
from shortcuts.engine.learned_gate import LearnedGate, gate_features
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.settings import ExitSettings, Quantization
from shortcuts.jump import LowRankJumps


@dataclass(frozen=True)
class CostModel:
    """Per-token decode cost in decoder blocks: a check of the exit gate costs ``check`` blocks,
    the full LM head ``head`` blocks (paid only by tokens that go full depth). Layers a token skips
    count as free, which makes the predicted speed-up an upper bound: catch-up runs them later in a
    chunk with the next deep token, where on a CPU 4 tokens cost 1.5-2 blocks (docs/engine.md)."""

    check: float = 0.0
    head: float = 0.0

    @classmethod
    def from_model(cls, lm: CausalLM, rank: int | None) -> CostModel:
        """From multiply-adds per token: a block's parameters, V·d for the head, d·r + V·(r+1) for
        the fused check (V·d when the check needs a full head: identity or residual jumps)."""
        block = sum(p.numel() for p in lm.layers[0].parameters())
        V, d = lm.vocab_size, lm.hidden_size
        check = V * d if rank is None else d * rank + V * (rank + 1)
        return cls(check=check / block, head=V * d / block)

    def speedup(self, level: Tensor, checks: Tensor, num_layers: int) -> float:
        """(L + head) over the mean cost of the replayed tokens."""
        full = (level == num_layers).float()
        cost = level.float() + self.check * checks.float() + self.head * full
        return (num_layers + self.head) / float(cost.mean())


def predicted_speedup(cost: CostModel, level: Tensor, s: ExitSettings, num_layers: int, skip: float = 0.0) -> float:
    """Speed-up over full depth under ``cost`` of tokens that left at ``level`` under ``s``; each skipped
    layer still costs ``skip`` blocks (catch-up runs it later in a chunk with the next deep token)."""
    extra = skip * (num_layers - level).float()
    return cost.speedup(level.float() + extra, checks(level, s, num_layers), num_layers)


class BlockPass:
    """Every block of a runner in turn on one row's q tokens after ``ctx`` cached positions: what one
    decoding step reads. Timing one block alone keeps its weights in the CPU's caches (4-16x faster
    than in decoding, where ~L blocks' weights pass between two reads of the same block); so blocks
    are timed over a whole pass, and the head and checks right after a pass, cold as in decoding."""

    def __init__(self, runner: LayerRunner, q: int, ctx: int = 64):
        self.runner, self.ctx = runner, ctx
        self.cache = runner.new_cache(1, ctx + q + 1)
        dev = runner.lm.device
        seed = torch.Generator().manual_seed(q)
        self.h = torch.randn(1, q, runner.lm.hidden_size, generator=seed).to(dev, runner.dtype)
        self.call = RowCall([0], [ctx], [q], q, dev)

    def __call__(self) -> None:
        for lengths in self.cache.lengths:
            lengths[0] = self.ctx
        for i in range(self.runner.num_layers):
            self.runner.block(i, self.h, self.call, self.cache)


def interleaved(passes: dict[str, BlockPass], after_pass: dict[str, Callable[[], object]], evict: BlockPass,
                repeats: int) -> dict[str, float]:
    """Median seconds per block of each pass and of each ``after_pass`` call right after ``evict``
    (untimed), all interleaved repeat by repeat, so a busy moment on a shared machine moves every
    figure alike; the first repeat warms up."""
    times: dict[str, list[float]] = {k: [] for k in (*passes, *after_pass)}
    for _ in range(repeats + 1):
        for name, p in passes.items():
            t0 = time.perf_counter()
            p()
            times[name].append((time.perf_counter() - t0) / p.runner.num_layers)
        for name, fn in after_pass.items():
            evict()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


@torch.inference_mode()
def measure(lm: CausalLM, jump: LowRankJumps | None, gate: LearnedGate | None = None,
            repeats: int = 30, quantization: Quantization = "none", compile: bool = False) -> dict[str, float]:
    """Milliseconds per token: block, block x4 (per block, 4 tokens of a row at once), full head, exit
    head and checks; blocks over whole passes, the rest right after one (see ``BlockPass``); with the
    matrices in the weight format ``quantization`` (``engine.weights``), the blocks compiled or not."""
    runner = LayerRunner(lm, 128, compile=compile, quantization=quantization)
    if compile:
        runner.warm_up()
    one, four = BlockPass(runner, 1), BlockPass(runner, 4)
    head = ExitHead(lm, jump, runner)
    state, level = one.h[0].float(), lm.num_layers // 2
    prev, conf = torch.zeros(1, dtype=torch.long), torch.ones(1)
    after: dict[str, Callable[[], object]] = {
        "full head": lambda: runner.full_logits(state),  # the engine's head
        "exit head": lambda: head(state, level),
        "check confidence": lambda: to_host(*confidence_and_top(head(state, level))),  # as the engine reads it
        "check entropy": lambda: float(entropy(head(state, level)[0]))}
    if gate is not None:
        def learned() -> None:
            f, _, _ = gate_features(head(state, level), level, lm.num_layers, state, state, prev, conf)
            gate.score(f)

        after["check learned"] = learned
    out = interleaved({"block": one, "block x4": four}, after, one, max(3, repeats // 3))
    return {k: 1000 * v for k, v in out.items()}


def cost_models(ms: dict[str, float]) -> tuple[dict[str, CostModel], float]:
    """A cost model per gate kind, in blocks, and what a skipped layer still costs with catch-up: the
    marginal block cost of one more token in a chunk, (block x4 - block) / 3, in blocks."""
    b = ms["block"]
    models = {g: CostModel(check=ms[f"check {g}"] / b, head=ms["full head"] / b)
              for g in ("confidence", "entropy", "learned") if f"check {g}" in ms}
    return models, max(0.0, (ms["block x4"] - b) / 3 / b)
