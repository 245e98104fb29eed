"""The command line: flags, their checks (one-line refusals), and the arms and load points they name."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from loadtest.prompts import DEFAULT_PROMPTS
from loadtest.records import Arm, LoadPoint, LoadtestError
from shortcuts.engine.settings import GATES, MODES  # the request's early_exit literals (torch-free)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage block)."""

    def error(self, message: str) -> NoReturn:
        raise LoadtestError(message)


def _number_list(convert: Callable[[str], float], name: str, allow_zero: bool = False) -> Callable[[str], list]:
    """A flag value like ``1,4,8`` (or one number); every number must be positive (or >= 0)."""

    def parse(text: str) -> list:
        out = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                value = convert(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a {name}: {part!r}") from None
            if value < 0 or (value == 0 and not allow_zero) or value != value:
                raise argparse.ArgumentTypeError(f"must be {'>= 0' if allow_zero else 'positive'}, got {part}")
            out.append(value)
        if not out:
            raise argparse.ArgumentTypeError("needs at least one value")
        return out

    return parse


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    return modes


def _positive(convert: Callable[[str], float], name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        return _number_list(convert, name)(text)[0] if "," not in text else _fail(f"one {name}, got {text!r}")

    return parse


def _fail(message: str) -> NoReturn:
    raise argparse.ArgumentTypeError(message)


def build_parser() -> Parser:
    p = Parser(prog="python -m loadtest", description="Load a running onejump server over HTTP (streaming), "
               "with early-exit arms interleaved request by request; writes JSON, a Markdown report and plots.")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback only by default)")
    p.add_argument("--allow-remote", action="store_true", help="allow a target that is not a loopback address")
    p.add_argument("--api-key", default=os.environ.get("ONEJUMP_API_KEY"), metavar="KEY",
                   help="sent as 'Authorization: Bearer KEY' (default: $ONEJUMP_API_KEY)")
    load = p.add_argument_group("load (each value is one load point; lists are comma- or space-separated)")
    load.add_argument("--concurrency", nargs="+", type=_number_list(int, "whole number"), metavar="N",
                      help="closed loop: N concurrent clients (default 1,4,8 when --rates is not given)")
    load.add_argument("--rates", nargs="+", type=_number_list(float, "number"), metavar="R",
                      help="open loop: Poisson arrivals at R requests/s (seeded by --seed)")
    load.add_argument("--requests", type=_positive(int, "whole number"), default=16, metavar="N",
                      help="requests per arm and load point (default 16)")
    load.add_argument("--duration", type=_positive(float, "number"), default=300.0, metavar="S",
                      help="seconds per load point; whichever of --requests and --duration comes first (300)")
    load.add_argument("--at-deadline", choices=("wait", "cancel"), default="wait",
                      help="requests still in flight when --duration ends: awaited (default) or cancelled")
    arms = p.add_argument_group("arms (interleaved request by request)")
    arms.add_argument("--modes", nargs="+", type=_modes, default=[["off", "approximate"]], metavar="MODE",
                      help="early_exit modes: off, approximate, exact (default off,approximate)")
    arms.add_argument("--thresholds", nargs="+", type=_number_list(float, "number", allow_zero=True),
                      metavar="T", help="one arm per threshold for every mode but off (default: server's)")
    arms.add_argument("--gate", choices=GATES, help="early_exit gate (default: the server's)")
    req = p.add_argument_group("requests")
    req.add_argument("--max-tokens", type=_positive(int, "whole number"), default=32, metavar="N",
                     help="tokens per request (default 32)")
    req.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                     help="let requests stop at EOS (by default every request makes --max-tokens tokens)")
    req.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, metavar="PATH",
                     help=f"JSONL with a \"text\" field, or one prompt a line (default {DEFAULT_PROMPTS})")
    req.add_argument("--seed", type=int, default=0, help="prompt order and open-loop arrivals")
    req.add_argument("--timeout", type=_positive(float, "number"), default=300.0, metavar="S",
                     help="seconds without a byte from the server before a request counts as timed out")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, default=Path("runs/loadtest"), metavar="DIR",
                     help="summary.json, requests.json, report.md and PNGs go here (default runs/loadtest)")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _flat(lists: Sequence[list] | None) -> list:
    return [x for chunk in lists or [] for x in chunk]


def arms_of(args: argparse.Namespace) -> tuple[Arm, ...]:
    modes = list(dict.fromkeys(_flat(args.modes)))
    thresholds: list[float | None] = list(dict.fromkeys(_flat(args.thresholds))) or [None]
    return tuple(Arm("off") if mode == "off" else Arm(mode, t, args.gate)
                 for mode in modes for t in ([None] if mode == "off" else thresholds))


def load_points_of(args: argparse.Namespace) -> tuple[LoadPoint, ...]:
    concurrency = _flat(args.concurrency) or ([] if args.rates else [1, 4, 8])
    return (*(LoadPoint("closed", c) for c in dict.fromkeys(concurrency)),
            *(LoadPoint("open", r) for r in dict.fromkeys(_flat(args.rates))))


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)
