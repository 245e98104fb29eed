"""Throughput of continuous batching against one sequence at a time, in one interleaved run.

    python -m shortcuts.lab.batch_bench --threads 1 --sizes 1,4,8 --new-tokens 32

For each batch size n and each exit setting (mode off; approximate, and optionally exact, at each
threshold), decodes n Wikipedia prompts x ``--new-tokens`` tokens (EOS ignored, so every sequence
makes the same number of tokens) with ``BatchDecoder`` (all n admitted together) and with
``EarlyExitDecoder.generate`` one after the other; the two alternate within each repeat. Prints
aggregate tokens/s of each, the ratio, how many sequences came out token-identical, and the mean
exit layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shortcuts.engine.decoder import Generation
    from shortcuts.engine.settings import GenerationSettings

DEFAULT_JUMP = "docs/results/smollm2-135m/jump.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.batch_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the SmolLM2 asset)")
    p.add_argument("--jump", default=DEFAULT_JUMP, help="jump artifact; if missing, the identity shortcut is used")
    p.add_argument("--prompts", default=None, help="jsonl with a 'text' field (default: the Wikipedia test split)")
    p.add_argument("--sizes", default="1,4,8", help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--thresholds", default="0.8", help="comma-separated confidence thresholds (approximate mode)")
    p.add_argument("--exact-thresholds", default="", help="comma-separated thresholds for exact mode (default: none)")
    p.add_argument("--min-layer", type=int, default=None, help="first exit level (default: L/3, as bench.py)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per row (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compile", action="store_true", help="run the blocks under torch.compile")
    return p.parse_args(argv)


def load_prompts(path: Path, tokenizer: Any, n: int) -> list[list[int]]:
    """The first n texts of a jsonl file, tokenized."""
    out: list[list[int]] = []
    with path.open() as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            if text:
                out.append(list(tokenizer(text)["input_ids"]))
            if len(out) == n:
                break
    if len(out) < n:
        raise ValueError(f"{path} holds only {len(out)} prompts; {n} needed")
    return out


@dataclass
class Row:
    name: str
    size: int
    settings: GenerationSettings
    batched: list[float] = field(default_factory=list)  # seconds per repeat
    single: list[float] = field(default_factory=list)
    same: int = 0  # sequences with identical tokens in both ways
    exit_layer: float = 0.0


def _timed(fn: Callable[[], list[Generation]]) -> tuple[float, list[Generation]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace, lm: Any, jump: Any) -> list[Row]:
    import torch

    from shortcuts.assets import wiki_split
    from shortcuts.engine.batch import BatchDecoder
    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.settings import ExitSettings, GenerationSettings

    sizes = [int(s) for s in args.sizes.split(",")]
    prompts = load_prompts(Path(args.prompts) if args.prompts else wiki_split("test"), lm.tokenizer, max(sizes))
    dec = EarlyExitDecoder(lm, jump, compile=args.compile)
    batches = {n: BatchDecoder(dec, n) for n in sizes}  # static caches: allocated once, outside the timings
    min_layer = args.min_layer or max(1, lm.num_layers // 3)
    exits = [("off", ExitSettings(mode="off"))] + [
        (f"approximate t={t}", ExitSettings(mode="approximate", threshold=float(t), min_layer=min_layer))
        for t in args.thresholds.split(",") if t] + [
        (f"exact t={t}", ExitSettings(mode="exact", threshold=float(t), min_layer=min_layer))
        for t in args.exact_thresholds.split(",") if t]
    rows = [Row(name, n, GenerationSettings(max_new_tokens=args.new_tokens, stop_token_ids=(), exit=e))
            for n in sizes for name, e in exits]
    BatchDecoder(dec, 2).generate(prompts[:2], rows[-1].settings)  # warm-up
    for rep in range(args.repeats):
        for row in rows:
            ps = prompts[: row.size]
            both = [("batched", lambda ps=ps, row=row: batches[row.size].generate(ps, row.settings)),
                    ("single", lambda ps=ps, row=row: [dec.generate(p, row.settings) for p in ps])]
            results = {}
            for way, fn in both if rep % 2 == 0 else both[::-1]:  # alternate which goes first
                with torch.inference_mode():
                    seconds, results[way] = _timed(fn)
                getattr(row, way).append(seconds)
            row.same = sum(a.tokens == b.tokens for a, b in zip(results["batched"], results["single"], strict=True))
            row.exit_layer = statistics.mean(g.mean_exit_layer for g in results["batched"])
    return rows


def report(lm: Any, args: argparse.Namespace, rows: list[Row]) -> str:
    lines = [f"model {lm.name}: L={lm.num_layers}; {args.new_tokens} new tokens per sequence; "
             f"median of {args.repeats} repeats; {'compiled' if args.compile else 'eager'} blocks", "",
             "| sequences | exits | batched tok/s | one at a time tok/s | ratio | identical | mean exit layer |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tokens = r.size * args.new_tokens
        b, s = statistics.median(r.batched), statistics.median(r.single)
        lines.append(f"| {r.size} | {r.name} | {tokens / b:.1f} | {tokens / s:.1f} | {s / b:.2f}x | "
                     f"{r.same}/{r.size} | {r.exit_layer:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from shortcuts.lab.micro_bench import load_model_and_jump

    torch.set_num_threads(args.threads)
    lm, jump = load_model_and_jump(args.model, args.jump, args.device, args.dtype)
    print(report(lm, args, run(args, lm, jump)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
