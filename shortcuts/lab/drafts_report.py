"""The plot and table of docs/drafts.md from ``onejump bench --json`` outputs.

    python -m shortcuts.lab.drafts_report docs/drafts/bench-*.json --out docs/drafts/speedups.png

Each JSON is one bench run (one model, one prompt file); the file name says which
(``bench-<model>-<workload>.json``). Prints a Markdown table (tok/s and speed-up of every arm, exact
mode's acceptance by source and tokens per full-depth pass) and draws speed-ups against full depth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ARMS = ("hf_generate", "hf_prompt_lookup", "off", "approximate", "exact")


def table(runs: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | " + " | ".join(f"{a} tok/s (x off)" for a in ARMS) + " | exact same as off | exact vs "
             "hf_prompt_lookup | exact drafted / accepted | tokens per pass |",
             "|---" * (len(ARMS) + 5) + "|"]
    for name, r in runs.items():
        cells = [f"{r['tok_s'][a]:.2f} ({r['speedup'][a]:.2f}x)" if a in r["tok_s"] else "-" for a in ARMS]
        d = r.get("exact_drafts") or {}
        drafts = ", ".join(f"{k} {v} / {d['accepted'].get(k, 0)}" for k, v in d.get("drafted", {}).items()) or "none"
        vs_hf = r["tok_s"]["exact"] / r["tok_s"]["hf_prompt_lookup"] if "hf_prompt_lookup" in r["tok_s"] else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['same_as_off']['exact']:.3f} | "
                     f"{'-' if vs_hf is None else f'{vs_hf:.2f}x'} | {drafts} | {d.get('tokens_per_verification')} |")
    return "\n".join(lines)


def plot(runs: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(ARMS)
    names = list(runs)
    for k, arm in enumerate(ARMS):
        xs = [i + (k - (len(ARMS) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [runs[n]["speedup"].get(arm, 0.0) for n in names], width, label=arm)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("tokens/s vs full depth (off)")
    ax.set_title("exact mode's drafts (64 new tokens, one thread, arms interleaved)")
    ax.legend(ncol=len(ARMS), fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.drafts_report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="the plot (.png)")
    a = p.parse_args(argv)
    runs = {Path(f).stem.removeprefix("bench-"): json.loads(Path(f).read_text()) for f in a.runs}
    print(table(runs))
    if a.out:
        plot(runs, Path(a.out))


if __name__ == "__main__":
    main()
