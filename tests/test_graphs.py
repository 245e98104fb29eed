"""Static-shape segments (the CUDA-graph path) against the eager path, token for token, on tiny models
of every family. On a CPU the static-shape body runs eagerly; ``test_cuda.py`` captures it on a GPU."""

from __future__ import annotations

import pytest
from support.models import ARCHS, build_tiny, fitted_jump, sharpen

from shortcuts.engine import EarlyExitDecoder, ExitSettings, GenerationSettings
from shortcuts.engine.drafts import StepCosts
from shortcuts.engine.graphs import bucket, kv_bucket

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [4, 20]]


def _decoders(arch: str) -> tuple[EarlyExitDecoder, EarlyExitDecoder]:
    """The same sharpened tiny model (its exit head is often confident: tokens exit, drafts are made)
    decoded eagerly and through static-shape segments."""
    lm = sharpen(build_tiny(arch))
    jump = fitted_jump(lm)
    return EarlyExitDecoder(lm, jump), EarlyExitDecoder(lm, jump, graphs=True)


def test_buckets() -> None:
    assert [bucket(n, (1, 2, 4, 8)) for n in (1, 3, 8, 9)] == [1, 4, 8, None]
    assert kv_bucket(0, 4096) == 64
    assert kv_bucket(64, 4096) == 128
    assert kv_bucket(5000, 4096) == 4096


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["off", "approximate", "exact"])
def test_static_segments_give_the_eager_tokens(arch: str, mode: str) -> None:
    eager, static = _decoders(arch)
    exits = ExitSettings(mode=mode, threshold=0.5, min_layer=1, stride=1, max_draft=3, draft="exit")
    s = GenerationSettings(max_new_tokens=12, stop_token_ids=(), exit=exits)
    exited = 0
    for ids in PROMPTS:
        a, b = eager.generate(ids, s), static.generate(ids, s)
        assert a.tokens == b.tokens
        assert [t.exit_layer for t in a.trace] == [t.exit_layer for t in b.trace]
        assert a.stats == b.stats
        exited += sum(t.exit_layer < eager.num_layers for t in a.trace)
    assert mode == "off" or exited > 0  # exits happened, so segments were cut at checks and joins
    fused = [level for _, _, level in static.runner.graphs.segments if level is not None]
    assert mode == "off" or fused  # the checks ran fused to the end of their segments
    assert static.runner.graphs is not None
    assert static.runner.graphs.segments


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_static_segments_verify_ngram_chunks(arch: str) -> None:
    """N-gram drafts (chunks of several tokens, rows of different lengths) through static segments:
    the eager tokens, which are mode off's."""
    eager, static = _decoders(arch)
    for dec in (eager, static):  # auto's choice from a cost model, not from timings taken on a busy machine
        dec.step_costs = StepCosts.flat(dec.num_layers)
    prompts = [(p * 3)[:18] for p in PROMPTS]
    for draft in ("ngram", "auto"):
        s = GenerationSettings(max_new_tokens=16, stop_token_ids=(), exit=ExitSettings(mode="exact", draft=draft))
        off = GenerationSettings(max_new_tokens=16, stop_token_ids=(), exit=ExitSettings(mode="off"))
        a, b = eager.batch(3).generate(prompts, s), static.batch(3).generate(prompts, s)
        assert [g.tokens for g in a] == [g.tokens for g in b] == [eager.generate(p, off).tokens for p in prompts]
        assert sum(g.stats.accepted_by.get("ngram", 0) for g in b) > 0
    assert any(shape.tokens > 2 for _, shape, _ in static.runner.graphs.segments)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_static_segments_in_a_batch_with_catch_up_and_sampling(arch: str) -> None:
    eager, static = _decoders(arch)
    settings = [GenerationSettings(max_new_tokens=10, stop_token_ids=(), exit=ExitSettings(
        mode=m, threshold=0.5, min_layer=1, stride=1), temperature=t, seed=7)
        for m, t in (("approximate", 0.0), ("exact", 0.8), ("off", 0.0), ("exact", 0.0))]
    a = eager.batch(3).generate(PROMPTS, settings)
    b = static.batch(3).generate(PROMPTS, settings)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    shapes = {shape for _, shape, _ in static.runner.graphs.segments}
    assert any(s.rows > 1 for s in shapes)
    assert any(s.tokens > 1 for s in shapes)
