"""Logits processors (top-k, min-p, repetition/presence/frequency penalties, logit bias) and
log-probabilities in the engine, on tiny random models: the math on small rows, then decoding
(exact mode stays exact under the same processors, batches equal batches of one, seeds reproduce)."""

from __future__ import annotations

import math

import pytest
import torch
from support.models import build_tiny, fitted_jump, sharpen

from shortcuts.adapter import CausalLM
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.sampling import distribution, logprobs, penalize
from shortcuts.engine.settings import ExitSettings, GenerationSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = [5, 9, 14, 9, 22, 31]


def gs(n: int = 12, mode: str = "off", threshold: float = 0.5, draft: str = "auto", **kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, stop_token_ids=(),
                              exit=ExitSettings(mode=mode, threshold=threshold, draft=draft), **kw)


@pytest.fixture(scope="module")
def dec() -> tuple[CausalLM, EarlyExitDecoder]:
    lm = sharpen(build_tiny("llama"), 3.0)
    return lm, EarlyExitDecoder(lm, fitted_jump(lm))


def test_penalties_follow_vllm() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    s = GenerationSettings(repetition_penalty=2.0)
    assert torch.equal(penalize(logits, s, [1], [0]), torch.tensor([1.0, -2.0, 0.5, 3.0]))
    s = GenerationSettings(frequency_penalty=0.5, presence_penalty=0.25, logit_bias=((2, 10.0), (99, 5.0)))
    out = penalize(logits, s, [3], [0, 0, 1])  # the prompt's token 3 is not penalised; id 99 is past the vocabulary
    assert torch.allclose(out, torch.tensor([2.0 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 10.5, 3.0]))
    assert torch.equal(logits, torch.tensor([2.0, -1.0, 0.5, 3.0]))  # not changed in place


def test_top_k_and_min_p_cut_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.allclose(distribution(logits, 1.0, top_k=2), torch.tensor([0.625, 0.375, 0, 0]), atol=1e-6)
    assert torch.allclose(distribution(logits, 1.0, min_p=0.35), torch.tensor([0.5, 0.3, 0, 0]) / 0.8, atol=1e-6)
    assert torch.allclose(distribution(logits, 1.0, top_k=1), torch.tensor([1.0, 0, 0, 0]))
    lp, top = logprobs(logits, 1, 2)
    assert lp == pytest.approx(math.log(0.3), abs=1e-6)
    assert [t for t, _ in top] == [0, 1]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"top_k": -1}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias"), ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"logprobs": -1}, "logprobs"),
])
def test_processor_settings_are_validated(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GenerationSettings(**kwargs)


def test_top_k_one_equals_greedy(dec: tuple[CausalLM, EarlyExitDecoder]) -> None:
    _, d = dec
    greedy = d.generate(PROMPT, gs()).tokens
    assert d.generate(PROMPT, gs(temperature=1.5, top_k=1, seed=3)).tokens == greedy
    assert d.generate(PROMPT, gs(temperature=1.5, min_p=1.0, seed=3)).tokens == greedy


def test_penalties_and_bias_change_greedy_output(dec: tuple[CausalLM, EarlyExitDecoder]) -> None:
    _, d = dec
    plain = d.generate(PROMPT, gs(n=16)).tokens
    assert d.generate(PROMPT, gs(n=16, logit_bias=((7, 100.0),))).tokens == [7] * 16
    for kw in ({"repetition_penalty": 5.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        out = d.generate(PROMPT, gs(n=16, **kw)).tokens
        assert out != plain, kw
        assert len(set(out)) >= len(set(plain)), kw  # fewer repeats
    strong = d.generate(PROMPT, gs(n=16, repetition_penalty=1e6)).tokens
    assert len(set(strong)) == 16
    assert not set(strong) & set(PROMPT)


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1.8}, {"frequency_penalty": 1.0, "presence_penalty": 0.5},
                                {"logit_bias": ((11, 3.0), (12, -3.0))}])
def test_exact_mode_stays_exact_under_processors(dec: tuple[CausalLM, EarlyExitDecoder], kw: dict) -> None:
    _, d = dec
    ref = d.generate(PROMPT, gs(n=20, **kw)).tokens
    drafted = 0
    for threshold in (0.0, 0.3, 0.6):
        gen = d.generate(PROMPT, gs(n=20, mode="exact", draft="exit", threshold=threshold, **kw))
        assert gen.tokens == ref, threshold
        drafted += gen.stats.drafted
    assert drafted > 0
    for draft in ("ngram", "auto"):  # n-gram drafts are judged under the penalties of the tokens before them
        gen = d.generate(PROMPT, gs(n=20, mode="exact", draft=draft, threshold=1.0, **kw))
        assert gen.tokens == ref, draft
        assert gen.stats.drafted_by.get("exit", 0) == 0


def test_sampling_with_processors_reproduces_and_batches(dec: tuple[CausalLM, EarlyExitDecoder]) -> None:
    _, d = dec
    kw = {"temperature": 1.0, "top_k": 8, "min_p": 0.05, "repetition_penalty": 1.3, "frequency_penalty": 0.3}
    settings = [gs(n=10, mode=m, seed=s, **kw) for m in ("off", "approximate", "exact") for s in (1, 2)]
    alone = [d.generate(PROMPT, s) for s in settings]
    assert [g.tokens for g in alone] == [d.generate(PROMPT, s).tokens for s in settings]  # seeds reproduce
    assert alone[0].tokens != alone[1].tokens
    batched = d.batch(4).generate([PROMPT] * len(settings), settings)
    assert [g.tokens for g in batched] == [g.tokens for g in alone]


def test_logprobs_come_from_the_deciding_head(dec: tuple[CausalLM, EarlyExitDecoder]) -> None:
    _, d = dec
    off = d.generate(PROMPT, gs(n=8, logprobs=3))
    assert all(t.logprob is not None and len(t.top_logprobs or ()) == 3 for t in off.trace)
    assert all(t.top_logprobs[0][0] == t.token for t in off.trace)  # greedy picks the top  # type: ignore[index]
    scored = d.score(PROMPT + off.tokens, top_n=3)[len(PROMPT) - 1:]  # the full model, teacher forced
    for t, (lp, top) in zip(off.trace, scored, strict=True):
        assert t.logprob == pytest.approx(lp, abs=1e-4)
        assert [i for i, _ in t.top_logprobs or ()] == [i for i, _ in top]
    assert d.generate(PROMPT, gs(n=8)).trace[0].logprob is None  # not asked: not computed
    approx = d.generate(PROMPT, gs(n=8, mode="approximate", threshold=0.0, logprobs=2))
    for t in approx.trace[1:]:
        assert t.exit_layer == 1
        assert t.top_logprobs[0][0] == t.token  # type: ignore[index]
    exact = d.generate(PROMPT, gs(n=8, mode="exact", draft="exit", threshold=0.0, logprobs=1))
    assert all(t.logprob is not None for t in exact.trace)
    assert any(t.kind == "accepted" and t.exit_layer < d.num_layers for t in exact.trace)


def test_score_refuses_a_bad_prompt(dec: tuple[CausalLM, EarlyExitDecoder]) -> None:
    with pytest.raises(ValueError, match="empty"):
        dec[1].score([])
    assert dec[1].score([5]) == []
