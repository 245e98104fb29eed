"""``python -m loadtest.soak``: hold a steady load on a running onejump server for a while, sample its
memory, and check /metrics against what the responses said. Not part of CI (docs/soak.md).

    python -m loadtest.soak --url http://127.0.0.1:8000 --duration 180 --concurrency 4 \
        --max-tokens 32 --pid "$(pgrep -f 'python -m service' | head -1)" --out-dir runs/soak

Closed loop: ``--concurrency`` clients each stream one /v1/completions after another (exit modes off,
approximate, exact in turn) until ``--duration`` is over. Every ``--sample-every`` seconds it records
the server's resident memory (``/proc/<pid>/status`` VmRSS with ``--pid``, else the
``process_resident_memory_bytes`` metric when the server exports one) and the running/waiting gauges.
At the end, once the server is idle, the /metrics counters' growth must equal the sums over the
responses (requests by outcome, prompt and generated tokens, exit-layer observations, layers computed
and skipped); the load must be the only traffic. Memory growth is the least-squares slope over the
second half of the run. Writes soak.json and soak.md; exit code 1 when a check fails, 2 on bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.client import auth_headers, check_target, preflight, stream_request
from loadtest.prompts import DEFAULT_PROMPTS, load_prompts
from loadtest.records import LoadtestError, Record
from shortcuts.engine.settings import MODES

COUNTERS = {  # metric sample -> what the responses say it must have grown by
    "onejump_request_success_total": "requests finished",
    "onejump_request_failure_total": "requests failed",
    "onejump_prompt_tokens_total": "prompt tokens",
    "onejump_generation_tokens_total": "generated tokens",
    "onejump_exit_layer_count": "exit-layer observations",
    "onejump_layers_computed_total": "layers computed",
    "onejump_layers_skipped_total": "layers skipped",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None)
    p.add_argument("--allow-remote", action="store_true", help="load a host that is not loopback")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--pid", type=int, default=None, help="the server's process id, for its RSS from /proc")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--max-growth-mib-per-min", type=float, default=2.0,
                   help="fail when RSS grows faster over the second half (default 2 MiB/min)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=Path("runs/soak"))
    args = p.parse_args(argv)
    if args.duration <= 0 or args.concurrency < 1 or args.max_tokens < 1 or args.sample_every <= 0:
        p.error("--duration, --concurrency, --max-tokens and --sample-every must be positive")
    return args


# --- reading the server --------------------------------------------------------------------------
def counters(text: str) -> dict[str, float]:
    """Every sample of ``text`` by name, summed over labels; failures also by reason."""
    out: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] += s.value
            if s.name == "onejump_request_failure_total":
                out[f"{s.name}{{reason={s.labels.get('reason')}}}"] += s.value
    return dict(out)


def rss_mib(pid: int | None, metrics: dict[str, float]) -> float | None:
    if pid is not None:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    value = metrics.get("process_resident_memory_bytes")
    return None if value is None else value / 2**20


async def read_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics", timeout=10)
    response.raise_for_status()
    return counters(response.text)


async def settled(client: httpx.AsyncClient, timeout: float = 30.0) -> dict[str, float]:
    """/metrics once nothing runs or waits (cancelled requests are counted by then)."""
    deadline = time.monotonic() + timeout
    while True:
        m = await read_metrics(client)
        idle = m.get("onejump_num_requests_running", 0) == 0 and m.get("onejump_num_requests_waiting", 0) == 0
        if idle or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


# --- the load --------------------------------------------------------------------------------------
async def client_loop(client: httpx.AsyncClient, k: int, args: argparse.Namespace, prompts: list[str],
                      end: float, records: list[Record], start: float) -> None:
    n = 0
    while time.monotonic() < end:
        index = n * args.concurrency + k
        mode = MODES[index % len(MODES)]
        rec = Record(index=index, arm=mode, mode=mode, threshold=None, prompt_index=index % len(prompts),
                     sent=time.monotonic() - start)
        body = {"prompt": prompts[index % len(prompts)], "max_tokens": args.max_tokens, "stream": True,
                "early_exit": {"mode": mode}}
        await stream_request(client, body, rec)
        records.append(rec)
        n += 1


async def sampler(client: httpx.AsyncClient, args: argparse.Namespace, end: float, start: float,
                  samples: list[dict[str, float | None]]) -> None:
    while True:
        m = await read_metrics(client)
        samples.append({"t_s": round(time.monotonic() - start, 2), "rss_mib": rss_mib(args.pid, m),
                        "running": m.get("onejump_num_requests_running"),
                        "waiting": m.get("onejump_num_requests_waiting")})
        if time.monotonic() >= end:
            return
        await asyncio.sleep(min(args.sample_every, max(end - time.monotonic(), 0.0)))


async def soak(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    async with httpx.AsyncClient(base_url=args.url, headers=auth_headers(args.api_key), limits=limits,
                                 timeout=httpx.Timeout(300, connect=10)) as client:
        before = await settled(client)
        start = time.monotonic()
        end = start + args.duration
        records: list[Record] = []
        samples: list[dict[str, float | None]] = []
        await asyncio.gather(sampler(client, args, end, start, samples),
                             *(client_loop(client, k, args, prompts, end, records, start)
                               for k in range(args.concurrency)))
        elapsed = time.monotonic() - start
        after = await settled(client)
    return {"records": records, "samples": samples, "before": before, "after": after, "elapsed_s": elapsed}


# --- checks and report -----------------------------------------------------------------------------
def expected(records: list[Record]) -> dict[str, float]:
    ok = [r for r in records if r.ok]
    return {
        "onejump_request_success_total": len(ok),
        "onejump_request_failure_total": len(records) - len(ok),
        "onejump_prompt_tokens_total": sum(r.prompt_tokens for r in ok),
        "onejump_generation_tokens_total": sum(r.tokens for r in ok),
        "onejump_exit_layer_count": sum(len(r.exit_layers) for r in ok),
        "onejump_layers_computed_total": sum(r.layers_computed or 0 for r in ok),
        "onejump_layers_skipped_total": sum(r.layers_skipped or 0 for r in ok),
    }


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    n = len(points)
    mt, my = sum(t for t, _ in points) / n, sum(y for _, y in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return None if var == 0 else 60 * sum((t - mt) * (y - my) for t, y in points) / var


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(args: argparse.Namespace, run: dict[str, Any], command: str) -> dict[str, Any]:
    records, samples = run["records"], run["samples"]
    want = expected(records)
    grew = {k: run["after"].get(k, 0.0) - run["before"].get(k, 0.0) for k in COUNTERS}
    checks = [{"metric": k, "what": COUNTERS[k], "responses": want[k], "metrics": grew[k], "ok": want[k] == grew[k]}
              for k in COUNTERS]
    rss = [(s["t_s"], s["rss_mib"]) for s in samples if s["rss_mib"] is not None]
    half = [p for p in rss if p[0] >= run["elapsed_s"] / 2]
    slope = slope_per_min(half)
    memory = {"source": f"/proc/{args.pid}/status VmRSS" if args.pid else "process_resident_memory_bytes",
              "first_mib": rss[0][1] if rss else None, "last_mib": rss[-1][1] if rss else None,
              "min_mib": min(y for _, y in rss) if rss else None, "max_mib": max(y for _, y in rss) if rss else None,
              "second_half_slope_mib_per_min": slope}
    memory_ok = slope is not None and slope <= args.max_growth_mib_per_min
    ok = [r for r in records if r.ok]
    outcomes = Counter(r.outcome if r.ok else f"{r.outcome} {r.status}" for r in records)
    return {
        "command": command, "url": args.url, "duration_s": round(run["elapsed_s"], 1),
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "requests": len(records),
        "outcomes": dict(outcomes), "requests_per_s": len(records) / run["elapsed_s"],
        "tokens_per_s": sum(r.tokens for r in ok) / run["elapsed_s"],
        "ttft_s": {q: pct([r.ttft for r in ok if r.ttft is not None], v) for q, v in (("p50", .5), ("p95", .95))},
        "e2e_s": {q: pct([r.e2e for r in ok if r.e2e is not None], v) for q, v in (("p50", .5), ("p95", .95))},
        "memory": memory, "memory_ok": memory_ok, "checks": checks,
        "failures_by_reason": {k: run["after"].get(k, 0) - run["before"].get(k, 0)
                               for k in run["after"] if k.startswith("onejump_request_failure_total{")},
        "ok": memory_ok and all(c["ok"] for c in checks) and len(ok) == len(records),
        "samples": samples, "errors": [asdict(r) for r in records if not r.ok][:20],
    }


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(s: dict[str, Any]) -> str:
    m = s["memory"]
    lines = [
        "# Soak", "", f"`{s['command']}`", "",
        f"**{'PASS' if s['ok'] else 'FAIL'}**: {s['requests']} requests in {s['duration_s']} s at concurrency "
        f"{s['concurrency']} ({_f(s['requests_per_s'], 2)} req/s, {_f(s['tokens_per_s'])} tokens/s), outcomes "
        f"{s['outcomes']}; TTFT p50/p95 {_f(s['ttft_s']['p50'], 3)}/{_f(s['ttft_s']['p95'], 3)} s, end-to-end "
        f"p50/p95 {_f(s['e2e_s']['p50'], 3)}/{_f(s['e2e_s']['p95'], 3)} s.", "",
        f"Memory ({m['source']}): first {_f(m['first_mib'])} MiB, min {_f(m['min_mib'])}, max {_f(m['max_mib'])}, "
        f"last {_f(m['last_mib'])}; slope over the second half {_f(m['second_half_slope_mib_per_min'], 2)} MiB/min "
        f"({'ok' if s['memory_ok'] else 'too steep or unknown'}).", "",
        "| /metrics counter | growth | from the responses | |", "|---|---|---|---|",
        *[f"| `{c['metric']}` ({c['what']}) | {c['metrics']:g} | {c['responses']:g} | "
          f"{'ok' if c['ok'] else 'MISMATCH'} |" for c in s["checks"]],
        "", "| t (s) | RSS (MiB) | running | waiting |", "|---|---|---|---|",
        *[f"| {x['t_s']:g} | {_f(x['rss_mib'])} | {x['running']:g} | {x['waiting']:g} |" for x in s["samples"]],
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "loadtest.soak", *(sys.argv[1:] if argv is None else argv)])
    try:
        check_target(args.url, args.allow_remote)
        preflight(args.url, args.api_key)
        if args.pid is not None and not Path(f"/proc/{args.pid}/status").exists():
            raise LoadtestError(f"no process {args.pid} (--pid)")
        prompts = [p for p in load_prompts(args.prompts, args.seed) if isinstance(p, str)]
        if not prompts:
            raise LoadtestError(f"{args.prompts} holds only chat requests; the soak sends completion prompts")
    except LoadtestError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    summary = summarize(args, asyncio.run(soak(args, prompts)), command)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "soak.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out_dir / "soak.md").write_text(markdown(summary))
    print(markdown(summary).split("\n\n| t (s)")[0])
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
