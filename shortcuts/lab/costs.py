"""Per-token costs measured on the machine at hand, in decoder blocks: what calibration ranks by.

A block (one token, 64 cached positions), a block on 4 tokens at once (what catch-up runs the
skipped layers in), the full LM head, and an exit check per gate kind (the fused exit head plus
the gate: max probability, entropy, or the learned gate's features and score). Medians of
``repeats`` runs, so one busy moment on a shared machine does not set the figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from shortcuts.engine.exit_head import ExitHead, entropy, max_probability
from shortcuts.engine.learned_gate import LearnedGate, gate_features
from shortcuts.jump import JumpConfig, LowRankJumps
from shortcuts.lab.agreement import CostModel
from shortcuts.lab.bench import _median_seconds

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.engine.runner import Chunk


@torch.inference_mode()
def measure(lm: CausalLM, jump: LowRankJumps | None, gate: LearnedGate | None = None,
            repeats: int = 30) -> dict[str, float]:
    """Milliseconds per token: block, block x4 (4 tokens at once), full head, exit head and checks."""
    from shortcuts.engine.runner import LayerRunner

    runner = LayerRunner(lm, 128)
    cache = runner.new_cache()
    ids = torch.randint(lm.vocab_size // 4, lm.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
    runner.forward(ids[:, :64], cache)
    token, chunk4 = runner.embed(ids[:, 64:], 64), runner.embed(ids[:, 61:65], 64)
    h, h4 = token.h, chunk4.h

    def block(chunk: Chunk, state: Tensor) -> None:
        cache.crop_row(0, 64)
        runner.block(0, state, chunk.call(), cache)

    head = ExitHead(lm, jump)
    state, level = h[0].float(), lm.num_layers // 2
    prev, conf = torch.zeros(1, dtype=torch.long), torch.ones(1)
    out = {"block": _median_seconds(lambda: block(token, h), repeats),
           "block x4": _median_seconds(lambda: block(chunk4, h4), repeats),
           "full head": _median_seconds(lambda: runner.full_logits(state), repeats),  # the engine's head
           "exit head": _median_seconds(lambda: head(state, level), repeats),
           "check confidence": _median_seconds(lambda: max_probability(head(state, level)[0]), repeats),
           "check entropy": _median_seconds(lambda: float(entropy(head(state, level)[0])), repeats)}
    if gate is not None:
        def learned() -> None:
            f, _, _ = gate_features(head(state, level), level, lm.num_layers, state, state, prev, conf)
            gate.score(f)

        out["check learned"] = _median_seconds(learned, repeats)
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
