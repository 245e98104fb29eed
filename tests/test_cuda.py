"""The engine on a CUDA device (marker ``cuda``: skipped where torch sees no GPU; ``scripts/gpu_check.sh``
runs them on a lent GPU machine): the equality tests of the CPU tiers, on CUDA, in float32 (the
engine's rules) and bfloat16 (the GPU's serving dtype), eager and through captured CUDA graphs.

- approximate and exact mode, alone and batched, equal to the eager path, and exact equal to "off";
- captured graphs give the tokens of the eager path (float32: exactly; bf16: exactly on these
  sharpened tiny models, whose top-1 margins are wide);
- a captured graph is really replayed (its segments are captured, and a replay with other inputs
  gives other outputs).
"""

from __future__ import annotations

import pytest
import torch
from support.models import ARCHS, build_tiny, fitted_jump, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.engine import EarlyExitDecoder, ExitSettings, GenerationSettings

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")]

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21], [22, 23]]


def on_cuda(arch: str, dtype: torch.dtype) -> tuple[CausalLM, object]:
    lm = sharpen(build_tiny(arch))
    jump = fitted_jump(lm)
    lm.model.to("cuda", dtype)
    return CausalLM(lm.model, lm.tokenizer, lm.name), jump


def gen(mode: str, n: int = 12, temperature: float = 0.0, **kw: object) -> GenerationSettings:
    kw.setdefault("draft", "exit")  # the exit head's drafts: the same on both paths (auto's depend on timings)
    exits = ExitSettings(mode=mode, threshold=0.5, min_layer=1, stride=1, **kw)  # type: ignore[arg-type]
    return GenerationSettings(max_new_tokens=n, stop_token_ids=(), temperature=temperature, seed=11, exit=exits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_equal_eager_and_exact_equals_off(arch: str, dtype: torch.dtype) -> None:
    lm, jump = on_cuda(arch, dtype)
    eager = EarlyExitDecoder(lm, jump, graphs=False)
    graphed = EarlyExitDecoder(lm, jump, graphs=True)
    assert graphed.runner.graphs is not None
    assert graphed.runner.graphs.capture
    exited = 0
    for ids in PROMPTS:
        off = eager.generate(ids, gen("off")).tokens
        for mode in ("off", "approximate", "exact"):
            a, b = eager.generate(ids, gen(mode)), graphed.generate(ids, gen(mode))
            assert a.tokens == b.tokens, mode
            assert [t.exit_layer for t in a.trace] == [t.exit_layer for t in b.trace], mode
            if mode == "exact":
                assert a.tokens == off
            exited += sum(t.exit_layer < lm.num_layers for t in a.trace)
        for draft in ("ngram", "auto"):  # n-gram chunks through the captured graphs
            exact = graphed.generate(ids * 3, gen("exact", draft=draft))
            assert exact.tokens == eager.generate(ids * 3, gen("off")).tokens
    assert exited > 0
    assert graphed.runner.graphs.captured > 0


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_batched_on_cuda_with_graphs(arch: str) -> None:
    lm, jump = on_cuda(arch, torch.float32)
    settings = [gen("approximate"), gen("exact", temperature=0.8), gen("off"), gen("exact")]
    alone = [EarlyExitDecoder(lm, jump, graphs=False).generate(p, s) for p, s in zip(PROMPTS, settings, strict=True)]
    batched = EarlyExitDecoder(lm, jump, graphs=True).batch(3).generate(PROMPTS, settings)
    assert [g.tokens for g in batched] == [g.tokens for g in alone]


def test_a_captured_graph_is_replayed_with_new_inputs() -> None:
    lm, jump = on_cuda("llama", torch.float32)
    dec = EarlyExitDecoder(lm, jump, graphs=True)
    dec.generate(PROMPTS[0], gen("off", n=4))
    graphs = dec.runner.graphs
    assert graphs is not None
    captured = graphs.captured
    first = dec.generate(PROMPTS[0], gen("off", n=4)).tokens
    other = dec.generate(PROMPTS[1], gen("off", n=4)).tokens
    assert graphs.captured == captured  # same shapes: replayed, not captured again
    assert first == EarlyExitDecoder(lm, jump, graphs=False).generate(PROMPTS[0], gen("off", n=4)).tokens
    assert other == EarlyExitDecoder(lm, jump, graphs=False).generate(PROMPTS[1], gen("off", n=4)).tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ngram_chunks_through_captured_graphs(dtype: torch.dtype) -> None:
    """Exact mode's n-gram drafts (multi-token chunks, rows of different lengths) through captured graphs:
    the eager path's tokens, which are mode off's."""
    from shortcuts.engine.drafts import StepCosts

    lm, jump = on_cuda("llama", dtype)
    eager, graphed = EarlyExitDecoder(lm, jump, graphs=False), EarlyExitDecoder(lm, jump, graphs=True)
    for dec in (eager, graphed):
        dec.step_costs = StepCosts.flat(dec.num_layers)
    prompts = [(p * 3)[:18] for p in PROMPTS]
    exact = GenerationSettings(max_new_tokens=16, stop_token_ids=(), exit=ExitSettings(mode="exact", draft="ngram"))
    off = GenerationSettings(max_new_tokens=16, stop_token_ids=(), exit=ExitSettings(mode="off"))
    a, b = eager.batch(3).generate(prompts, exact), graphed.batch(3).generate(prompts, exact)
    assert [g.tokens for g in a] == [g.tokens for g in b] == [eager.generate(p, off).tokens for p in prompts]
    assert sum(g.stats.accepted_by.get("ngram", 0) for g in b) > 0
    assert graphed.runner.graphs is not None
    assert graphed.runner.graphs.captured > 0


@pytest.mark.parametrize("quantization", ["bnb-8bit", "bnb-4bit"])
def test_bitsandbytes_on_cuda_exact_equals_its_full_depth(quantization: str) -> None:
    """bitsandbytes weights in the engine on CUDA: exact mode gives that quantized model's full-depth tokens,
    eager and graphed (a capture that fails falls back to eager static shapes, still the same tokens)."""
    pytest.importorskip("bitsandbytes")
    lm, jump = on_cuda("llama", torch.bfloat16)
    for graphs in (False, True):
        dec = EarlyExitDecoder(lm, jump, graphs=graphs, quantization=quantization)  # type: ignore[arg-type]
        for ids in PROMPTS:
            assert dec.generate(ids, gen("exact")).tokens == dec.generate(ids, gen("off")).tokens
