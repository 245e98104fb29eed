"""Tables and plots from a fit's results dictionary (see ``shortcuts.fit``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def headline(results: dict[str, Any]) -> str:
    """One line: mean precision of OJFA vs all-level vs identity, surprisal, parameter reduction."""
    m, v = results["methods"], results["default_variant"]
    p = results["parameters"]

    def ps(name: str) -> str:
        return f"{_mean(m[name]['precision']):.3f} / {_mean(m[name]['surprisal']):.2f}"

    return (f"{Path(results['model']).name}: mean precision / surprisal (nats) over levels "
            f"1..{results['num_layers'] - 1}: OJFA {ps('ojfa:pure-mse')}, all-level {ps('all-level:pure-mse')}, "
            f"identity {ps('identity')}; default variant {v}: OJFA {ps(f'ojfa:{v}')}, "
            f"all-level {ps(f'all-level:{v}')}. Shortcut parameters {p['all-level']:,} (all-level) "
            f"-> {p['ojfa']:,} (OJFA), {p['reduction']}x fewer.")


def summary_markdown(results: dict[str, Any]) -> str:
    methods = results["methods"]
    names = list(methods)
    lines = [f"# Fit of {results['model']}", "", headline(results), "",
             f"Samples: {results['samples']}; rank {results['rank']}; timing (s): {results.get('timing_s')}", "",
             "## Mean over levels", "", "| method | precision@1 | surprisal (nats) |", "|---|---|---|"]
    lines += [f"| {n} | {_mean(methods[n]['precision']):.3f} | {_mean(methods[n]['surprisal']):.3f} |"
              for n in names]
    lines += ["", "## OJFA choice per variant (validation)", "",
              "| variant | chosen level | validation precision of its OJFA jump |", "|---|---|---|"]
    lines += [f"| {v} | {o['chosen_level']} | {results['val_precision_of_ojfa'][v]:.3f} |"
              for v, o in results["ojfa"].items()]
    lines += ["", f"Default variant: **{results['default_variant']}**", "", "## precision@1 per level", "",
              "| level | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, level in enumerate(results["levels"]):
        lines.append(f"| {level} | " + " | ".join(f"{methods[n]['precision'][i]:.3f}" for n in names) + " |")
    lines += ["", "## surprisal per level (nats)", "", "| level | " + " | ".join(names) + " |",
              "|---" * (len(names) + 1) + "|"]
    for i, level in enumerate(results["levels"]):
        lines.append(f"| {level} | " + " | ".join(f"{methods[n]['surprisal'][i]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


_FIGURES = {
    "ojfa_vs_arbitrary.png": ("OJFA vs arbitrary choices vs joint (pure-mse)",
                              ["ojfa:pure-mse", "first:pure-mse", "middle:pure-mse", "last:pure-mse",
                               "joint:pure-mse"]),
    "ojfa_vs_identity_all_level.png": ("OJFA vs identity vs all-level (pure-mse)",
                                       ["ojfa:pure-mse", "all-level:pure-mse", "identity"]),
}


def _variant_figure(results: dict[str, Any]) -> tuple[str, list[str]]:
    names = ["identity"] + [f"{kind}:{v}" for v in results["ojfa"] for kind in ("ojfa", "all-level")]
    return "Variants beyond the paper: OJFA and all-level per variant", names


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_methods(results: dict[str, Any], names: list[str], title: str, path: Path) -> Path:
    """Precision and surprisal per level, one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in names:
        style = "--" if name.startswith(("identity", "all-level")) else "-"
        for ax, metric in zip(axes, ("precision", "surprisal"), strict=True):
            ax.plot(results["levels"], results["methods"][name][metric], style, marker=".", label=name)
    axes[0].set_ylabel("precision@1 vs full model top-1")
    axes[1].set_ylabel("surprisal of full model top-1 (nats)")
    for ax in axes:
        ax.set_xlabel("exit level (block)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(results['model']).name}: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: dict[str, Any], out: Path) -> list[Path]:
    figures = {**_FIGURES, "variants.png": _variant_figure(results)}
    written = [plot_methods(results, names, title, out / filename) for filename, (title, names) in figures.items()]
    written.append(_scores_plot(results, out))
    return written


def _scores_plot(results: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for v, o in results["ojfa"].items():
        ax.plot(results["levels"], o["scores"], marker=".", label=f"{v} (chosen: {o['chosen_level']})")
    ax.set_xlabel("level the jump was trained at")
    ax.set_ylabel("OJFA score  Σ sign(cos)·cos²")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ojfa_scores.png", dpi=110)
    plt.close(fig)
    return out / "ojfa_scores.png"
