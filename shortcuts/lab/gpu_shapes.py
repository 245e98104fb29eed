"""GPU timings of model shapes with RANDOM weights, and a projection of early exit at real exit traces.

    python -m shortcuts.lab.gpu_shapes --out runs/gpu/shapes.json [--traces runs/gpu/bench-bf16-b1.json]

Random weights give the speed of full depth (every block runs whatever the weights), not exits:

- ``gemma-3-270m`` (the real model's configuration, random weights) and ``llama-2-7b`` shapes: HF
  ``generate`` against the engine's full depth, eager and through CUDA graphs, batch 1, greedy, the
  same random prompts, ``--new-tokens`` each;
- ``llama-2-7b`` pieces, timed by CUDA events: one block (one token, and a 4-token chunk), the full
  head, the fused exit check of a rank-32 jump, and a graphed segment of every block;
- a PROJECTION (not a measurement): the speed-up early exit would give the 7B shape at the exit
  traces of a real model's ``onejump bench`` run (``--traces``: the approximate arm's exit levels,
  mapped by relative depth, and its checks per token), under the stated assumptions (``project``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM

GEMMA_270M = {"model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256,
              "sliding_window": 512, "vocab_size": 262144, "max_position_embeddings": 32768,
              "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
              "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
              "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu",
             "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TINY = {**LLAMA2_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1000}  # the script's own test, on a CPU
SHAPES = {"gemma-3-270m": GEMMA_270M, "llama-2-7b": LLAMA2_7B, "tiny": TINY}


def random_model(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> CausalLM:
    """A model of this configuration with random weights, built on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return CausalLM(model, None, name=f"random {config['model_type']} d={config['hidden_size']}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn: Callable[[], object], repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of ``fn`` on the GPU (CUDA events around ``repeats`` calls, after warm-up); on a
    CPU (the test) wall time."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) * 1000 / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def full_depth(lm: CausalLM, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Tokens/s of HF generate and the engine's full depth, eager and graphed, interleaved prompt by prompt."""
    from shortcuts.engine import EarlyExitDecoder, ExitSettings, GenerationSettings

    eager = EarlyExitDecoder(lm, None, check=False)
    graphed = EarlyExitDecoder(lm, None, check=False, graphs=True)
    s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=ExitSettings(mode="off"))

    def hf(ids: list[int]) -> None:
        x = torch.tensor([ids], device=lm.device)
        lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    arms: dict[str, Callable[[list[int]], object]] = {
        "hf_generate": hf, "off_eager": lambda ids: eager.generate(ids, s),
        "off_graphs": lambda ids: graphed.generate(ids, s)}
    seconds = dict.fromkeys(arms, 0.0)
    for arm in arms.values():  # warm-up: graphs captured, kernels loaded
        arm(prompts[0])
    for k, ids in enumerate(prompts):
        names = list(arms)[k % len(arms):] + list(arms)[: k % len(arms)]
        for name in names:
            sync()
            t0 = time.perf_counter()
            arms[name](ids)
            sync()
            seconds[name] += time.perf_counter() - t0
    tok = len(prompts) * new_tokens
    return {name: tok / sec for name, sec in seconds.items()}


def pieces(lm: CausalLM) -> dict[str, float]:
    """Milliseconds of one block (1 token; a 4-token chunk), the full head, a rank-32 fused exit check and
    a graphed segment of every block, at batch 1 and 100 cached positions."""
    from shortcuts.engine.cache import RowCall
    from shortcuts.engine.exit_head import ExitHead, confidence_and_top
    from shortcuts.engine.runner import LayerRunner
    from shortcuts.jump import JumpConfig, LowRankJumps

    runner = LayerRunner(lm, 512)
    runner.use_graphs(max_rows=1)
    cache = runner.new_cache(1)
    d, dev, dtype = lm.hidden_size, lm.device, lm.lm_head.weight.dtype
    L = lm.num_layers

    def seg(first: int, last: int, q: int) -> Callable[[], object]:
        h = torch.randn(1, q, d, device=dev, dtype=dtype)

        def run() -> object:
            for i in range(first, last):
                cache.lengths[i][0] = 100
            return runner.segment(first, last, h, RowCall([0], [100], [q], q, dev), cache)

        return run

    torch.manual_seed(0)
    jump = LowRankJumps(JumpConfig(d, 32), n=1).eval()
    head = ExitHead(lm, jump)
    state = torch.randn(1, d, device=dev, dtype=dtype)
    return {"block_1_token": cuda_ms(seg(0, 1, 1)), "block_4_tokens": cuda_ms(seg(0, 1, 4)),
            "all_blocks_graphed": cuda_ms(seg(0, L, 1)), "head": cuda_ms(lambda: runner.full_logits(state)),
            "exit_check_r32": cuda_ms(lambda: confidence_and_top(head(state, L // 2)))}


def project(ms: dict[str, float], traces: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Early exit's speed-up on this shape at a real model's exit trace: each token runs the blocks up to its
    exit level (by relative depth), its checks, and the full head when it went full depth.

    Assumptions, stated with the result: catch-up (the skipped blocks of exited tokens run later in the next
    deep token's chunk) costs nothing extra, which the block's 1-token vs 4-token time tests; a step's host
    work overlaps the GPU's (graphs); the check costs what the rank-32 check costs here."""
    levels, src_layers = traces["exit_levels"], traces["num_layers"]
    checks = traces["checks_per_token"]
    t_block = ms["all_blocks_graphed"] / num_layers
    full = num_layers * t_block + ms["head"]
    spent = 0.0
    for lv in levels:
        depth = max(1, round(lv / src_layers * num_layers))
        spent += depth * t_block + checks * ms["exit_check_r32"] + (ms["head"] if lv >= src_layers else 0.0)
    return {"projected_speedup": full * len(levels) / spent, "tokens": len(levels),
            "exit_rate": sum(lv < src_layers for lv in levels) / max(len(levels), 1),
            "chunk_cost_ratio_4_vs_1": ms["block_4_tokens"] / ms["block_1_token"],
            "assumptions": " ".join((project.__doc__ or "").split("Assumptions, stated with the result: ")[1].split())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--traces", default=None, help="an onejump bench --json output with exit traces")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--shapes", nargs="+", default=["gemma-3-270m", "llama-2-7b"], choices=list(SHAPES))
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    out: dict[str, Any] = {"note": "random weights: full-depth speed only; the projection is not a measurement",
                           "gpu": gpu, "torch": torch.__version__}
    for name in args.shapes:
        lm = random_model(SHAPES[name], device=args.device)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(4, 1000, (48,), generator=g).tolist() for _ in range(args.prompts)]
        r: dict[str, Any] = {"tok_s": full_depth(lm, prompts, args.new_tokens)}
        r["graphs_vs_hf"] = r["tok_s"]["off_graphs"] / r["tok_s"]["hf_generate"]
        if name in ("llama-2-7b", "tiny"):
            r["ms"] = pieces(lm)
            if args.traces:
                bench = json.loads(Path(args.traces).read_text())
                r["projection"] = project(r["ms"], bench["traces"]["approximate"], lm.num_layers)
        if gpu:
            r["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        out[name] = r
        print(name, json.dumps(r), flush=True)
        del lm
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
