"""Per exit level, how the jump's precision@1 changes with the engine's weight format (issue 20).

    python -m shortcuts.lab.quant_levels --model .cache/onejump/models/smollm2-135m-instruct \\
        --jump docs/results/smollm2-135m/jump.safetensors --prompts docs/exits/heldout20-seed2027.jsonl \\
        --quantization none,int8,int4 --out docs/quantization/levels-smollm2.json

The dense (float32) model continues the prompts greedily; every format is then teacher-forced on those
same tokens through the engine (``calibration.table.engine_table``: its blocks' states, its exit head and
full head in that format). Per level l: precision@1 of the exit head against the format's own full head
(what its exits are calibrated on) and against the float32 full head (what the user compares with); and
the format's full head against float32's (the teacher-forced per-token agreement of full depth).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.table import LevelTable, continuations, engine_table
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.prompts import read_prompts


def level_precision(table: LevelTable, reference: torch.Tensor) -> list[float]:
    """Per level 1..L-1: the share of steps whose exit top-1 is ``reference``'s."""
    return [float((table.top[:, j] == reference).float().mean()) for j in range(table.top.shape[1])]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.quant_levels", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--jump", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-prompts", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--quantization", default="none,int8,int4")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    lm = CausalLM.load(a.model)
    art = JumpArtifact.load(a.jump)
    art.check_model(lm)
    prompts = read_prompts(lm, a.prompts, a.max_prompts, max_tokens=256)
    conts = continuations(lm, prompts, a.new_tokens)
    tables: dict[str, LevelTable] = {}
    for q in a.quantization.split(","):
        engine = EarlyExitDecoder(lm, art.jump.to(lm.device), quantization=q)  # type: ignore[arg-type]
        tables[q] = engine_table(engine, prompts, conts, with_entropy=False)
    fp32 = tables["none"].final_top
    out: dict[str, Any] = {"model": a.model, "jump": a.jump, "prompts": len(prompts), "tokens": len(fp32),
                           "num_layers": lm.num_layers, "formats": {}}
    for q, t in tables.items():
        out["formats"][q] = {"full_head_top1_vs_fp32": float((t.final_top == fp32).float().mean()),
                             "precision_vs_own_full": level_precision(t, t.final_top),
                             "precision_vs_fp32_full": level_precision(t, fp32)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(markdown(out))


def markdown(r: dict[str, Any]) -> str:
    """A table: one row per level (every third, and the last three), one column pair per format."""
    L = r["num_layers"]
    levels = sorted({*range(1, L, 3), *range(max(1, L - 3), L)})
    formats = list(r["formats"])
    head = "| level | " + " | ".join(f"{q}: vs own / vs fp32" for q in formats) + " |"
    lines = [head, "|" + "---|" * (len(formats) + 1)]
    for lv in levels:
        cells = [f"{f['precision_vs_own_full'][lv - 1]:.3f} / {f['precision_vs_fp32_full'][lv - 1]:.3f}"
                 for f in r["formats"].values()]
        lines.append(f"| {lv} | " + " | ".join(cells) + " |")
    lines.append("| full head vs fp32 | " + " | ".join(f"{f['full_head_top1_vs_fp32']:.3f}"
                                                    for f in r["formats"].values()) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
