"""Closed-loop load against a running onejump server, over HTTP only.

    python -m loadtest --url http://127.0.0.1:8000 --concurrency 1 4 8 --requests 24 --modes off approximate

For each concurrency, the exit modes are interleaved request by request (one client alternates
modes), so a noisy machine slows both sides alike. Prints a Markdown table and writes JSON."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
from tqdm import tqdm


@dataclass
class Result:
    mode: str
    status: int
    ttft: float | None = None
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    mean_exit_layer: float | None = None


def check_target(url: str, allow_remote: bool) -> None:
    host = urlparse(url).hostname or ""
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if host else set()
    if not addresses:
        raise SystemExit(f"loadtest: cannot resolve {url!r}")
    if not allow_remote and not all(ipaddress.ip_address(a).is_loopback for a in addresses):
        raise SystemExit(f"loadtest: {url} is not a loopback address; pass --allow-remote to load another host")


def prompts(path: Path, n: int, seed: int) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"loadtest: prompt file not found: {path} (run `onejump assets`)")
    lines = [json.loads(ln)["text"] for ln in path.read_text().splitlines() if ln.strip()]
    return random.Random(seed).sample(lines, min(n, len(lines)))


async def one(client: httpx.AsyncClient, url: str, prompt: str, mode: str, max_tokens: int) -> Result:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "early_exit": {"mode": mode}}
    start, last, res = time.perf_counter(), None, Result(mode, 0)
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        res.status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            frame = json.loads(line[6:])
            if "early_exit" in frame:
                res.tokens = frame["usage"]["completion_tokens"]
                res.mean_exit_layer = frame["early_exit"]["mean_exit_layer"]
            if res.ttft is None:
                res.ttft = now - start
            elif last is not None:
                res.itl.append(now - last)
            last = now
    res.e2e = time.perf_counter() - start
    return res


async def closed_loop(url: str, texts: list[str], modes: list[str], concurrency: int, requests: int,
                      max_tokens: int) -> tuple[list[Result], float]:
    jobs = [(texts[i % len(texts)], modes[i % len(modes)]) for i in range(requests * len(modes))]
    results: list[Result] = []
    bar = tqdm(total=len(jobs), desc=f"concurrency {concurrency}", unit="req")

    async def client_loop(client: httpx.AsyncClient) -> None:
        while jobs:
            prompt, mode = jobs.pop(0)
            results.append(await one(client, url, prompt, mode, max_tokens))
            bar.update()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    bar.close()
    return results, time.perf_counter() - start


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def summarize(results: list[Result], mode: str, wall: float) -> dict[str, float]:
    ok = [r for r in results if r.mode == mode and r.status == 200]
    tokens = sum(r.tokens for r in ok)
    busy = sum(r.e2e for r in ok)  # modes share the wall time: weight by their share of busy time
    share = busy / max(sum(r.e2e for r in results if r.status == 200), 1e-9)
    itl = [x for r in ok for x in r.itl]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {"requests": len(ok), "errors": sum(r.mode == mode and r.status != 200 for r in results),
            "tokens_per_s": tokens / max(wall * share, 1e-9), "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "req_tokens_per_s": statistics.fmean(r.tokens / r.e2e for r in ok) if ok else float("nan"),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99), "e2e_p50": pct([r.e2e for r in ok], 50),
            "mean_exit_layer": statistics.fmean(layers) if (layers := [r.mean_exit_layer for r in ok
                                                                          if r.mean_exit_layer is not None])
            else float("nan")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=16, help="requests per mode and concurrency")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--modes", nargs="+", default=["off", "approximate"])
    p.add_argument("--prompts", type=Path, default=Path(".cache/onejump/data/wiki/test.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/loadtest.json"))
    p.add_argument("--allow-remote", action="store_true")
    args = p.parse_args(argv)
    if min(args.concurrency) <= 0 or args.requests <= 0 or args.max_tokens <= 0:
        raise SystemExit("loadtest: --concurrency, --requests and --max-tokens must be positive")
    check_target(args.url, args.allow_remote)
    try:
        httpx.get(f"{args.url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as e:
        raise SystemExit(f"loadtest: no onejump server answers at {args.url} ({e})") from None
    texts = prompts(args.prompts, 200, args.seed)
    table, raw = [], {}
    for c in args.concurrency:
        results, wall = asyncio.run(closed_loop(args.url, texts, args.modes, c, args.requests, args.max_tokens))
        raw[c] = [asdict(r) for r in results]
        table += [{"concurrency": c, "mode": m, **summarize(results, m, wall)} for m in args.modes]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "table": table,
                                    "raw": raw}, indent=1))
    cols = list(table[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in table:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
