"""What a decode step costs, in decoder blocks: the model calibration ranks settings by.

``CostModel``: a gate check costs ``check`` blocks (``lens`` at the levels whose exit head is the logit
lens: a full head and the gate), the full LM head ``head`` blocks (paid only by
tokens that go full depth), a skipped layer ``skip`` blocks (catch-up runs it later in a chunk with the
next deep token). ``measure`` times them on the machine at hand: a block (one token, 64 cached
positions, timed over a pass through every block as decoding reads them), a block on 4 tokens at once
(what catch-up runs the skipped layers in), the full LM head, and an exit check per gate kind (timed
right after a pass, with cold caches as in decoding: the fused exit head plus the gate's max
probability, entropy, or the learned gate's features and score; ``check lens``: the logit lens and the max
probability). Medians of ``repeats`` runs, so one
busy moment on a shared machine does not set the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.calibration.config import CALIBRATED_GATES
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
    lens: float = 0.0  # a check at a logit-lens level (``lens_levels``): a full head and the gate
    lens_levels: frozenset[int] = frozenset()

    def with_lens(self, levels: Iterable[int]) -> CostModel:
        """This model with the checks at ``levels`` costing ``lens`` blocks."""
        return replace(self, lens_levels=frozenset(levels))

    def check_blocks(self, level: Tensor, s: ExitSettings, num_layers: int) -> Tensor:
        """(N,) what each token's gate checks cost in blocks under ``s``: its checked levels up to its exit
        level, each ``check`` blocks (``lens`` at a lens level)."""
        levels = s.check_levels(num_layers)
        if not levels:
            return torch.zeros(level.shape[0])
        per = torch.tensor([self.lens if lv in self.lens_levels else self.check for lv in levels])
        paid = (torch.tensor(levels)[None, :] <= level[:, None]).float()
        return paid @ per

    @classmethod
    def from_model(cls, lm: CausalLM, rank: int | None) -> CostModel:
        """From multiply-adds per token: a block's parameters, V·d for the head, d·r + V·(r+1) for
        the fused check (V·d when the check needs a full head: identity or residual jumps)."""
        block = sum(p.numel() for p in lm.layers[0].parameters())
        V, d = lm.vocab_size, lm.hidden_size
        check = V * d if rank is None else d * rank + V * (rank + 1)
        return cls(check=check / block, head=V * d / block, lens=V * d / block)

    def speedup(self, level: Tensor, checks: Tensor, num_layers: int) -> float:
        """(L + head) over the mean cost of the replayed tokens (``checks``: how many each paid)."""
        return self.speedup_paid(level.float(), self.check * checks.float(), level == num_layers, num_layers)

    def speedup_paid(self, blocks: Tensor, check_blocks: Tensor, full: Tensor, num_layers: int) -> float:
        """(L + head) over the mean of blocks run + checks paid (blocks) + the head for ``full`` tokens."""
        cost = blocks + check_blocks + self.head * full.float()
        return (num_layers + self.head) / float(cost.mean())


def predicted_speedup(cost: CostModel, level: Tensor, s: ExitSettings, num_layers: int, skip: float = 0.0) -> float:
    """Speed-up over full depth under ``cost`` of tokens that left at ``level`` under ``s``; each skipped
    layer still costs ``skip`` blocks (catch-up runs it later in a chunk with the next deep token)."""
    blocks = level.float() + skip * (num_layers - level).float()
    return cost.speedup_paid(blocks, cost.check_blocks(level, s, num_layers), level == num_layers, num_layers)


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
    head, lens = ExitHead(lm, jump, runner, lens_levels=()), ExitHead(lm, None, runner)
    state, level = one.h[0].float(), lm.num_layers // 2
    prev, conf = torch.zeros(1, dtype=torch.long), torch.ones(1)
    after: dict[str, Callable[[], object]] = {
        "full head": lambda: runner.full_logits(state),  # the engine's head
        "exit head": lambda: head(state, level),
        "check confidence": lambda: to_host(*confidence_and_top(head(state, level))),  # as the engine reads it
        "check entropy": lambda: float(entropy(head(state, level)[0])),
        "check lens": lambda: to_host(*confidence_and_top(lens(state, level)))}
    if gate is not None:
        def learned() -> None:
            f, _, _ = gate_features(head(state, level), level, lm.num_layers, state, state, prev, conf)
            gate.score(f)

        after["check learned"] = learned
    out = interleaved({"block": one, "block x4": four}, after, one, max(3, repeats // 3))
    return {k: 1000 * v for k, v in out.items()}


def cost_models(ms: dict[str, float], lens_levels: Iterable[int] = ()) -> tuple[dict[str, CostModel], float]:
    """A cost model per gate kind, in blocks (checks at ``lens_levels`` cost the lens check plus what the
    gate adds to the confidence check), and what a skipped layer still costs with catch-up: the
    marginal block cost of one more token in a chunk, (block x4 - block) / 3, in blocks. Patience's check
    (the exit head's top-1) costs what confidence's does."""
    b = ms["block"]
    timed: dict[str, float] = {g: ms[f"check {g}"] for g in CALIBRATED_GATES if f"check {g}" in ms}
    if "confidence" in timed:
        timed["patience"] = timed["confidence"]
    lens = ms.get("check lens", ms["full head"])
    models = {g: CostModel(check=t / b, head=ms["full head"] / b,
                           lens=(lens + max(0.0, t - timed.get("confidence", t))) / b,
                           lens_levels=frozenset(lens_levels))
              for g, t in timed.items()}
    return models, max(0.0, (ms["block x4"] - b) / 3 / b)
