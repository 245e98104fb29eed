"""Markdown tables for docs/exits.md from the study (study.json) and the calibration (ship.json).

    python -m shortcuts.lab.exits_report --study runs/exits/smollm2/study/study.json \\
        --ship runs/exits/smollm2/ship/ship.json --ranks runs/exits/smollm2/ranks.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

LEVELS = (5, 10, 15, 20, 25, 29)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def study_tables(study: dict[str, Any]) -> list[str]:
    m = study["methods"]
    head = " | ".join(f"p@1 l{lv}" for lv in LEVELS)
    lines = [f"| method | parameters | {head} | mean p@1 (decode) | ceiling (perfect gate) | mean p@1 (sentences) "
             "| OOD mean p@1 / ceiling | OOD drop |", "|---" * (len(LEVELS) + 7) + "|"]
    for name, e in m.items():
        t = e["test"]
        cells = " | ".join(f"{t['precision'][lv - 1]:.3f}" for lv in LEVELS if lv - 1 < len(t["precision"]))
        ood, drop = "", ""
        if "ood" in e:
            o = e["ood"]
            ood = f"{o['mean_precision']:.3f} / {o['ceiling_speedup']:.3f}x"
            drop = f"{(o['mean_precision'] - t['mean_precision']) / max(t['mean_precision'], 1e-9):+.1%}"
        lines.append(f"| {name} | {e['parameters']:,} | {cells} | {t['mean_precision']:.3f} | "
                     f"{t['ceiling_mean_exit']:.2f} ({t['ceiling_speedup']:.3f}x) | "
                     f"{e['sentences']['mean_precision']:.3f} | {ood} | {drop} |")
    lines += ["", "| bank | chosen level: paper score | centred score | centred score with level norm |",
              "|---|---|---|---|"]
    for tag, c in study["choices"].items():
        best = {k: max(c[k]) for k in ("paper", "centred", "centred+ln")}
        lines.append(f"| {tag} | {c['chosen paper']} (score {best['paper']:.3f}) | {c['chosen centred']} "
                     f"(score {best['centred']:.3f}) | {c['chosen centred+ln']} (score {best['centred+ln']:.3f}) |")
    score = study["constant_predictor_score"]["paper"]
    lines.append(f"\nA constant predictor (the mean final state of the fit set) scores {score:.3f} per sample on "
                 "the paper's score, 0 on the centred one.")
    return lines


def ship_tables(ship: dict[str, Any]) -> list[str]:
    lines = ["| exit head | gate | chosen on validation: threshold, first level, stride | validation: lower bound / "
             "predicted speed-up | test: agreement (95% LB) | test: mean exit | test: predicted speed-up (skips free) "
             "| test ceiling | OOD: agreement (LB) / predicted speed-up |", "|---" * 9 + "|"]
    for name, e in ship.items():
        for g, c in e["chosen"].items():
            t, o = e["test"][g], e["ood"][g]
            never = c["threshold"] >= 1.0 and c["gate"] == "confidence"
            setting = "none reaches the target: never exits" if never else \
                f"{c['threshold']}, {c['min_layer']}, {c['stride']}"
            lines.append(f"| {name} | {g} | {setting} | {c['lower_bound']:.3f} / {c['predicted_speedup']:.3f}x | "
                         f"{t['agreement']:.3f} ({t['lower']:.3f}) | {t['mean_exit']:.2f} | "
                         f"{t['predicted_speedup']:.3f}x ({t['predicted_speedup_skips_free']:.3f}x) | "
                         f"{e['test']['ceiling_speedup']:.3f}x | {o['agreement']:.3f} ({o['lower']:.3f}) / "
                         f"{o['predicted_speedup']:.3f}x |")
    lines += ["", "| exit head | block ms | full head (blocks) | check: confidence / entropy / learned (blocks) | "
              "skipped layer under catch-up (blocks) |", "|---|---|---|---|---|"]
    for name, e in ship.items():
        ms = e["costs_ms"]
        b = ms["block"]
        checks = " / ".join(f"{ms[f'check {g}'] / b:.3f}" for g in ("confidence", "entropy", "learned")
                            if f"check {g}" in ms)
        lines.append(f"| {name} | {b:.3f} | {ms['full head'] / b:.2f} | {checks} | {e['skip']:.3f} |")
    return lines


def rank_tables(ranks: dict[str, Any]) -> list[str]:
    lines = ["| rank | fused head ms (blocks) | check ms (blocks) |", "|---|---|---|"]
    for r, e in ranks.items():
        lines.append(f"| {r} | {e['head_ms']:.3f} ({e['head_blocks']:.3f}) | {e['check_ms']:.3f} "
                     f"({e['check_blocks']:.3f}) |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.exits_report")
    p.add_argument("--study", nargs="*", default=[])
    p.add_argument("--ship", nargs="*", default=[])
    p.add_argument("--ranks", nargs="*", default=[])
    a = p.parse_args(argv)
    for path in a.study:
        print(f"\n<!-- {path} -->\n" + "\n".join(study_tables(json.loads(Path(path).read_text()))))
    for path in a.ship:
        print(f"\n<!-- {path} -->\n" + "\n".join(ship_tables(json.loads(Path(path).read_text()))))
    for path in a.ranks:
        print(f"\n<!-- {path} -->\n" + "\n".join(rank_tables(json.loads(Path(path).read_text()))))


if __name__ == "__main__":
    main()
