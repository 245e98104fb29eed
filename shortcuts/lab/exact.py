"""Both modes' calibrations on the validation articles, reported on the test articles (a study).

    python -m shortcuts.lab.exact --jump docs/results/smollm2-135m/jump.safetensors --out runs/exact --write

Approximate mode's setting: ``calibration.search.calibrate`` (confidence gate); exact mode's:
``calibration.exact.search_exact`` ranked by prediction, the best candidates timed with the engine
(``timed_choice``). With ``--write`` both are stored in a copy of the artifact.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.calibration.agreement import resolve_model
from shortcuts.calibration.calibrate import precision_engine, store, store_exact
from shortcuts.calibration.costs import cost_models, measure, predicted_speedup
from shortcuts.calibration.exact import NEVER, replay_exact, search_exact, timed_choice
from shortcuts.calibration.replay import bootstrap_lower_bound, replay
from shortcuts.calibration.search import SearchSpace, calibrate
from shortcuts.calibration.table import continued_table
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.settings import QUANTIZATIONS
from shortcuts.lab.traces import parse_study, split_args, val_test_prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.exact", description=__doc__.split("\n\n")[0])
    p.add_argument("--jump", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--out", required=True, help="folder for exact.json (and the artifact with --write)")
    split_args(p, val=96)
    p.add_argument("--timed", type=int, default=12, help="validation prompts the exact candidates are timed on")
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--write", action="store_true", help="store both calibrations in a copy of the artifact")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="the engine's weight format both modes are calibrated (and stored) for")
    a, out = parse_study(p, argv)
    art = JumpArtifact.load(a.jump)
    lm = CausalLM.load(resolve_model(a.model, art))
    art.check_model(lm)
    engine = precision_engine(lm, art, a.quantization)
    head = engine.exit_head if engine is not None else ExitHead(lm, art.jump.to(lm.device))
    prompts = val_test_prompts(lm, a.val, a.test)
    tables = {k: continued_table(lm, head, v, a.new_tokens, with_entropy=False, engine=engine)
              for k, v in prompts.items()}
    ms = measure(lm, art.jump, None, repeats=20, quantization=a.quantization)
    models, skip = cost_models(ms)
    cost, L = models["confidence"], lm.num_layers
    space = SearchSpace(gates=("confidence",))
    found = calibrate(tables["val"], ms, None, space)
    s = found.best.exit_settings()
    level, picked = replay(tables["test"], s)
    agree = picked == tables["test"].final_top
    ranked = search_exact(tables["val"], cost, skip, min_layers=space.first_levels(L), strides=space.strides,
                          keep=a.candidates)
    exact, timed = timed_choice(lm, art.jump, prompts["val"][: a.timed], [c for c in ranked if c != NEVER],
                                a.new_tokens, quantization=a.quantization)
    exact_test = replay_exact(tables["test"], exact.exit_settings(), cost, skip)
    result = {"jump": a.jump, "quantization": a.quantization, "costs_ms": ms,
              "cost_blocks": {"check": cost.check, "head": cost.head, "skip": skip},
              "approximate": {"calibration": found.best.as_dict(),
                              "test": {"agreement": float(agree.float().mean()),
                                       "agreement_lower": bootstrap_lower_bound(agree, tables["test"].prompt),
                                       "mean_exit_layer": float(level.float().mean()),
                                       "predicted_speedup": predicted_speedup(cost, level, s, L, skip)}},
              "exact": {"calibration": exact.as_dict(), "test": exact_test,
                        "candidates": [c.as_dict() for c in ranked], "timed_speedup_vs_never": timed}}
    (out / "exact.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("cost_blocks", "approximate", "exact")}, indent=1))
    if a.write:
        provenance = {"corpus": "validation articles of wiki/train.jsonl", "new_tokens": a.new_tokens}
        store(art, found, None, ms, provenance, precision=a.quantization)
        store_exact(art, exact, {**provenance, "timed_speedup_vs_never": timed}, precision=a.quantization)
        if a.quantization == "none":
            art.extra["exits_test"] = {"confidence": result["approximate"]["test"], "exact": result["exact"]["test"]}
        art.save(out / Path(a.jump).name)


if __name__ == "__main__":
    main()
