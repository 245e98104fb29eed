"""The early-exit engine on tiny random models of every architecture: runner, cache, exit head,
gates, settings, and the decoder's modes against Hugging Face and against each other.

The tiny models are random, so their heads are near uniform (max-prob ~1/64) and the identity
shortcut never looks confident. ``sharpen`` scales the final norm (which only feeds the head) so
the model makes confident predictions, and ``fitted_jump`` fits a real low-rank jump to the
model's own states by least squares, so exits are a mix of right and wrong."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from support.models import (
    PROMPT,
    arch_params,
    build_tiny,
    catch_up,
    check_catchup_invariants,
    decode_alone,
    fitted_jump,
    prompt_ids,
    settings,
    sharpen,
)

from shortcuts.adapter import CausalLM
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.decoder import EarlyExitDecoder, Generation
from shortcuts.engine.exit_head import ExitGate, ExitHead, confidence_and_top, entropy, to_host
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.sampling import distribution, make_generator, speculative_accept
from shortcuts.engine.sequence import SequenceRun
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import JumpConfig, LowRankJumps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=arch_params())
def sharp(request: pytest.FixtureRequest) -> tuple[CausalLM, EarlyExitDecoder]:
    lm = sharpen(build_tiny(request.param))
    return lm, EarlyExitDecoder(lm, fitted_jump(lm))


# --- cache and masks ---------------------------------------------------------------------------------
def test_static_cache_writes_crops_and_never_grows() -> None:
    cache = KVCache(num_layers=2, num_rows=1, capacity=9, kv_heads=2, head_dim=4, dtype=torch.float32,
                    devices=["cpu", "cpu"])
    keys = [cache.keys[0], cache.keys[1]]
    chunks = [torch.randn(1, 2, q, 4) for q in (3, 1, 5)]
    start = 0
    for c in chunks:
        call = RowCall([0], [start], [c.shape[2]], c.shape[2], torch.device("cpu"))
        k, v = cache.write(0, call, c, -c)
        start += c.shape[2]
    assert torch.equal(k, torch.cat(chunks, dim=2))
    assert torch.equal(v, -k)
    assert (cache.length(0), cache.length(1)) == (9, 0)  # layers are independent
    cache.crop_row(0, 4)
    new = torch.randn(1, 2, 2, 4)
    k, _ = cache.write(0, RowCall([0], [4], [2], 2, torch.device("cpu")), new, new)  # overwrites cropped positions
    assert torch.equal(k, torch.cat([chunks[0], chunks[1], new], dim=2))
    assert cache.keys[0] is keys[0]  # the buffers were allocated once
    with pytest.raises(ValueError, match="capacity 9"):
        cache.write(1, RowCall([0], [0], [10], 10, torch.device("cpu")), torch.randn(1, 2, 10, 4),
                    torch.randn(1, 2, 10, 4))
    with pytest.raises(ValueError, match="length=-1"):
        cache.crop_row(0, -1)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_mask_is_causal_with_window(window: int | None) -> None:
    start, q = 5, 3
    mask = RowCall([0], [start], [q], q, torch.device("cpu")).mask(window)
    kv = start + q
    assert mask is not None
    assert mask.shape == (1, 1, q, kv)
    for j in range(q):
        for k in range(kv):
            pos = start + j
            visible = k <= pos and (window is None or pos - k < window)
            assert bool(mask[0, 0, j, k]) == visible, (j, k)
    assert RowCall([0], [7], [1], 1, torch.device("cpu")).mask(None) is None
    assert RowCall([0], [7], [1], 1, torch.device("cpu")).mask(3) is not None


# --- the layer runner --------------------------------------------------------------------------------
def test_runner_reproduces_hf_logits(tiny_lm: CausalLM) -> None:
    """Prefill, token by token, and uneven chunks all give the HF model's logits (20 tokens:
    longer than Gemma's sliding window of 8)."""
    ids = torch.randint(4, tiny_lm.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_lm.model(ids).logits
    runner = LayerRunner(tiny_lm)
    prefill = runner.forward(ids, runner.new_cache())
    cache = runner.new_cache()
    one_by_one = torch.cat([runner.forward(ids[:, t : t + 1], cache) for t in range(20)], dim=1)
    cache = runner.new_cache()
    chunks = torch.cat([runner.forward(ids[:, a:b], cache) for a, b in ((0, 7), (7, 9), (9, 20))], dim=1)
    for out in (prefill, one_by_one, chunks):
        assert torch.allclose(out, ref, atol=1e-4)


def test_runner_handles_a_batch(tiny_lm: CausalLM) -> None:
    ids = torch.randint(4, tiny_lm.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = tiny_lm.model(ids).logits
    runner = LayerRunner(tiny_lm)
    cache = runner.new_cache(3)
    out = torch.cat([runner.forward(ids[:, :5], cache), runner.forward(ids[:, 5:], cache)], dim=1)
    assert torch.allclose(out, ref, atol=1e-4)


def test_sliding_window_matters_for_gemma() -> None:
    """Without its window the Gemma runner disagrees with HF: the window test above has teeth."""
    lm = build_tiny("gemma3_text")
    runner = LayerRunner(lm)
    assert runner.windows == [8] * 4
    ids = torch.randint(4, lm.vocab_size, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = lm.model(ids).logits
    runner.windows = [None] * 4
    out = runner.forward(ids, runner.new_cache())
    assert torch.allclose(out[:, :8], ref[:, :8], atol=1e-4)  # inside the window nothing changes
    assert not torch.allclose(out[:, 8:], ref[:, 8:], atol=1e-3)


def test_runner_refuses_non_contiguous_positions(tiny_lm: CausalLM) -> None:
    runner = LayerRunner(tiny_lm)
    cache = runner.new_cache()
    runner.forward(torch.tensor([[5, 6, 7]]), cache)
    chunk = runner.embed(torch.tensor([[8]]), start=4)
    with pytest.raises(RuntimeError, match="contiguous"):
        runner.layer(0, chunk, cache)


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_warm_up_runs_every_call_kind_on_any_number_of_rows(rows: int, make_tiny: Callable[..., CausalLM]) -> None:
    """Every call kind of the warm-up fits the rows asked for (it once built a 3-row call whatever the
    number), eagerly here: the compiled path is the same calls (``test_compiled_blocks_decode_the_same_tokens``)."""
    runner = LayerRunner(make_tiny("qwen2"))
    assert runner.warm_up(rows) >= 0.0


def test_compiling_scopes_its_settings() -> None:
    """Compiling raises dynamo's per-function graph limit and points inductor's cache at onejump's, for the
    compile only: both are as they were afterwards."""
    import os

    import torch._dynamo

    from shortcuts.engine.runner import INDUCTOR_CACHE, compiling

    limit, cache = torch._dynamo.config.cache_size_limit, os.environ.get(INDUCTOR_CACHE)
    with compiling():
        assert torch._dynamo.config.cache_size_limit >= 64
        assert os.environ[INDUCTOR_CACHE] == cache or os.environ[INDUCTOR_CACHE].endswith("inductor")
    assert (torch._dynamo.config.cache_size_limit, os.environ.get(INDUCTOR_CACHE)) == (limit, cache)


def test_fill_kv_writes_the_layers_own_keys_and_values(tiny_lm: CausalLM) -> None:
    """The copy policy's fill, given a layer's true input, writes what the layer itself writes."""
    runner = LayerRunner(tiny_lm)
    ids = torch.randint(4, tiny_lm.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    exact, filled = runner.new_cache(), runner.new_cache()
    chunk = runner.embed(ids, 0)
    for i in range(tiny_lm.num_layers):
        runner.fill_kv(i, chunk.h, chunk.call(), filled)
        runner.layer(i, chunk, exact)
        for a, b in zip(exact.row_kv(i), filled.row_kv(i), strict=True):
            assert torch.allclose(a, b, atol=1e-6)


# --- exit head and gates -----------------------------------------------------------------------------
def _random_jump(lm: CausalLM, form: str, n: int = 1, seed: int = 0) -> LowRankJumps:
    torch.manual_seed(seed)
    jump = LowRankJumps(JumpConfig(lm.hidden_size, 8, form=form), n=n)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in jump.parameters():
            p.add_(0.3 * torch.randn_like(p))
        jump.running_mean.normal_()
        jump.running_var.uniform_(0.5, 2.0)
    return jump.eval()


@pytest.mark.parametrize("form", ["pure", "residual"])
def test_exit_head_equals_head_of_jump(tiny_lm: CausalLM, form: str) -> None:
    jump = _random_jump(tiny_lm, form)
    head = ExitHead(tiny_lm, jump)
    assert head.kind == ("fused" if form == "pure" else "full")
    h = 3 * torch.randn(5, tiny_lm.hidden_size)
    with torch.no_grad():
        ref = tiny_lm.head(jump(h[None])[0])
    for level in tiny_lm.exit_levels:
        assert torch.allclose(head(h, level), ref, atol=1e-4)


def test_exit_head_bank_uses_one_jump_per_level_and_identity(tiny_lm: CausalLM) -> None:
    L = tiny_lm.num_layers
    bank = _random_jump(tiny_lm, "pure", n=L - 1)
    head = ExitHead(tiny_lm, bank)
    h = torch.randn(2, tiny_lm.hidden_size)
    for level in tiny_lm.exit_levels:
        with torch.no_grad():
            ref = tiny_lm.head(bank.select(level - 1)(h[None])[0])
        assert torch.allclose(head(h, level), ref, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(ExitHead(tiny_lm, None)(h, 1), tiny_lm.head(h), atol=1e-4)
    with pytest.raises(ValueError, match="1 jump or one per level"):
        ExitHead(tiny_lm, _random_jump(tiny_lm, "pure", n=2))  # L - 1 = 3
    with pytest.raises(ValueError, match="level=4"):
        head(h, L)


def test_gates() -> None:
    peaked = torch.tensor([50.0, 0.0, 0.0])  # softmax max-prob rounds to exactly 1.0
    flat = torch.zeros(3)
    assert float(torch.softmax(peaked, -1).max()) == 1.0
    def fires(gate: ExitGate, logits: torch.Tensor) -> bool:
        """The gate on one row of exit logits, given what the engine computes at a check."""
        ((top, conf),) = to_host(*confidence_and_top(logits[None]))
        return gate.decide(conf, top, float(entropy(logits)))

    never = ExitGate(ExitSettings(threshold=1.0))
    assert to_host(*confidence_and_top(peaked[None])) == [(0, 1.0)]
    assert not fires(never, peaked)  # threshold 1.0 never exits, even at probability 1
    conf = ExitGate(ExitSettings(threshold=0.5))
    assert fires(conf, peaked)
    assert not fires(conf, flat)
    ent = ExitGate(ExitSettings(gate="entropy", threshold=0.5))
    assert fires(ent, peaked)
    assert not fires(ent, flat)  # entropy log(3) = 1.1 nats
    assert float(entropy(flat)) == pytest.approx(torch.log(torch.tensor(3.0)).item())
    pat = ExitGate(ExitSettings(gate="patience", patience=3))
    other = torch.tensor([0.0, 1.0, 0.0])
    assert [fires(pat, x) for x in (peaked, peaked, other, other, other)] == [False, False, False, False, True]
    pat.reset()
    assert not fires(pat, other)


# --- settings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"mode": "fast"}, "mode='fast'"),
    ({"gate": "margin"}, "gate='margin'"),
    ({"threshold": 1.5}, r"threshold=1.5 must be in \[0, 1\]"),
    ({"threshold": -0.1}, r"threshold=-0.1 must be in \[0, 1\]"),
    ({"threshold": float("nan")}, "finite"),
    ({"gate": "entropy", "threshold": -1.0}, "nats"),
    ({"patience": 0}, "patience=0"),
    ({"min_layer": 0}, "min_layer=0"),
    ({"stride": 0}, "stride=0"),
    ({"kv_policy": "drop"}, "kv_policy='drop'"),
    ({"max_draft": 0}, "max_draft=0"),
    ({"mode": "exact", "kv_policy": "copy"}, "needs kv_policy='catchup'"),
])
def test_exit_settings_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ExitSettings(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"max_new_tokens": True}, "max_new_tokens=True"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.2}, "top_p=1.2"),
    ({"seed": -3}, "seed=-3"),
    ({"stop_token_ids": (1, -2)}, "stop_token_ids entry=-2"),
    ({"exit": "exact"}, "exit must be an ExitSettings"),
])
def test_generation_settings_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**kwargs)


def test_decoder_refuses_bad_prompts_and_levels(make_tiny: Callable[..., CausalLM]) -> None:
    dec = EarlyExitDecoder(make_tiny("llama"))
    with pytest.raises(ValueError, match="empty"):
        dec.generate([])
    with pytest.raises(ValueError, match="context is 128"):
        dec.generate([5] * 128)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        dec.generate([5, 64])
    with pytest.raises(ValueError, match=r"min_layer=4 must be in \[1, 3\]"):
        dec.generate([5, 6], settings(mode="approximate", min_layer=4))
    with pytest.raises(ValueError, match="d=16"):
        EarlyExitDecoder(make_tiny("llama"), LowRankJumps(JumpConfig(16, 4)))


# --- decoding ----------------------------------------------------------------------------------------
def test_mode_off_matches_hf_generate(tiny_lm: CausalLM) -> None:
    """Greedy tokens and per-step logits (via their max-probabilities) match HF's generate."""
    ids = prompt_ids(tiny_lm)
    with torch.no_grad():
        out = tiny_lm.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=20, output_logits=True,
                                     return_dict_in_generate=True)
    ref = out.sequences[0, len(ids):].tolist()
    gen = EarlyExitDecoder(tiny_lm).generate(ids, GenerationSettings(max_new_tokens=20, exit=ExitSettings(mode="off")))
    assert gen.tokens == ref
    assert gen.finish_reason == ("stop" if ref[-1] == 3 else "length")
    for t, logits in zip(gen.trace, out.logits, strict=True):
        assert t.kind == "full"
        assert t.exit_layer == tiny_lm.num_layers
        assert t.confidence == pytest.approx(float(torch.softmax(logits[0], -1).max()), abs=1e-5)


def _off(dec: EarlyExitDecoder, ids: list[int], n: int = 24) -> Generation:
    return dec.generate(ids, settings(n, mode="off"))


def test_exact_mode_equals_off(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """Self-speculative greedy decoding gives the full model's tokens, whatever the drafts did."""
    lm, dec = sharp
    ids = prompt_ids(lm)
    ref = _off(dec, ids).tokens
    drafted = rejected = 0
    for threshold, min_layer, max_draft in ((0.0, 1, 4), (0.3, 1, 4), (0.5, 2, 2), (0.7, 1, 8), (1.0, 1, 4)):
        gen = dec.generate(ids, settings(mode="exact", draft="exit", threshold=threshold, min_layer=min_layer,
                                         max_draft=max_draft))
        assert gen.tokens == ref, threshold
        s = gen.stats
        assert s.accepted == sum(t.kind == "accepted" for t in gen.trace)
        assert s.accepted <= s.drafted
        drafted += s.drafted
        rejected += s.drafted - s.accepted
        if threshold == 1.0:
            assert s.drafted == 0
    assert drafted > 20  # the runs above drafted, and the full model both accepted and rejected
    assert 0 < rejected < drafted


def test_approximate_tokens_come_from_the_heads_that_decided(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """With catch-up, every state equals the full model's state on the final sequence, so each
    token can be re-derived: an exited token is the argmax of the exit head at its level on the
    HF hidden state, a full token the argmax of the HF logits; the gate fired at exactly that level."""
    lm, dec = sharp
    ids = prompt_ids(lm)
    threshold = 0.4
    gen = dec.generate(ids, settings(mode="approximate", threshold=threshold))
    assert 0 < sum(t.kind == "exited" for t in gen.trace) < len(gen.trace)
    seq = torch.tensor([ids + gen.tokens])
    with torch.no_grad():
        out = lm.model(seq, output_hidden_states=True)
    for k, t in enumerate(gen.trace):
        p = len(ids) + k - 1  # the position whose prediction this token is
        if t.kind == "full":
            assert t.token == int(out.logits[0, p].argmax())
            continue
        exit_logits = dec.exit_head(out.hidden_states[t.exit_layer][0, p : p + 1], t.exit_layer)[0]
        assert t.token == int(exit_logits.argmax())
        assert t.confidence >= threshold
        for level in range(1, t.exit_layer):  # no earlier level was confident enough
            earlier = dec.exit_head(out.hidden_states[level][0, p : p + 1], level)
            assert float(torch.softmax(earlier, -1).max()) < threshold


def test_catchup_caches_cover_every_token_exactly(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """After approximate decoding each layer covers every token but the pending ones; after a flush
    every layer holds exactly the keys/values a full prefill of the same tokens computes."""
    lm, dec = sharp
    ids = prompt_ids(lm)
    skipped = 0
    for threshold in (0.3, 0.5):
        gen, cache, seq = decode_alone(dec, ids, settings(mode="approximate", threshold=threshold))
        skipped += gen.stats.layers_skipped
        fed = ids + gen.tokens[:-1]
        assert seq.length == len(fed)
        check_catchup_invariants(cache, seq, dec.num_layers)
        catch_up(dec.runner, cache, seq)
        assert not seq.pending
        ref = dec.runner.new_cache()
        dec.runner.forward(torch.tensor([fed]), ref)
        for i in range(lm.num_layers):
            for a, b in zip(cache.row_kv(i, seq.row), ref.row_kv(i), strict=True):
                assert torch.allclose(a, b, atol=1e-4), i
    assert skipped > 0


def test_exact_mode_keeps_caches_consistent(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    ids = prompt_ids(lm)
    gen, cache, seq = decode_alone(dec, ids, settings(mode="exact", draft="exit", threshold=0.3))
    assert gen.stats.drafted > gen.stats.accepted  # some rejections, so some crops happened
    check_catchup_invariants(cache, seq, dec.num_layers)
    catch_up(dec.runner, cache, seq)
    ref = dec.runner.new_cache()
    fed = ids + gen.tokens[: seq.length - len(ids)]
    dec.runner.forward(torch.tensor([fed]), ref)
    for i in range(lm.num_layers):
        assert torch.allclose(cache.row_kv(i, seq.row)[0], ref.row_kv(i)[0], atol=1e-4)


def test_copy_policy_fills_skipped_layers_at_once(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    ids = prompt_ids(lm)
    gen, cache, seq = decode_alone(dec, ids, settings(mode="approximate", threshold=0.4, kv_policy="copy"))
    assert gen.stats.kv_fills > 0
    assert not seq.pending
    assert [cache.length(i, seq.row) for i in range(lm.num_layers)] == [seq.length] * lm.num_layers
    ref = dec.runner.new_cache()
    dec.runner.forward(torch.tensor([ids + gen.tokens[:-1]]), ref)
    deepest = lm.num_layers - 1  # copied keys there are approximations, not the full model's
    assert not torch.allclose(cache.row_kv(deepest, seq.row)[0], ref.row_kv(deepest)[0], atol=1e-3)


@pytest.mark.parametrize("kv_policy", ["catchup", "copy"])
def test_without_exits_every_mode_equals_off(sharp: tuple[CausalLM, EarlyExitDecoder], kv_policy: str) -> None:
    lm, dec = sharp
    ids = prompt_ids(lm)
    ref = _off(dec, ids).tokens
    modes = ["approximate", "exact"] if kv_policy == "catchup" else ["approximate"]
    for mode in modes:
        gen = dec.generate(ids, settings(mode=mode, threshold=1.0, kv_policy=kv_policy, draft="exit"))
        assert gen.tokens == ref
        assert gen.stats.exit_checks == 0  # a confidence threshold of 1.0 cannot fire: nothing is checked
        assert gen.stats.layers_skipped == gen.stats.kv_fills == gen.stats.drafted == 0
        unreachable = dec.generate(ids, settings(mode=mode, gate="entropy", threshold=0.0, kv_policy=kv_policy,
                                                 draft="exit"))
        assert unreachable.tokens == ref
        assert unreachable.stats.exit_checks > 0


def test_min_layer_and_stride_limit_the_exit_levels(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    gen = dec.generate(prompt_ids(lm), settings(mode="approximate", threshold=0.0, min_layer=2, stride=5))
    assert {t.exit_layer for t in gen.trace[1:]} == {2}  # threshold 0: exit at the first check
    assert gen.stats.exit_checks == len(gen.trace) - 1


def test_stop_tokens_and_context_limit(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    ids = prompt_ids(lm)
    ref = _off(dec, ids).tokens
    stop = ref[5]
    first = ref.index(stop)
    for mode in ("off", "approximate", "exact"):
        s = GenerationSettings(max_new_tokens=24, stop_token_ids=(stop,), exit=ExitSettings(mode=mode, threshold=0.9))
        gen = dec.generate(ids, s)
        assert stop not in gen.tokens[:-1]
        assert (gen.tokens[-1] == stop) == (gen.finish_reason == "stop")
        if mode != "approximate":  # approximate decoding may pick other tokens
            assert gen.tokens == ref[: first + 1]
    long_prompt = (ids * 20)[:120]
    gen = dec.generate(long_prompt, settings(40, mode="exact", threshold=0.3))
    assert (len(gen.tokens), gen.finish_reason) == (8, "length")  # 128 positions in all


# --- sampling ----------------------------------------------------------------------------------------
def test_distribution_temperature_and_top_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(distribution(logits, 1.0), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    assert torch.allclose(distribution(logits, 1.0, top_p=0.7), torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    assert torch.allclose(distribution(logits, 1.0, top_p=0.1), torch.tensor([1.0, 0, 0, 0]))
    assert torch.equal(distribution(logits, 0.0), torch.tensor([1.0, 0, 0, 0]))
    cold = distribution(logits, 0.5)
    assert cold[0] > 0.5
    assert float(cold.sum()) == pytest.approx(1.0)


def test_speculative_accept_samples_the_target_distribution() -> None:
    p = torch.tensor([0.1, 0.6, 0.3, 0.0])
    q = torch.tensor([0.4, 0.1, 0.2, 0.3])
    gen = make_generator(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=gen))
        fix = speculative_accept(p, q, draft, gen)
        counts[draft if fix is None else fix] += 1
    assert torch.allclose(counts / n, p, atol=0.015)


def test_sampling_is_seeded_and_works_with_exits(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    ids = prompt_ids(lm)
    for mode in ("off", "approximate", "exact"):
        def run(seed: int, top_p: float = 1.0, mode: str = mode) -> list[int]:
            s = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=top_p, seed=seed, stop_token_ids=(),
                                   exit=ExitSettings(mode=mode, threshold=0.5))
            return dec.generate(ids, s).tokens
        assert run(1) == run(1)
        assert len({tuple(run(seed)) for seed in range(4)}) > 1
        greedy = dec.generate(ids, settings(16, mode=mode, threshold=0.5)).tokens
        assert run(7, top_p=1e-6) == greedy  # top-p that keeps one token is greedy


def test_bench_runs_end_to_end_on_a_tiny_model(make_tiny: Callable[..., CausalLM]) -> None:
    from shortcuts.lab import micro_bench as bench

    lm = sharpen(make_tiny("llama"))
    args = bench.parse_args(["--new-tokens", "6", "--thresholds", "0.3", "--min-layer", "1", "--repeats", "2",
                             "--prompt", PROMPT])
    rows = bench.decode_rows(lm, fitted_jump(lm), args)
    names = [r[0] for r in rows]
    assert names == ["HF generate", "HF assistant_early_exit=1", "off", "approximate t=0.3", "approximate-copy t=0.3",
                     "exact t=0.3"]
    assert rows[0][2] == rows[-1][2].tokens  # HF and exact mode agree
    text = bench.report(lm, bench.micro(lm, fitted_jump(lm), repeats=2), rows)
    assert "exit head (fused)" in text
    assert "exact t=0.3" in text


def test_step_outputs_stream_and_cancel_stops(make_tiny: Callable[..., CausalLM]) -> None:
    """Tokens arrive through the batch's step outputs, in order; cancelling stops the sequence there."""
    lm = make_tiny("llama")
    dec = EarlyExitDecoder(lm)
    ids = lm.tokenizer(PROMPT)["input_ids"]
    settings = GenerationSettings(max_new_tokens=10, stop_token_ids=(), exit=ExitSettings(mode="off"))
    full = dec.generate(ids, settings)

    def stream(cut_at: int | None) -> tuple[list[int], SequenceRun]:
        batch, seen = dec.batch(1), []
        seq = batch.add(ids, settings)
        while batch.running or not seen:
            seen += [t.token for out in batch.step() for t in out.tokens]
            if cut_at is not None and len(seen) >= cut_at:
                batch.cancel(seq)
        return seen, seq

    seen, seq = stream(None)
    assert seen == full.tokens
    seen, cut = stream(4)
    assert cut.generation.finish_reason == "abort"
    assert cut.generation.tokens == seen == full.tokens[:4]


# --- the contract with transformers, and compiled blocks -------------------------------------------------
def test_load_refuses_a_runner_that_does_not_reproduce_the_model(make_tiny: Callable[..., CausalLM]) -> None:
    """The self-check compares onejump's block math with the model's own logits: a model whose
    forward differs from what the engine computes (here: one weight changed behind the engine's
    back, as a transformers release changing a block's math would) is refused at load."""
    lm = make_tiny("llama")
    runner = LayerRunner(lm)
    check = runner.self_check()
    assert check.math < 1e-5
    assert check.error == check.math  # format "none": the dense model is the reference
    down = lm.layers[1].mlp.down_proj
    down.weight = torch.nn.Parameter(down.weight.detach() * 1.5)  # the model changes; the runner's copy does not
    from shortcuts.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="does not reproduce"):
        runner.self_check()


@pytest.mark.parametrize(("change", "match"), [
    ({"partial_rotary_factor": 0.5}, "partial rotary"),
    ({"hidden_act": "relu"}, "activation 'relu'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling"),
])
def test_unsupported_features_are_refused_by_name(change: dict, match: str) -> None:
    from shortcuts.engine.blocks import unsupported

    config = build_tiny("llama").config
    assert unsupported(config) == []
    for key, value in change.items():
        setattr(config, key, value)
    assert any(match in p for p in unsupported(config))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])  # plain, and q/k norms + sliding windows
def test_compiled_blocks_decode_the_same_tokens(arch: str) -> None:
    """torch.compile'd blocks (one graph for every layer) give the eager engine's tokens and exits,
    alone and in a batch with catch-up chunks."""
    from shortcuts.engine.batch import BatchDecoder

    lm = sharpen(build_tiny(arch))
    dec = EarlyExitDecoder(lm, fitted_jump(lm))
    compiled = EarlyExitDecoder(lm, dec.exit_head.jump, compile=True)
    assert compiled.compile_seconds > 0
    ids = prompt_ids(lm)
    for kw in ({"mode": "off"}, {"mode": "approximate", "threshold": 0.3},
               {"mode": "exact", "draft": "exit", "threshold": 0.3}):
        a, b = dec.generate(ids, settings(**kw)), compiled.generate(ids, settings(**kw))
        assert a.tokens == b.tokens
        assert [t.exit_layer for t in a.trace] == [t.exit_layer for t in b.trace]
    ps = [ids, ids[:5], ids[:9]]
    s = settings(16, mode="approximate", threshold=0.3)
    assert [g.tokens for g in BatchDecoder(dec, 3).generate(ps, s)] == \
        [g.tokens for g in BatchDecoder(compiled, 3).generate(ps, s)]


def test_distribution_survives_extreme_temperature_and_top_p() -> None:
    """A top_p that rounds to 0 in float32 and a temperature that overflows the logits keep the
    most likely token instead of turning into NaN (the sampler then fails in multinomial)."""
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 5
    for temperature, top_p in ((1.0, 1e-300), (1e-30, 1.0), (1e-300, 1.0), (1e-30, 1e-300), (2.0, 5e-324)):
        d = distribution(logits, temperature, top_p)
        assert torch.isfinite(d).all()
        assert int(d.argmax()) == int(logits.argmax())
        assert float(d.sum()) == pytest.approx(1.0)


def test_quantized_weights_are_refused_with_a_message(make_tiny: Callable[..., CausalLM]) -> None:
    """Integer (a pre-quantized checkpoint's) weights in the blocks: refused with what to do instead (load
    the dense model, choose the engine's weight format), never decoded wrongly."""
    from shortcuts.errors import UnsupportedModelError

    lm = make_tiny("llama")
    proj = lm.layers[0].self_attn.q_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="already quantized.*ONEJUMP_QUANTIZATION"):
        LayerRunner(lm)
