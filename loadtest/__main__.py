"""``python -m loadtest``: load a running onejump server over HTTP and report.

    python -m loadtest --url http://127.0.0.1:8000 --concurrency 1,4 --modes off,approximate \
        --thresholds 0.5,0.8 --requests 24 --max-tokens 32 --out-dir runs/loadtest

Closed loop (``--concurrency``) and/or open loop (``--rates``, Poisson); the early-exit arms are
interleaved request by request. Writes summary.json, requests.json, report.md and PNGs to --out-dir.
Bad input or an unusable target: one line on stderr and exit code 2. See docs/loadtest.md."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from loadtest.cli import arms_of, load_points_of, parse
from loadtest.client import ServerInfo, check_target, preflight
from loadtest.prompts import load_prompts
from loadtest.records import Arm, LoadPoint, LoadtestError
from loadtest.report import arm_table, write_outputs
from loadtest.run import Plan, PointResult, run_all
from loadtest.stats import point_summary, run_summary


def _command(argv: Sequence[str] | None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", "-m", "loadtest", *args])


def build_summary(args: argparse.Namespace, command: str, server: ServerInfo, arms: Sequence[Arm],
                  points: Sequence[LoadPoint], results: Sequence[PointResult], started: str) -> dict[str, Any]:
    per_point = [point_summary(r, arms, args.at_deadline) for r in results]
    layers = next((a["num_layers"] for p in per_point for a in p["arms"] if a["num_layers"]), None)
    config = {"url": args.url, "arms": [a.label for a in arms], "gate": args.gate,
              "load_points": [p.label for p in points], "requests": args.requests, "duration_s": args.duration,
              "at_deadline": args.at_deadline, "max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos,
              "prompts": str(args.prompts), "seed": args.seed, "timeout_s": args.timeout}
    return {"command": command, "started": started, "config": config,
            "server": {"model": server.model, "num_layers": layers}, "load_points": per_point,
            "run": run_summary(per_point)}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    arms, points = arms_of(args), load_points_of(args)
    prompts = load_prompts(args.prompts, args.seed)
    check_target(args.url, args.allow_remote)
    server = preflight(args.url.rstrip("/"), args.api_key)
    plan = Plan(arms=arms, requests=args.requests, duration=args.duration, at_deadline=args.at_deadline,
                max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, seed=args.seed, model=server.model,
                timeout=args.timeout)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    results = asyncio.run(run_all(server.url, args.api_key, plan, points, prompts, args.progress))
    summary = build_summary(args, command, server, arms, points, results, started)
    write_outputs(args.out_dir, summary, results)
    from loadtest.plots import write_plots  # matplotlib only once there is something to draw

    write_plots(args.out_dir, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse(argv)
        summary = run(args, _command(argv))
    except LoadtestError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadtest: interrupted; nothing written", file=sys.stderr)
        return 130
    print("\n".join(arm_table(summary["load_points"])))
    check = summary["run"]["metrics_check"]
    print(f"\n/metrics vs responses: {check['check']} ({check['note']}); wrote {args.out_dir}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
