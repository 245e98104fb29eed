"""Side-by-side CPU/GPU timings of the early-exit engine on one model, in one run.

    python -m shortcuts.lab.micro_bench --jump docs/results/smollm2-135m/jump-pure-mse.safetensors

Prints the cost of one decoder block, the full LM head and the fused exit head for one token,
then tokens/s of HF ``generate``, mode off, approximate decoding and exact (self-speculative)
decoding at a few thresholds, with the speed ratio to mode off and the fraction of the output
that is a common prefix with mode off (1.00 = same text).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.assets import default_model_dir
from shortcuts.bench import hf_generate
from shortcuts.engine.decoder import EarlyExitDecoder, Generation
from shortcuts.engine.exit_head import ExitGate, ExitHead, confidence_and_top, to_host
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import LowRankJumps
from shortcuts.timing import median_seconds

Row = tuple[str, float, list[int] | Generation]

DEFAULT_JUMP = "docs/results/smollm2-135m/jump-pure-mse.safetensors"
PROMPT = "The history of the city of Paris begins in the third century BC, when"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.micro_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder or hub id (default: the SmolLM2 asset)")
    p.add_argument("--jump", default=DEFAULT_JUMP, help="jump artifact; if missing, the identity shortcut is used")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--thresholds", default="0.6,0.8,0.9", help="comma-separated confidence thresholds")
    p.add_argument("--min-layer", type=int, default=None, help="first exit level (default: L/3)")
    p.add_argument("--stride", type=int, default=1, help="check the exit gate every stride-th level")
    p.add_argument("--max-draft", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20, help="repeats of the per-token micro-benchmarks")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def micro(lm: CausalLM, jump: LowRankJumps | None, repeats: int) -> dict[str, float]:
    """Seconds for one token: a decoder block (cache of 64 positions), the copy policy's K/V fill of one
    skipped block, the full head, the exit head."""
    runner = LayerRunner(lm, 128)
    cache = runner.new_cache()
    ids = torch.randint(lm.vocab_size // 4, lm.vocab_size, (1, 65), generator=torch.Generator().manual_seed(0))
    runner.forward(ids[:, :64], cache)
    token = runner.embed(ids[:, 64:], 64)
    chunk4 = runner.embed(ids[:, 61:65], 64)  # 4 tokens at once: what catch-up and verification run
    h, h4 = token.h, chunk4.h

    def one_block() -> None:
        cache.crop_row(0, 64)
        runner.block(0, h, token.call(), cache)

    def four_tokens() -> None:
        cache.crop_row(0, 64)
        runner.block(0, h4, chunk4.call(), cache)

    def one_fill() -> None:
        cache.crop_row(0, 64)
        runner.fill_kv(0, h, token.call(), cache)

    head = ExitHead(lm, jump)
    gate = ExitGate(ExitSettings(mode="approximate", threshold=0.9))
    state = h[0]  # (1, d)
    level = lm.num_layers // 2

    def check() -> None:
        ((top, conf),) = to_host(*confidence_and_top(head(state, level)))
        gate.decide(conf, top)

    with torch.inference_mode():
        return {"block": median_seconds(one_block, repeats),
                "block, 4 tokens at once": median_seconds(four_tokens, repeats),
                "K/V fill (copy)": median_seconds(one_fill, repeats),
                "full head": median_seconds(lambda: lm.head(state), repeats),
                f"exit head ({head.kind})": median_seconds(lambda: head(state, level), repeats),
                "exit check (head+gate)": median_seconds(check, repeats)}


def decode_rows(lm: CausalLM, jump: LowRankJumps | None, args: argparse.Namespace) -> list[Row]:
    """(name, seconds, Generation or token list) for HF generate and every engine setting."""
    ids = lm.tokenizer(args.prompt).input_ids
    n = args.new_tokens
    dec = EarlyExitDecoder(lm, jump)
    min_layer = args.min_layer or max(1, lm.num_layers // 3)
    rows: list[Row] = []

    def timed(name: str, fn: Callable[[], list[int] | Generation]) -> None:
        fn()  # warm-up
        t0 = time.perf_counter()
        result = fn()
        rows.append((name, time.perf_counter() - t0, result))

    timed("HF generate", lambda: hf_generate(lm, ids, n))
    # HF's self-speculative decoding: draft with the first k blocks + the model's own head (LayerSkip)
    timed(f"HF assistant_early_exit={min_layer}", lambda: hf_generate(lm, ids, n, assistant_early_exit=min_layer))
    engine: list[tuple[str, ExitSettings]] = [("off", ExitSettings(mode="off"))]
    for th in (float(t) for t in args.thresholds.split(",")):
        for mode, policy in (("approximate", "catchup"), ("approximate", "copy"), ("exact", "catchup")):
            name = f"{mode}{'-copy' if policy == 'copy' else ''} t={th}"
            engine.append((name, ExitSettings(mode=mode, threshold=th, min_layer=min_layer, kv_policy=policy,  # type: ignore[arg-type]
                                              stride=args.stride, max_draft=args.max_draft)))
    for name, exit_settings in engine:
        s = GenerationSettings(max_new_tokens=n, stop_token_ids=(), exit=exit_settings)
        timed(name, lambda s=s: dec.generate(ids, s))  # type: ignore[misc]
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def report(lm: CausalLM, micro_times: dict[str, float], rows: list[Row]) -> str:
    L = lm.num_layers
    lines = [f"model {lm.name}: L={L}, d={lm.hidden_size}, V={lm.vocab_size}", "", "per token:"]
    block = micro_times["block"]
    for name, t in micro_times.items():
        lines.append(f"  {name:<22} {t * 1e3:8.3f} ms  ({t / block:5.2f} blocks)")
    lines.append(f"  {'all blocks':<22} {block * L * 1e3:8.3f} ms")
    off_time, off = next((t, r) for name, t, r in rows if name == "off")
    off_tokens = off if isinstance(off, list) else off.tokens
    lines += ["", f"{'decoding':<24} {'tok/s':>8} {'vs off':>7} {'prefix':>6} {'exit layer':>10} {'accept':>7}"]
    for name, seconds, result in rows:
        tokens = result if isinstance(result, list) else result.tokens
        same = _common_prefix(tokens, off_tokens) / len(off_tokens)
        depth = acc = "-"
        if not isinstance(result, list):
            depth = f"{result.mean_exit_layer:.1f}"
            acc = f"{result.stats.acceptance_rate:.2f}" if result.stats.drafted else "-"
        lines.append(f"{name:<24} {len(tokens) / seconds:8.1f} {off_time / seconds:7.2f} {same:6.2f} "
                     f"{depth:>10} {acc:>7}")
    return "\n".join(lines)


def load_model_and_jump(model: str | None, jump_path: str, device: str,
                        dtype: str = "float32") -> tuple[CausalLM, LowRankJumps | None]:
    """The model (default: the SmolLM2 asset) and the jump, or None (identity) when the file is missing."""
    lm = CausalLM.load(model or default_model_dir(), dtype=dtype, device=device)
    if not Path(jump_path).is_file():
        print(f"jump: {jump_path} not found; exits use the identity shortcut (logit lens)")
        return lm, None
    artifact = JumpArtifact.load(jump_path)
    artifact.check_model(lm)
    print(f"jump: {jump_path} (rank {artifact.config.rank}, {artifact.config.variant})")
    return lm, artifact.jump.to(lm.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, jump = load_model_and_jump(args.model, args.jump, args.device)
    print(report(lm, micro(lm, jump, args.repeats), decode_rows(lm, jump, args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
