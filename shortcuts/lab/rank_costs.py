"""Check cost against rank, measured: ``python -m shortcuts.lab.rank_costs --ranks 8 16 32 64``.

Times one decoder block and, for random pure jumps of each rank, the fused exit head and a full
confidence check (head + max probability), medians of ``--repeats`` runs, one thread."""

from __future__ import annotations

import argparse
import json

import torch

from shortcuts.adapter import CausalLM
from shortcuts.assets import default_model_dir
from shortcuts.calibration.costs import measure
from shortcuts.engine.exit_head import ExitHead, confidence_and_top, to_host
from shortcuts.jump import JumpConfig, LowRankJumps
from shortcuts.timing import median_seconds


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
        t_head = 1000 * median_seconds(lambda head=head: head(state, level), repeats)  # type: ignore[misc]
        t_check = 1000 * median_seconds(lambda head=head: to_host(*confidence_and_top(head(state, level))), repeats)  # type: ignore[misc]
        out[r] = {"head_ms": t_head, "check_ms": t_check, "head_blocks": t_head / ms_block,
                  "check_blocks": t_check / ms_block}
    return out


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
