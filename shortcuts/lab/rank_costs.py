"""Check cost against rank, measured: ``python -m shortcuts.lab.rank_costs --ranks 8 16 32 64``.

Times one decoder block and, for random pure jumps of each rank, the fused exit head and a full
confidence check (head + max probability), medians of ``--repeats`` runs, one thread."""

from __future__ import annotations

import argparse
import json

import torch

from shortcuts.adapter import CausalLM
from shortcuts.assets import default_model_dir
from shortcuts.lab.costs import rank_costs


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
