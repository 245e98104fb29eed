"""Exact mode's draft sources (``shortcuts.engine.drafts``): the n-gram index and the auto policy's
arithmetic on small inputs, the one-hot acceptance rule with fixed seeds, then decoding on tiny
random models of every architecture (exact mode with every draft policy gives mode off's tokens,
greedy and seeded sampling, alone and batched, and keeps the caches the full model's), and the real
SmolLM2 on a grounded chat request."""

from __future__ import annotations

import random

import pytest
import torch
from support.models import arch_params, build_tiny, decode_alone, fitted_jump, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.engine.batch import BatchDecoder
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.drafts import (
    MARGIN,
    Acceptance,
    Drafter,
    NgramIndex,
    Plan,
    StepCosts,
    _monotone,
    batch_cap,
    expected_tokens,
)
from shortcuts.engine.sampling import make_generator, pick
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.prompts import encode

pytestmark = pytest.mark.usefixtures("one_torch_thread")
POLICIES = ("auto", "ngram", "exit", "none")


# --- the n-gram index ---------------------------------------------------------------------------------
def brute_force(history: list[int], k: int, min_n: int, max_n: int) -> tuple[list[int], int]:
    """Prompt lookup by scanning: the longest suffix (max_n..min_n) with an earlier occurrence that
    has a next token; the tokens after its latest such occurrence."""
    size = len(history)
    for n in range(min(max_n, size), min_n - 1, -1):
        suffix = history[size - n :]
        for start in range(size - n - 1, -1, -1):  # latest first; the occurrence must end before the last token
            if history[start : start + n] == suffix:
                return history[start + n : start + n + k], n
    return [], 0


@pytest.mark.parametrize(("min_n", "max_n"), [(1, 4), (2, 3), (1, 1), (3, 5)])
def test_ngram_index_matches_a_scan_token_by_token(min_n: int, max_n: int) -> None:
    rng = random.Random(min_n * 10 + max_n)
    for _ in range(20):
        vocab = rng.choice([3, 5, 12])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        split = rng.randint(1, len(tokens))
        index = NgramIndex(tokens[:split], min_n, max_n)
        for j in range(split, len(tokens) + 1):
            k = rng.randint(1, 6)
            assert index.propose(k) == brute_force(tokens[:j], k, min_n, max_n)
            if j < len(tokens):
                index.extend([tokens[j]])


def test_ngram_index_prefers_the_longest_then_the_latest_match() -> None:
    index = NgramIndex([1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3], min_n=1, max_n=3)
    assert index.propose(2) == ([7, 8], 2)  # "2 3" last seen before 7 8; "5 2 3" never seen
    index.extend([7])
    assert index.propose(4) == ([8, 5, 2, 3], 3)  # "2 3 7"
    assert NgramIndex([4, 5, 6], 1, 2).propose(3) == ([], 0)  # 6 never came before
    with pytest.raises(ValueError, match="ngram range"):
        NgramIndex([1], 3, 2)


# --- the acceptance rule ------------------------------------------------------------------------------
def test_a_one_hot_draft_is_kept_with_the_targets_probability_and_the_law_is_the_target() -> None:
    """Leviathan et al. with q = one-hot(t): keep t with probability min(1, p(t)/1) = p(t), else draw from
    max(p - q, 0), i.e. p without t. Verification instead draws x ~ p and keeps t iff x == t: the same
    law (P(t) = p(t), P(x != t) = p(x)), and exactly one draw per position, as plain decoding."""
    p = torch.tensor([0.1, 0.5, 0.25, 0.15, 0.0])
    logits = torch.log(p.clamp_min(1e-30))
    n = 20000
    for draft in (1, 3, 4):
        gen = make_generator(draft)
        counts, kept = torch.zeros(5), 0
        for _ in range(n):
            x = pick(logits, 1.0, 1.0, gen)
            kept += x == draft
            counts[x] += 1
        assert kept / n == pytest.approx(float(p[draft]), abs=0.012)
        assert torch.allclose(counts / n, p, atol=0.012)
        # the residual after a rejection is p with the draft removed, renormalised (Leviathan's max(p - q, 0))
        rejected = counts.clone()
        rejected[draft] = 0
        residual = (p - torch.nn.functional.one_hot(torch.tensor(draft), 5)).clamp_min(0)
        assert torch.allclose(rejected / rejected.sum(), residual / residual.sum(), atol=0.015)
    a, b = make_generator(5), make_generator(5)  # one draw, whatever the distribution: the streams stay aligned
    pick(logits, 1.0, 1.0, a)
    pick(torch.randn(5), 0.7, 1.0, b)
    assert torch.equal(a.get_state(), b.get_state())


# --- the auto policy's arithmetic -----------------------------------------------------------------------
def test_expected_tokens_and_monotone_costs() -> None:
    assert expected_tokens(0.5, 3) == [1.0, 1.5, 1.75, 1.875]
    assert expected_tokens(1.0, 2) == [1.0, 2.0, 3.0]
    assert _monotone([1.0, 1.3, 0.9, 1.2, 2.0]) == pytest.approx([1.0, 1.1, 1.1, 1.2, 2.0])
    costs = StepCosts((1, 4, 16), (1.0, 1.0, 4.0), (0.5, 0.5, 0.5), 0.1, 10)
    assert costs.step(1) == 1.5
    assert costs.step(10) == pytest.approx(3.0)
    assert costs.step(32) == pytest.approx(8.5)  # past the last size: its slope
    assert costs.layer == 0.1


def linear(num_layers: int = 4) -> StepCosts:
    """A chunk of q tokens costs q steps: drafting never pays."""
    return StepCosts((1, 2, 64), (1.0, 2.0, 64.0), (0.0, 0.0, 0.0), 0.25, num_layers)


def drafter(draft: str = "auto", costs: StepCosts | None = None, prompt: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 1, 2),
            levels: bool = False, **kw: int) -> Drafter:
    return Drafter(ExitSettings(mode="exact", draft=draft, **kw), prompt, levels, costs or StepCosts.flat(4))  # type: ignore[arg-type]


def test_auto_drafts_when_it_pays_and_adapts_its_length() -> None:
    free = drafter(max_draft=4)
    plan = free.plan(room=10, stop=set())
    assert (plan.source, plan.tokens, plan.n) == ("ngram", (3, 4, 5, 6), 2)  # "1 2" came before "3 4 5 6"
    assert drafter(costs=linear()).plan(10, set()).source is None  # a chunk costs its length: no draft pays
    assert drafter(max_draft=4).plan(room=2, stop={4}).tokens == (3, 4)  # the room; a drafted stop token ends it
    assert drafter(max_draft=4).plan(room=5, stop={4}).tokens == (3, 4)
    assert drafter(max_draft=4).plan(room=0, stop=set()).source is None
    # costs that grow with the chunk: the chosen length follows the measured acceptance
    steep = StepCosts((1, 2, 4, 8), (1.0, 1.1, 1.4, 2.4), (0.0,) * 4, 0.25, 4)
    d = drafter(costs=steep, max_draft=6, prompt=tuple(range(10, 20)) + (10, 11))
    lengths = []
    for accepted in (None, 0, 0, 0, 0):
        if accepted is not None:
            d.observe_ngram(2, 6, accepted)
        lengths.append(len(d.plan(10, set()).tokens))
    assert lengths[0] > 0
    assert lengths[-1] < lengths[0]  # rejected drafts shrink the draft, to nothing when nothing is kept
    for _ in range(8):
        d.observe_ngram(2, 6, 6)
    assert len(d.plan(10, set()).tokens) >= lengths[0]  # and accepted ones grow it back


def test_fixed_policies_and_exit_yield() -> None:
    assert drafter("ngram", costs=linear()).plan(10, set()).tokens == (3, 4, 5, 6, 1, 2)  # no cost test
    assert drafter("none").plan(10, set()).source is None
    assert drafter("exit", levels=True).plan(10, set()).source == "exit"
    assert drafter("exit", levels=False).plan(10, set()).source is None  # no check level (threshold 1.0)
    d = drafter(levels=True, prompt=(1, 2, 3))  # no n-gram match: the exit head is tried first
    assert d.plan(10, set()).source == "exit"
    d.observe_exit([], checks=3, accepted=0)  # the gate never fired: three checks for one token
    assert d.exit_yield.value() < MARGIN
    assert d.plan(10, set()).source is None
    again = Drafter(ExitSettings(mode="exact"), (1, 2, 3), True, StepCosts.flat(4), d_shared := d_stats(d))
    assert again.plan(10, set()).source is None  # a new row starts from what earlier rows measured
    assert d_shared.exit.value() < MARGIN


def d_stats(d: Drafter):  # the decoder-wide statistics a row updates
    from shortcuts.engine.drafts import DraftStats

    assert d.acceptance.shared is not None
    assert d.exit_yield.shared is not None
    return DraftStats(d.acceptance.shared, d.exit_yield.shared)


def test_acceptance_rates_start_from_priors_and_follow_observations() -> None:
    shared = Acceptance(0.98)
    row = Acceptance(0.8, shared)
    assert row.rate(4) == pytest.approx(shared.rate(4))
    assert shared.rate(1) < shared.rate(4)  # a short match is a weaker prior
    for _ in range(10):
        row.observe(4, 4, 0)
    assert row.rate(4) < 0.1
    assert shared.rate(4) < 0.2
    assert Acceptance(0.98).rate(4) > 0.5


def test_batch_cap_weighs_every_rows_tokens_against_the_padded_chunk() -> None:
    costs = StepCosts((1, 8, 64), (1.0, 1.0, 8.0), (0.0,) * 3, 0.1, 4)  # free up to 8 token rows, then linear
    cheap = StepCosts((1, 32), (1.0, 1.1), (0.0,) * 2, 0.1, 4)
    assert batch_cap([Plan("ngram", (1,) * 8, 3, tuple(expected_tokens(0.95, 8))), Plan(None)], cheap) == 8
    sure = Plan("ngram", (1,) * 8, 3, tuple(expected_tokens(0.95, 8)))
    unsure = Plan("ngram", (1,) * 8, 1, tuple(expected_tokens(0.1, 8)))
    assert batch_cap([sure], costs) is None  # one row: its own choice
    assert batch_cap([sure, Plan(None)], costs) == 3  # 2 x 4 token rows are free, more cost their share
    assert batch_cap([unsure] * 4, costs) == 1  # nearly nothing accepted: short chunks
    fixed = Plan("ngram", (1,) * 6, 2)  # the fixed "ngram" policy: its chunk is a floor, not capped
    assert batch_cap([unsure, fixed], costs) == 6


# --- decoding on tiny models ----------------------------------------------------------------------------
def gen_settings(n: int = 24, draft: str = "auto", temperature: float = 0.0, seed: int | None = None,
                 **exit_kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, temperature=temperature, seed=seed, stop_token_ids=(),
                              exit=ExitSettings(draft=draft, **exit_kw))  # type: ignore[arg-type]


@pytest.fixture(params=arch_params())
def sharp(request: pytest.FixtureRequest) -> tuple[CausalLM, EarlyExitDecoder]:
    lm = sharpen(build_tiny(request.param))
    return lm, EarlyExitDecoder(lm, fitted_jump(lm))


def grounded(n: int = 3, seed: int = 0, length: int = 24) -> list[list[int]]:
    """Prompts that repeat a random passage, so the model's continuation overlaps the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        passage = torch.randint(4, 64, (length // 2,), generator=g).tolist()
        out.append((passage * 3)[:length])
    return out


def test_every_draft_policy_gives_off_tokens_greedy_and_seeded(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    by_source: dict[str, int] = {}
    accepted = 0
    for ids in grounded(2) + [[5, 9, 14, 22]]:
        for sample in ({}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.6, "seed": 11}):
            s = dict(sample)
            ref = dec.generate(ids, gen_settings(mode="off", **s)).tokens
            for draft in POLICIES:
                gen = dec.generate(ids, gen_settings(mode="exact", draft=draft, threshold=0.4, max_draft=5, **s))
                assert gen.tokens == ref, (draft, sample)
                st = gen.stats
                assert st.drafted == sum(st.drafted_by.values())
                assert st.accepted == sum(st.accepted_by.values())
                assert set(st.drafted_by) <= ({"ngram", "exit"} if draft == "auto" else {draft} - {"none"})
                assert sum(t.kind == "accepted" for t in gen.trace) == st.accepted
                for src in ("ngram", "exit"):
                    assert sum(t.source == src for t in gen.trace) == st.accepted_by.get(src, 0)
                    by_source[src] = by_source.get(src, 0) + st.drafted_by.get(src, 0)
                accepted += st.accepted
                assert st.verifications == st.steps - st.drafted_by.get("exit", 0)  # a step drafts or verifies
    assert by_source["ngram"] > 0
    assert by_source["exit"] > 0
    assert accepted > 0


def test_ngram_rejections_crop_the_cache_to_the_full_models(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """After drafts were rejected and cropped, every layer holds what one prefill of the final tokens holds."""
    lm, dec = sharp
    ids = grounded(1, seed=5)[0]
    gen, cache, seq = decode_alone(dec, ids, gen_settings(30, mode="exact", draft="ngram", max_draft=6))
    assert gen.stats.drafted > gen.stats.accepted > 0  # some rejections, so some crops happened
    ref = dec.runner.new_cache()
    fed = ids + gen.tokens[: seq.length - len(ids)]
    assert seq.length == len(ids) + len(gen.tokens) - 1
    dec.runner.forward(torch.tensor([fed]), ref)
    for i in range(lm.num_layers):
        assert cache.length(i, seq.row) == seq.length
        assert torch.allclose(cache.row_kv(i, seq.row)[0], ref.row_kv(i)[0], atol=1e-4)


def test_batched_rows_draft_on_their_own(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    """Rows with different policies, chunk lengths and prompts, joining a running batch: each row's
    tokens are its alone-run's (and mode off's for exact rows), greedy and seeded."""
    lm, dec = sharp
    ps = grounded(3, seed=2) + [[7, 8, 9], grounded(1, seed=9, length=40)[0]]
    kws = [{"mode": "exact", "draft": "auto"}, {"mode": "exact", "draft": "ngram", "max_draft": 3},
           {"mode": "off"}, {"mode": "exact", "draft": "exit", "threshold": 0.3},
           {"mode": "exact", "draft": "auto", "temperature": 1.0, "seed": 4}]
    sets = [gen_settings(20, **kw) for kw in kws]
    batch = BatchDecoder(dec, max_batch_size=3)
    seqs = [batch.add(p, s) for p, s in zip(ps[:3], sets[:3], strict=True)]
    while batch.running or len(seqs) < len(ps):
        batch.step()
        while len(seqs) < len(ps) and batch.free_slots:
            seqs.append(batch.add(ps[len(seqs)], sets[len(seqs)]))
    drafted = 0
    for p, s, seq in zip(ps, sets, seqs, strict=True):
        off = GenerationSettings(max_new_tokens=20, temperature=s.temperature, seed=s.seed, stop_token_ids=(),
                                 exit=ExitSettings(mode="off"))
        assert seq.generation.tokens == dec.generate(p, s).tokens == dec.generate(p, off).tokens
        drafted += seq.generation.stats.drafted_by.get("ngram", 0)
    assert drafted > 0


def test_drafts_near_the_context_end_fit_the_cache(sharp: tuple[CausalLM, EarlyExitDecoder]) -> None:
    lm, dec = sharp
    long_prompt = (grounded(1, seed=3)[0] * 6)[:118]
    short = grounded(1, seed=4)[0]
    sets = [gen_settings(40, mode="exact", draft="ngram", max_draft=8),
            gen_settings(30, mode="approximate", threshold=0.3)]
    batched = BatchDecoder(dec, 2).generate([long_prompt, short], sets)
    assert (len(batched[0].tokens), batched[0].finish_reason) == (10, "length")  # 128 positions in all
    assert batched[0].tokens == dec.generate(long_prompt, gen_settings(40, mode="off")).tokens
    assert batched[1].tokens == dec.generate(short, sets[1]).tokens


def test_step_costs_are_measured_once_and_grow_with_the_chunk(make_tiny) -> None:
    dec = EarlyExitDecoder(make_tiny("llama"))
    costs = dec.step_costs
    assert dec.step_costs is costs
    assert list(costs.blocks) == sorted(costs.blocks)
    assert list(costs.head) == sorted(costs.head)
    assert costs.blocks[0] > 0
    assert costs.check > 0
    dec.step_costs = StepCosts.flat(dec.num_layers)
    assert dec.step_costs.step(8) == dec.step_costs.step(1)


# --- the real SmolLM2 -----------------------------------------------------------------------------------
@pytest.mark.real
def test_smollm2_grounded_chat_request_drafts_from_the_prompt(smollm2: CausalLM) -> None:
    """A chat request that quotes its passage: exact auto drafts from the prompt, the full model keeps
    most drafts, and the tokens are full depth's, greedy and seeded, alone and batched."""
    passage = ("The lighthouse stood on a rock at the mouth of the harbour. Its keeper climbed the hundred and "
               "twelve steps every evening to light the lamp, and every morning he wrote the weather in a book.")
    msgs = [{"role": "user", "content": f"{passage}\n\nQuote the first sentence of this passage exactly."}]
    ids = encode(smollm2.tokenizer, msgs)
    dec = EarlyExitDecoder(smollm2)
    for sample in ({}, {"temperature": 0.7, "seed": 5}):
        off = dec.generate(ids, gen_settings(48, mode="off", **sample))
        exact = dec.generate(ids, gen_settings(48, mode="exact", draft="auto", **sample))
        assert exact.tokens == off.tokens
        assert exact.stats.accepted_by.get("ngram", 0) >= 10
        assert exact.stats.verifications < len(exact.tokens) * 0.7
    other = [smollm2.tokenizer("The history of the city of Paris begins").input_ids]
    batched = dec.batch(2).generate([ids, other[0]], [gen_settings(32, mode="exact"), gen_settings(32, mode="exact")])
    assert batched[0].tokens == dec.generate(ids, gen_settings(32, mode="off")).tokens
    assert batched[1].tokens == dec.generate(other[0], gen_settings(32, mode="off")).tokens
