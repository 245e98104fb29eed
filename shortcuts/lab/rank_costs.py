"""Check cost against rank, measured as decoding sees it: ``python -m shortcuts.lab.rank_costs --ranks 8 16 32 64``.

A block is timed over whole passes through every block (one token, 64 cached positions), and right after a
pass (cold caches, as in decoding) the full head, the logit-lens check (the model's own head on h_l and the
max probability) and, for a random pure jump of each rank, the fused exit head and its confidence check; all
interleaved repeat by repeat (``calibration.costs.interleaved``), medians, one thread."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

from shortcuts.adapter import CausalLM
from shortcuts.assets import default_model_dir
from shortcuts.calibration.costs import BlockPass, interleaved
from shortcuts.engine.exit_head import ExitHead, confidence_and_top, to_host
from shortcuts.engine.runner import LayerRunner
from shortcuts.jump import JumpConfig, LowRankJumps


@torch.inference_mode()
def rank_costs(lm: CausalLM, ranks: tuple[int, ...], repeats: int = 30) -> dict[str, dict[str, float]]:
    """ms and blocks of the full head, the lens check, and each rank's fused exit head and check."""
    runner = LayerRunner(lm, 128)
    one = BlockPass(runner, 1)
    state, level = one.h[0].float(), lm.num_layers // 2
    lens = ExitHead(lm, None)
    after: dict[str, Callable[[], object]] = {"full head": lambda: runner.full_logits(state),
                                              "lens check": lambda: to_host(*confidence_and_top(lens(state, level)))}
    for r in ranks:
        torch.manual_seed(r)
        jump = LowRankJumps(JumpConfig(lm.hidden_size, r), n=1).eval()
        with torch.no_grad():
            jump.lora_B.normal_()
        head = ExitHead(lm, jump)
        after[f"r={r} head"] = lambda head=head: head(state, level)  # type: ignore[misc]
        after[f"r={r} check"] = lambda head=head: to_host(*confidence_and_top(head(state, level)))  # type: ignore[misc]
    t = interleaved({"block": one}, after, one, repeats)
    return {k: {"ms": round(1000 * v, 4), "blocks": round(v / t["block"], 4)} for k, v in t.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.rank_costs", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(json.dumps(rank_costs(CausalLM.load(a.model), tuple(a.ranks), a.repeats), indent=1))


if __name__ == "__main__":
    main()
