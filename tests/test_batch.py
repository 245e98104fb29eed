"""Continuous batching with per-sequence early exits (``shortcuts.engine.batch``) on tiny random
models of every architecture: each sequence of a batch decodes exactly as the single-sequence
decoder decodes it alone (tokens, exit layers, kinds, work counters), whatever the other rows do."""

from __future__ import annotations

import pytest
import torch
from support.models import arch_params, build_tiny, check_catchup_invariants, fitted_jump, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.engine.batch import BatchDecoder
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.decoder import EarlyExitDecoder, Generation
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.sequence import SequenceRun
from shortcuts.engine.settings import ExitSettings, GenerationSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = (3, 11, 7, 20, 1)  # prompt lengths; 20 + new tokens is past Gemma's sliding window of 8


def prompts(n: int = len(LENGTHS), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (LENGTHS[k % len(LENGTHS)],), generator=g).tolist() for k in range(n)]


def gen_settings(n: int, temperature: float = 0.0, seed: int | None = None, **exit_kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, temperature=temperature, seed=seed, stop_token_ids=(),
                              exit=ExitSettings(**exit_kw))


def assert_same(batched: Generation, alone: Generation) -> None:
    """Same tokens, exit layers, kinds, finish and work; confidences up to float rounding."""
    assert batched.tokens == alone.tokens
    assert [t.exit_layer for t in batched.trace] == [t.exit_layer for t in alone.trace]
    assert [t.kind for t in batched.trace] == [t.kind for t in alone.trace]
    assert batched.finish_reason == alone.finish_reason
    assert batched.stats == alone.stats
    for a, b in zip(batched.trace, alone.trace, strict=True):
        assert a.confidence == pytest.approx(b.confidence, abs=1e-5)


def check_invariants(batch: BatchDecoder) -> None:
    """Every layer of a row holds the keys/values of all its fed tokens but the pending ones."""
    for s in batch.running:
        check_catchup_invariants(batch.cache, s, batch.num_layers)


@pytest.fixture(params=arch_params())
def sharp(request: pytest.FixtureRequest) -> tuple[CausalLM, EarlyExitDecoder]:
    lm = sharpen(build_tiny(request.param))
    return lm, EarlyExitDecoder(lm, fitted_jump(lm))


# --- the cache and the masks -------------------------------------------------------------------------
def test_cache_writes_each_row_at_its_own_length() -> None:
    cpu = torch.device("cpu")
    cache = KVCache(num_layers=1, num_rows=3, capacity=8, kv_heads=2, head_dim=4, dtype=torch.float32, devices=[cpu])
    first = torch.randn(1, 2, 3, 4)
    cache.write(0, RowCall([1], [0], [3], 3, cpu), first, -first)  # row 1 holds 3 positions, rows 0 and 2 none
    new = torch.randn(2, 2, 2, 4)  # rows 2 and 1, two queries each; row 2 has one real token
    k, v = cache.write(0, RowCall([2, 1], [0, 3], [1, 2], 2, cpu), new, -new)
    assert k.shape == (2, 2, 5, 4)  # up to the longest row: 3 + 2
    assert torch.equal(k[1], torch.cat([first[0], new[1]], dim=1))
    assert torch.equal(k[0, :, :2], new[0])  # row 2: its real key and its padding key at 0..1
    assert torch.equal(v, -k)
    assert [cache.length(0, r) for r in range(3)] == [0, 5, 1]  # padding does not count
    assert torch.equal(cache.row_kv(0, 2)[0], new[0:1, :, :1])
    cache.crop_row(1, 4)
    cache.reset_row(2)
    assert cache.lengths == [[0, 4, 0]]
    assert torch.isfinite(cache.keys[0]).all()  # unwritten slots are zeros, never garbage
    with pytest.raises(RuntimeError, match="contiguous"):  # row 1 now holds 4 positions, not 3
        cache.write(0, RowCall([1], [3], [1], 1, cpu), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))


@pytest.mark.parametrize("window", [None, 3])
def test_row_masks_are_each_rows_own_causal_mask(window: int | None) -> None:
    starts, counts, q = [5, 0, 9], [3, 1, 2], 3
    call = RowCall([0, 1, 2], starts, counts, q, torch.device("cpu"))
    mask = call.mask(window)
    assert mask is not None
    assert mask.shape == (3, 1, q, call.kv_len)
    for r, (start, count) in enumerate(zip(starts, counts, strict=True)):
        own = RowCall([0], [start], [count], count, torch.device("cpu")).mask(window)
        if own is None:
            assert mask[r, 0, :count, : start + count].all()
        else:
            assert torch.equal(mask[r, 0, :count, : start + count], own[0, 0])
        assert not mask[r, 0, :count, start + count :].any()  # nothing past the row's own keys
    same = RowCall([0, 1], [4, 4], [1, 1], 1, torch.device("cpu"))
    assert same.mask(None) is None  # SDPA's fast path


# --- decoding equals the single-sequence decoder ----------------------------------------------------
def test_mode_off_batch_equals_single_decoder_and_hf(tiny_lm: CausalLM) -> None:
    """Greedy, full depth: every sequence of a batch (different prompt lengths and budgets, more
    prompts than slots) gets the single decoder's tokens, which are HF generate's."""
    dec = EarlyExitDecoder(tiny_lm)
    ps = prompts()
    budgets = (12, 5, 20, 9, 16)
    sets = [GenerationSettings(max_new_tokens=n, exit=ExitSettings(mode="off")) for n in budgets]
    batched = BatchDecoder(dec, max_batch_size=3).generate(ps, sets)
    for p, s, b in zip(ps, sets, batched, strict=True):
        alone = dec.generate(p, s)
        assert_same(b, alone)
        with torch.no_grad():
            out = tiny_lm.model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                         do_sample=False, max_new_tokens=s.max_new_tokens)
        assert b.tokens == out[0, len(p) :].tolist()


@pytest.mark.parametrize("kv_policy", ["catchup", "copy"])
def test_approximate_batch_equals_single_decoder(sharp: tuple[CausalLM, EarlyExitDecoder], kv_policy: str) -> None:
    """Per-sequence thresholds, gates, min_layer and stride: tokens, exit layers and work counters
    of every sequence equal the single decoder's with the same settings."""
    lm, dec = sharp
    exits = [{"threshold": 0.3}, {"threshold": 0.5, "min_layer": 2}, {"threshold": 0.7, "stride": 2},
             {"threshold": 1.0}, {"gate": "entropy", "threshold": 1.5}, {"gate": "patience", "patience": 2}]
    sets = [gen_settings(16 + 2 * k, mode="approximate", kv_policy=kv_policy, **kw) for k, kw in enumerate(exits)]
    ps = prompts(len(sets), seed=1)
    batch = BatchDecoder(dec, max_batch_size=4)
    seqs = [batch.add(p, s) for p, s in zip(ps[:4], sets[:4], strict=True)]
    while batch.running:
        batch.step()
        check_invariants(batch)
        while len(seqs) < len(ps) and batch.free_slots:
            seqs.append(batch.add(ps[len(seqs)], sets[len(seqs)]))
    alone = [dec.generate(p, s) for p, s in zip(ps, sets, strict=True)]
    for s, a in zip(seqs, alone, strict=True):
        assert_same(s.generation, a)
    assert sum(a.stats.layers_skipped for a in alone) > 0
    if kv_policy == "copy":
        assert sum(a.stats.kv_fills for a in alone) > 0


def test_exact_mode_in_a_mixed_batch(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """Self-speculative rows next to off and approximate rows: each equals its single-decoder run,
    and the exact rows' tokens are the full model's, with drafts both accepted and rejected."""
    lm, dec = sharp
    modes = [{"mode": "exact", "draft": "exit", "threshold": 0.3}, {"mode": "off"},
             {"mode": "approximate", "threshold": 0.4},
             {"mode": "exact", "draft": "exit", "threshold": 0.5, "max_draft": 2},
             {"mode": "exact", "draft": "exit", "threshold": 0.0, "min_layer": 2}]
    sets = [gen_settings(20, **kw) for kw in modes]
    ps = prompts(len(sets), seed=2)
    batched = BatchDecoder(dec, max_batch_size=5).generate(ps, sets)
    drafted = accepted = 0
    for p, s, b in zip(ps, sets, batched, strict=True):
        assert_same(b, dec.generate(p, s))
        if s.exit.mode == "exact":
            assert b.tokens == dec.generate(p, gen_settings(20, mode="off")).tokens
            drafted, accepted = drafted + b.stats.drafted, accepted + b.stats.accepted
    assert 0 < accepted < drafted


def test_continuous_join_and_cancel_leave_the_others_alone(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """A sequence joining mid-way and one cancelled mid-way change nothing for the others; the
    cancelled one's slot is reused."""
    lm, dec = sharp
    ps = prompts(4, seed=3)
    sets = [gen_settings(18, mode="approximate", threshold=th) for th in (0.3, 0.5, 0.4, 0.6)]
    alone = [dec.generate(p, s) for p, s in zip(ps, sets, strict=True)]
    batch = BatchDecoder(dec, max_batch_size=3)
    a, b = batch.add(ps[0], sets[0]), batch.add(ps[1], sets[1])
    for _ in range(4):
        batch.step()
    c = batch.add(ps[2], sets[2])  # joins mid-way, in the third slot
    for _ in range(3):
        batch.step()
        check_invariants(batch)
    batch.cancel(b)
    assert b.generation.finish_reason == "abort"
    assert alone[1].tokens[: len(b.tokens)] == b.tokens
    assert batch.free_slots == 1
    d = batch.add(ps[3], sets[3])
    assert d.row == b.row  # the freed slot
    while batch.running:
        batch.step()
        check_invariants(batch)
    for seq, ref in zip((a, c, d), (alone[0], alone[2], alone[3]), strict=True):
        assert_same(seq.generation, ref)


def test_seeded_sampling_per_sequence(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """Each sequence samples with its own seeded generator: reproducible, equal to the single
    decoder's draws, different across seeds, whatever shares the batch."""
    lm, dec = sharp
    ps = prompts(4, seed=4)
    sets = [gen_settings(16, temperature=1.0, seed=seed, mode=mode, threshold=0.5, draft="exit")
            for seed, mode in zip((1, 2, 1, 3), ("off", "approximate", "approximate", "exact"), strict=True)]
    first = BatchDecoder(dec, 4).generate(ps, sets)
    again = BatchDecoder(dec, 2).generate(ps, sets)  # other batch mates, other slots
    for p, s, x, y in zip(ps, sets, first, again, strict=True):
        assert x.tokens == y.tokens
        assert_same(x, dec.generate(p, s))
    other = BatchDecoder(dec, 4).generate(ps, [gen_settings(16, temperature=1.0, seed=9, mode="off")] * 4)
    assert other[0].tokens != first[0].tokens


def test_stop_budget_and_cancel_through_the_step_outputs(make_tiny) -> None:
    """Tokens and finishes arrive by one route, ``step``'s outputs: a sequence done at its first token is
    reported (finished) by the next step, never taking a slot; a stop token and a cancel end the others;
    a cancelled sequence is reported no more."""
    lm = make_tiny("llama")
    dec = EarlyExitDecoder(lm)
    batch = BatchDecoder(dec, max_batch_size=2)
    p = prompts(1)[0]
    one = batch.add(p, gen_settings(1, mode="off"))  # done at its first token: never takes a slot
    assert one.done
    assert one.generation.finish_reason == "length"
    assert batch.free_slots == 2
    (out,) = batch.step()
    assert (out.seq, out.tokens, out.finish) == (one, tuple(one.generation.trace), "length")
    assert batch.step() == []
    ref = dec.generate(p, gen_settings(10, mode="off")).tokens
    stop = GenerationSettings(max_new_tokens=10, stop_token_ids=(ref[3],), exit=ExitSettings(mode="off"))
    seen: list[int] = []
    stopped = batch.add(p, stop)
    aborted = batch.add(p, gen_settings(10, mode="off"))
    finished: list[SequenceRun] = []
    while batch.running:
        for out in batch.step():
            if out.seq is aborted:
                seen += [t.token for t in out.tokens]
            if out.finish is not None:
                finished.append(out.seq)
        if len(seen) >= 5 and not aborted.done:
            batch.cancel(aborted)
    assert {id(s) for s in finished} == {id(stopped)}  # the cancelled one is not reported
    assert stopped.generation.tokens == ref[: ref.index(ref[3]) + 1]
    assert stopped.generation.finish_reason == "stop"
    assert aborted.generation.tokens == seen == ref[:5]
    assert aborted.generation.finish_reason == "abort"


def test_refuses_bad_input(make_tiny) -> None:
    dec = EarlyExitDecoder(make_tiny("llama"))
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchDecoder(dec, 0)
    batch = BatchDecoder(dec, 1)
    with pytest.raises(ValueError, match="empty"):
        batch.add([])
    with pytest.raises(ValueError, match="context is 128"):
        batch.add([5] * 128)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.add([5, 64])
    with pytest.raises(ValueError, match="min_layer=4"):
        batch.add([5, 6], gen_settings(4, mode="approximate", min_layer=4))
    assert batch.free_slots == 1
    batch.add([5, 6], gen_settings(4, mode="off"))
    with pytest.raises(RuntimeError, match="full"):
        batch.add([5, 6], gen_settings(4, mode="off"))


def test_context_limit_in_a_batch(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    long_prompt = prompts(1)[0] * 60
    ps = [long_prompt[:120], prompts(1)[0]]
    sets = [gen_settings(40, mode="exact", draft="exit", threshold=0.3),
            gen_settings(12, mode="approximate", threshold=0.4)]
    batched = BatchDecoder(dec, 2).generate(ps, sets)
    assert (len(batched[0].tokens), batched[0].finish_reason) == (8, "length")  # 128 positions in all
    for p, s, b in zip(ps, sets, batched, strict=True):
        assert_same(b, dec.generate(p, s))


def test_batch_of_one_runs_the_single_runners_path(make_tiny) -> None:
    """With one row the cache hands out plain slices and SDPA gets no mask, as in the single runner."""
    lm = make_tiny("qwen2")
    runner = LayerRunner(lm)
    assert runner.windows == [None] * lm.num_layers
    dec = EarlyExitDecoder(lm)
    p = prompts(1)[0]
    s = gen_settings(12, mode="off")
    assert BatchDecoder(dec, 1).generate([p], s)[0].trace == dec.generate(p, s).trace  # bit-identical


def test_batch_bench_runs_end_to_end_on_a_tiny_model(make_tiny, tmp_path) -> None:
    from shortcuts.lab import batch_bench

    lm = sharpen(make_tiny("llama"))
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(f'{{"text": "{t}"}}\n' for t in ("the city", "a war film of the north", "the old king")))
    args = batch_bench.parse_args(["--prompts", str(path), "--sizes", "1,2", "--new-tokens", "5", "--repeats", "1",
                                   "--thresholds", "0.3", "--exact-thresholds", "0.3", "--min-layer", "1"])
    rows = batch_bench.run(args, lm, fitted_jump(lm))
    assert [(r.size, r.name) for r in rows] == [(n, name) for n in (1, 2)
                                                for name in ("off", "approximate t=0.3", "exact t=0.3")]
    assert all(r.same == r.size for r in rows)  # batched and one-at-a-time tokens agree
    text = batch_bench.report(lm, args, rows)
    assert "| 2 | exact t=0.3 |" in text
