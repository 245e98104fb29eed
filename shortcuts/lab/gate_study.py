"""Which training rows make a learned gate pay: all levels, or only the levels a calibrated gate checks.

    python -m shortcuts.lab.gate_study --traces runs/exits/smollm2 --jump docs/results/smollm2-135m/jump.safetensors

Costs are the artifact's stored ones (``extra["costs_ms"]``), so the gates compare under one cost model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.costs import cost_models
from shortcuts.calibration.replay import gate_training_rows
from shortcuts.calibration.search import search
from shortcuts.calibration.traces import Traces
from shortcuts.engine.learned_gate import LearnedGate
from shortcuts.heads import HeadContext
from shortcuts.lab.exits_ship import report
from shortcuts.lab.exits_study import table_for


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.gate_study")
    p.add_argument("--traces", required=True)
    p.add_argument("--jump", required=True)
    p.add_argument("--gate-prompts", type=int, default=150)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    art = JumpArtifact.load(a.jump)
    meta = json.loads((Path(a.traces) / "traces.json").read_text())
    lm = CausalLM.load(meta["model"])
    ctx = HeadContext.from_model(lm)
    tr = {k: Traces.load(Path(a.traces) / f"traces-{k}.safetensors") for k in ("fit", "val", "test")}
    keep = tr["fit"].prompt < a.gate_prompts
    tr["fit"] = Traces(tr["fit"].states[keep], tr["fit"].prompt[keep], tr["fit"].step[keep])
    tables = {k: table_for(lm, ctx, art.jump, tr[k]) for k in tr}
    ms = art.extra["costs_ms"]
    models, skip = cost_models(ms)
    L = lm.num_layers
    x, y = gate_training_rows(tables["fit"])
    level = torch.arange(1, L).repeat(len(tables["fit"]))
    gates = {"all levels": LearnedGate.fit(x, y, L)}
    for m in (10, 15, 20):
        rows = level >= m
        gates[f"levels >= {m}"] = LearnedGate.fit(x[rows], y[rows], L)
    out: dict[str, Any] = {"confidence": None}
    for name, gate in {"confidence": None, **gates}.items():
        kind = "confidence" if gate is None else "learned"
        best = search(tables["val"], 0.95, {kind: models[kind]}, gate, (1, 5, 10, 15, 20, 25), (1, 2, 3, 4), skip)[kind]
        out[name] = {"val": best.as_dict(), "test": report(tables["test"], best, gate, ms)}
        print(name, json.dumps(out[name]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
