"""Per-token costs measured on the machine at hand, in decoder blocks: what calibration ranks by.

A block (one token, 64 cached positions, timed over a pass through every block as decoding reads
them), a block on 4 tokens at once (what catch-up runs the skipped layers in), the full LM head,
and an exit check per gate kind (timed right after a pass, with cold caches as in decoding) (the fused exit head plus
the gate: max probability, entropy, or the learned gate's features and score). Medians of
``repeats`` runs, so one busy moment on a shared machine does not set the figure.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from shortcuts.engine.cache import RowCall
from shortcuts.engine.exit_head import ExitHead, entropy, max_probability
from shortcuts.engine.learned_gate import LearnedGate, gate_features
from shortcuts.jump import JumpConfig, LowRankJumps
from shortcuts.lab.agreement import CostModel
from shortcuts.lab.bench import _median_seconds

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.engine.runner import LayerRunner


class _Pass:
    """Every block of a runner in turn on one row's q tokens after ``ctx`` cached positions: what one
    decoding step reads. Timing one block alone keeps its weights in the CPU's caches (4-16x faster
    than in decoding, where ~L blocks' weights pass between two reads of the same block); so blocks
    are timed over a whole pass, and the head and checks right after a pass, cold as in decoding."""

    def __init__(self, runner: LayerRunner, q: int, ctx: int = 64):
        self.runner, self.ctx = runner, ctx
        self.cache = runner.new_cache(1, ctx + q + 1)
        dev = runner.lm.device
        self.h = torch.randn(1, q, runner.lm.hidden_size, generator=torch.Generator().manual_seed(q)).to(dev)
        self.call = RowCall([0], [ctx], [q], q, dev)

    def __call__(self) -> None:
        for lengths in self.cache.lengths:
            lengths[0] = self.ctx
        for i in range(self.runner.num_layers):
            self.runner.block(i, self.h, self.call, self.cache)


def _interleaved(passes: dict[str, _Pass], after_pass: dict[str, Callable[[], object]], evict: _Pass,
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
            repeats: int = 30) -> dict[str, float]:
    """Milliseconds per token: block, block x4 (per block, 4 tokens of a row at once), full head, exit
    head and checks; blocks over whole passes, the rest right after one (see ``_Pass``)."""
    from shortcuts.engine.runner import LayerRunner

    runner = LayerRunner(lm, 128)
    one, four = _Pass(runner, 1), _Pass(runner, 4)
    head = ExitHead(lm, jump)
    state, level = one.h[0].float(), lm.num_layers // 2
    prev, conf = torch.zeros(1, dtype=torch.long), torch.ones(1)
    after: dict[str, Callable[[], object]] = {
        "full head": lambda: runner.full_logits(state),  # the engine's head
        "exit head": lambda: head(state, level),
        "check confidence": lambda: max_probability(head(state, level)[0]),
        "check entropy": lambda: float(entropy(head(state, level)[0]))}
    if gate is not None:
        def learned() -> None:
            f, _, _ = gate_features(head(state, level), level, lm.num_layers, state, state, prev, conf)
            gate.score(f)

        after["check learned"] = learned
    out = _interleaved({"block": one, "block x4": four}, after, one, max(3, repeats // 3))
    return {k: 1000 * v for k, v in out.items()}


def cost_models(ms: dict[str, float]) -> tuple[dict[str, CostModel], float]:
    """A cost model per gate kind, in blocks, and what a skipped layer still costs with catch-up: the
    marginal block cost of one more token in a chunk, (block x4 - block) / 3, in blocks."""
    b = ms["block"]
    models = {g: CostModel(check=ms[f"check {g}"] / b, head=ms["full head"] / b)
              for g in ("confidence", "entropy", "learned") if f"check {g}" in ms}
    return models, max(0.0, (ms["block x4"] - b) / 3 / b)


@torch.inference_mode()
def rank_costs(lm: CausalLM, ranks: tuple[int, ...], repeats: int = 30) -> dict[int, dict[str, float]]:
    """The fused exit head and check (confidence) at each rank, ms and blocks, with random jumps."""
    ms_block = measure(lm, None, repeats=repeats)["block"]
    state, level, out = torch.randn(1, lm.hidden_size), lm.num_layers // 2, {}
    for r in ranks:
        torch.manual_seed(r)
        jump = LowRankJumps(JumpConfig(lm.hidden_size, r), n=1).eval()
        with torch.no_grad():
            jump.lora_B.normal_()
        head = ExitHead(lm, jump)
        t_head = 1000 * _median_seconds(lambda head=head: head(state, level), repeats)  # type: ignore[misc]
        t_check = 1000 * _median_seconds(lambda head=head: max_probability(head(state, level)[0]), repeats)  # type: ignore[misc]
        out[r] = {"head_ms": t_head, "check_ms": t_check, "head_blocks": t_head / ms_block,
                  "check_blocks": t_check / ms_block}
    return out
