"""Where exact mode's drafts come from, and which source a row drafts with at each step.

Exact mode keeps the full model's output and only changes how many tokens one full-depth pass
decides: a row feeds its last token plus up to k drafted tokens as one chunk, the full head judges
every position, the drafts up to the first wrong one are kept plus the full model's own next token,
and the rejected positions are cropped from the row's cache. Two sources propose drafts:

- ``ngram`` (prompt lookup, as Hugging Face's ``prompt_lookup_num_tokens`` and vLLM's ``ngram``
  speculator): the longest suffix of the row's history (prompt + output), ``ngram_max`` tokens down to
  ``ngram_min``, that occurred before; the tokens that followed its latest occurrence are the draft.
  ``NgramIndex`` keeps a table n-gram -> where its latest occurrence ended, built once from the prompt
  and extended by each emitted token (``ngram_max - ngram_min + 1`` dictionary writes per token, a few
  reads per step), so a long prompt costs nothing per step. Host-side and free.
- ``exit`` (self-speculation): the row climbs with gate checks, as approximate mode does; a step
  whose gate fires drafts the exit head's top token there and stops (catch-up keeps its state), and
  the step that goes full depth verifies the drafts (``batch.BatchDecoder``).

Policies (``ExitSettings.draft``): "ngram" drafts the lookup's proposal whenever there is one,
"exit" drafts with the exit head, "none" never drafts, and "auto" picks per step and per row the
source that predicts the most tokens per second, or none (``Drafter``). Its model:

- cost: seconds of a full-depth step over m token rows and of the full head over m positions,
  measured once per decoder (``StepCosts.measure``: whole passes, sizes interleaved, medians made
  non-decreasing), so a chunk of q tokens costs ``C(q) = blocks(q) + head(q)`` against ``C(1)``;
- n-gram acceptance: each draft token is accepted with a probability alpha, kept per match length n
  (a 4-token match is right more often than a 1-token one) as decayed counts of accepted and rejected
  tokens, the row's own on top of the decoder-wide ones (``Acceptance``). A draft of k tokens then
  yields ``E(k) = 1 + alpha + ... + alpha^k`` tokens (the bonus token included) for ``C(k + 1)``: the
  row drafts the k (up to its proposal and ``max_draft``) with the best ``E(k) C(1) / C(k + 1)``,
  if that beats 1 by ``MARGIN``; so the draft grows while drafts are accepted and shrinks when they
  are not. In a batch the chunk is padded to the longest row, so the batch also caps every row's
  draft at the K that maximises the batch's tokens per second (``batch_cap``);
- exit drafting's yield is measured, not predicted: each exit cycle (the draft steps and the step
  that verifies them) is priced at its blocks, checks and verification chunk, and the row keeps
  drafting with the exit head while its decayed tokens-per-cost ratio beats a full step's.

Verification (``sequence.SequenceRun.verify``): every draft is a deterministic proposal (one token,
q = one-hot), so Leviathan et al.'s rule reduces to: keep draft t with probability p(t), else
draw from p with t removed. Drawing x ~ p and keeping t iff x == t is the same law, and it draws
exactly once per emitted token, as plain decoding does: under greedy decoding and under seeded
sampling, exact mode emits the very tokens of mode "off".
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch

from shortcuts.adapter import CausalLM
from shortcuts.engine.exit_head import ExitHead, confidence_and_top
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.settings import DRAFT_SOURCES, DraftSource, ExitSettings


class Timed(Protocol):
    """What ``StepCosts.measure`` times: a decoder's runner, model, depth and exit head."""

    runner: LayerRunner
    lm: CausalLM
    num_layers: int
    exit_head: ExitHead

Source = DraftSource
SOURCES = DRAFT_SOURCES
MARGIN = 1.02  # a draft must predict at least 2% more tokens per second than a plain step
PRIOR = {1: 0.25, 2: 0.4, 3: 0.5}  # n-gram acceptance before anything is measured (n >= 4: 0.6)
PRIOR_WEIGHT = 2.0  # pseudo-tokens of the prior (decoder-wide) and of the decoder-wide rate (per row)
ROW_DECAY = 0.8  # per verification: a row's counts follow its recent drafts
SHARED_DECAY = 0.98  # the decoder-wide counts follow recent requests


class NgramIndex:
    """Prompt lookup over one row's history, incremental: ``extend`` with each emitted token,
    ``propose`` the continuation of the longest suffix (``max_n`` down to ``min_n`` tokens) seen before."""

    def __init__(self, tokens: list[int] | tuple[int, ...], min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram range [{min_n}, {max_n}] must have 1 <= min <= max")
        self.min_n, self.max_n = min_n, max_n
        self.history: list[int] = []
        self.table: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence
        self.extend(tokens)

    def extend(self, tokens: list[int] | tuple[int, ...]) -> None:
        """Append tokens; each n-gram that now has a next token points at it."""
        h, table, lo, hi = self.history, self.table, self.min_n, self.max_n
        for t in tokens:
            end = len(h)  # the n-grams ending at h[end - 1] are followed by the token appended now
            h.append(t)
            for n in range(lo, min(hi, end) + 1):
                table[tuple(h[end - n : end])] = end

    def propose(self, k: int) -> tuple[list[int], int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix,
        and that suffix's length n (0 and no tokens when nothing matches)."""
        h, table = self.history, self.table
        size = len(h)
        for n in range(min(self.max_n, size), self.min_n - 1, -1):
            start = table.get(tuple(h[size - n :]))
            if start is not None:
                return h[start : start + k], n
        return [], 0


def _monotone(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence (pool adjacent violators): a bigger chunk never costs less."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in values:
        blocks.append([v, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


def _interp(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Piecewise-linear in x through (xs, ys), extended by the last segment's slope."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return ys[i - 1] + f * (ys[i] - ys[i - 1])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
    return ys[-1] + slope * (x - xs[-1])


@dataclass(frozen=True)
class StepCosts:
    """Seconds of a full-depth step: ``blocks`` over m token rows (a chunk of a row, or rows of a batch
    padded to one length) and ``head`` over m positions, at the measured sizes, after a short prefix;
    plus what the keys before cost: ``attend`` seconds per (query, key) pair (attention, every block)
    and ``context`` per key and sequence whatever the queries (reading the cache). ``check``: one exit
    check (exit head + gate) of one row; ``layer``: one block for one token."""

    sizes: tuple[int, ...]
    blocks: tuple[float, ...]
    head: tuple[float, ...]
    check: float
    num_layers: int
    attend: float = 0.0
    context: float = 0.0

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.blocks) or len(self.sizes) != len(self.head):
            raise ValueError("one block and one head time per size, and at least one size")

    @property
    def layer(self) -> float:
        return self.blocks[0] / self.num_layers

    def step(self, rows: int, positions: int | None = None, keys: int = 0, seqs: int = 1) -> float:
        """A full-depth step over ``rows`` token rows whose full head judges ``positions`` (default: all),
        the rows of ``seqs`` sequences attending to ``keys`` keys each."""
        if positions is None and rows < len(self._chunks):
            base = self._chunks[rows]
        else:
            base = _interp(self.sizes, self.blocks, rows) + _interp(self.sizes, self.head,
                                                                    rows if positions is None else positions)
        return base + keys * (self.attend * rows + self.context * seqs)

    @cached_property
    def _chunks(self) -> list[float]:
        """``step(q)`` for one row's chunk of q = 0..64 tokens, worked out once (a row's plan reads it)."""
        return [_interp(self.sizes, self.blocks, q) + _interp(self.sizes, self.head, q) for q in range(65)]

    def as_dict(self) -> dict[str, object]:
        return {"sizes": list(self.sizes), "blocks_s": [round(b, 6) for b in self.blocks],
                "head_s": [round(h, 6) for h in self.head], "check_s": round(self.check, 6),
                "attend_s_per_query_key": self.attend, "context_s_per_key": self.context}

    @classmethod
    def flat(cls, num_layers: int) -> StepCosts:
        """Every chunk costs what one token does, checks cost a block: a model for tests."""
        return cls((1,), (1.0,), (0.0,), 1.0 / num_layers, num_layers)

    @classmethod
    @torch.inference_mode()
    def measure(cls, decoder: Timed, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                repeats: int = 3, long: int = 1024) -> StepCosts:
        """Time whole passes of one row's chunk of each size through every block after a 32-token prefix,
        then the full head on its positions and one exit check; and chunks of 1 and 8 tokens after a
        ``long`` prefix (at most what the context leaves), whose extra time is the keys' cost
        (``attend``, ``context``). Sizes interleaved, the median of ``repeats`` after a warm-up round,
        made non-decreasing in the size."""
        runner = decoder.runner
        short = min(32, runner.context_length - max(sizes) - 1)
        long = max(short, min(long, runner.context_length - max(sizes) - 1))
        if short < 1:
            raise ValueError(f"the context ({runner.context_length}) is too short to time chunks of {max(sizes)}")
        vocab = decoder.lm.vocab_size
        ids = (torch.arange(long + max(sizes)) * 7919 % max(vocab - 1, 1)).unsqueeze(0) + 1
        caches = {}
        for prefix in dict.fromkeys((short, long)):  # one cache per prefix, filled once
            caches[prefix] = runner.new_cache(1, capacity=prefix + max(sizes))
            runner.forward(ids[:, :prefix], caches[prefix])
        level = max(1, decoder.num_layers // 2)
        runs = [(q, short) for q in sizes] + [(q, long) for q in (1, 8) if long > short]
        times: dict[tuple[int, int], list[tuple[float, float, float]]] = {r: [] for r in runs}
        with runner.scope():  # compiled blocks: these chunk sizes compile here, with the engine's room for graphs
            for rep in range(repeats + 1):
                for q, prefix in runs:
                    cache = caches[prefix]
                    cache.crop_row(0, prefix)
                    times[q, prefix].append(_time_pass(decoder, cache, ids[:, prefix : prefix + q], prefix, level))
                if rep == 0:
                    times = {r: [] for r in runs}
        med = {r: tuple(statistics.median(t[i] for t in times[r]) for i in range(3)) for r in runs}
        attend = context = 0.0
        if long > short:
            extra = {q: med[q, long][0] + med[q, long][1] - med[q, short][0] - med[q, short][1] for q in (1, 8)}
            attend = max(0.0, (extra[8] - extra[1]) / (7 * (long - short)))
            context = max(0.0, extra[1] / (long - short) - attend)
        return cls(tuple(sizes), tuple(_monotone([med[q, short][0] for q in sizes])),
                   tuple(_monotone([med[q, short][1] for q in sizes])),
                   statistics.median(m[2] for m in med.values()), decoder.num_layers, attend, context)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pass(decoder: Timed, cache: object, ids: torch.Tensor, start: int,
               level: int) -> tuple[float, float, float]:
    """Seconds of every block on a chunk (as decoding runs them: through CUDA graphs when the runner uses
    them), of the full head on its positions, of one exit check (at ``level``, on the state there, as decoding
    checks it: on the device of the block before it)."""
    runner = decoder.runner
    chunk = runner.embed(ids, start)
    call, h = chunk.call(), chunk.h
    dev = decoder.lm.device
    _sync(dev)
    t0 = time.perf_counter()
    h = runner.segment(0, level, h, call, cache)  # type: ignore[arg-type]
    _sync(dev)
    t1 = time.perf_counter()
    conf, _ = confidence_and_top(decoder.exit_head(h[0, -1:], level))
    float(conf[0])
    t2 = time.perf_counter()
    h = runner.segment(level, runner.num_layers, h, call, cache)  # type: ignore[arg-type]
    _sync(dev)
    t3 = time.perf_counter()
    logits = runner.full_logits(h[0])
    float(logits[-1, 0])
    return (t1 - t0) + (t3 - t2), time.perf_counter() - t3, t2 - t1


@dataclass
class Acceptance:
    """Decayed counts of accepted and rejected n-gram draft tokens per match length, decoder-wide
    (``shared`` None: starting from ``PRIOR``) or for one row (on top of the decoder-wide rate)."""

    decay: float
    shared: Acceptance | None = None
    counts: dict[int, list[float]] = field(default_factory=dict)  # n -> [accepted, tokens]

    def rate(self, n: int) -> float:
        prior = self.shared.rate(n) if self.shared is not None else PRIOR.get(n, 0.6)
        ok, total = self.counts.get(n, (0.0, 0.0))
        return (ok + PRIOR_WEIGHT * prior) / (total + PRIOR_WEIGHT)

    def observe(self, n: int, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` tokens matched at length n kept ``accepted``: that many
        successes, and one failure when it stopped early."""
        c = self.counts.setdefault(n, [0.0, 0.0])
        c[0] = self.decay * c[0] + accepted
        c[1] = self.decay * c[1] + accepted + (accepted < drafted)
        if self.shared is not None:
            self.shared.observe(n, drafted, accepted)


@dataclass
class Yield:
    """Decayed mean of exit cycles' tokens per cost against plain steps, decoder-wide (``shared``
    None: starting just above ``MARGIN``, so that exit drafting is tried once) or for one row."""

    decay: float
    shared: Yield | None = None
    total: float = 0.0
    weight: float = 0.0

    def value(self) -> float:
        prior = self.shared.value() if self.shared is not None else MARGIN + 0.05
        return (self.total + PRIOR_WEIGHT * prior) / (self.weight + PRIOR_WEIGHT)

    def observe(self, gain: float) -> None:
        self.total = self.decay * self.total + gain
        self.weight = self.decay * self.weight + 1.0
        if self.shared is not None:
            self.shared.observe(gain)


@dataclass
class DraftStats:
    """What the decoder's rows learned about their drafts, the prior of every new row."""

    acceptance: Acceptance = field(default_factory=lambda: Acceptance(SHARED_DECAY))
    exit: Yield = field(default_factory=lambda: Yield(SHARED_DECAY))


def expected_tokens(alpha: float, k: int) -> list[float]:
    """E(j) = 1 + alpha + ... + alpha^j for j = 0..k: tokens one verification of j drafts yields."""
    out, term = [1.0], 1.0
    for _ in range(k):
        term *= alpha
        out.append(out[-1] + term)
    return out


@dataclass(frozen=True)
class Plan:
    """What a row does this step: feed ``tokens`` (n-gram drafts) after its token, climb with checks
    (``source`` "exit"), or a plain full step (``source`` None). ``yields``: the expected tokens of
    each shorter n-gram draft (for the batch's cap), ``n``: the match length."""

    source: Source | None
    tokens: tuple[int, ...] = ()
    n: int = 0
    yields: tuple[float, ...] = (1.0,)


PLAIN = Plan(None)
EXIT = Plan("exit")


class Drafter:
    """One row's draft policy (``ExitSettings.draft``); see the module docstring for ``auto``.

    ``plan`` at the start of a step (not during an exit cycle: the gate continues it), ``observe_*``
    after each verification."""

    def __init__(self, exits: ExitSettings, prompt: tuple[int, ...], exit_levels: bool, costs: StepCosts | None,
                 shared: DraftStats | None = None):
        self.policy = exits.draft
        self.max_draft = exits.max_draft
        self.index = NgramIndex(prompt, exits.ngram_min, exits.ngram_max) if self.policy in ("ngram", "auto") \
            else None
        self.exit = exit_levels and self.policy in ("exit", "auto")
        self.costs = costs
        shared = shared or DraftStats()
        self.acceptance = Acceptance(ROW_DECAY, shared.acceptance)
        self.exit_yield = Yield(ROW_DECAY, shared.exit)
        if self.policy == "auto" and costs is None:
            raise ValueError("draft='auto' needs step costs")

    def append(self, token: int) -> None:
        if self.index is not None:
            self.index.extend((token,))

    def plan(self, room: int, stop: set[int], length: int = 0) -> Plan:
        """This step's plan, drafting at most ``room`` tokens, the row's keys so far being ``length``."""
        if self.policy == "none":
            return PLAIN
        if self.policy == "exit":
            return EXIT if self.exit else PLAIN
        assert self.index is not None
        tokens, n = self.index.propose(min(room, self.max_draft)) if room > 0 else ([], 0)
        for j, t in enumerate(tokens):  # a drafted stop token ends the draft (its acceptance ends the output)
            if t in stop:
                tokens = tokens[: j + 1]
                break
        if self.policy == "ngram":
            return Plan("ngram", tuple(tokens), n) if tokens else PLAIN
        return self._auto(tokens, n, length)

    def _auto(self, tokens: list[int], n: int, length: int) -> Plan:
        costs = self.costs
        assert costs is not None
        one = costs.step(1, keys=length)
        best, best_k = 1.0, 0
        yields: tuple[float, ...] = (1.0,)
        if tokens:
            yields = tuple(expected_tokens(self.acceptance.rate(n), len(tokens)))
            for k in range(1, len(tokens) + 1):
                gain = yields[k] * one / costs.step(k + 1, keys=length + k)
                if gain > best:
                    best, best_k = gain, k
        exit_gain = self.exit_yield.value() if self.exit else 0.0
        if max(best, exit_gain) < MARGIN:
            return PLAIN
        if exit_gain > best:
            return EXIT
        return Plan("ngram", tuple(tokens[:best_k]), n, yields[: best_k + 1])

    def observe_ngram(self, n: int, drafted: int, accepted: int) -> None:
        self.acceptance.observe(n, drafted, accepted)

    def observe_exit(self, levels: list[int], checks: int, accepted: int) -> None:
        """An exit cycle: drafts at ``levels``, ``checks`` exit checks in all, ``accepted`` drafts kept;
        its tokens per second against plain steps updates the decayed exit gain."""
        costs = self.costs
        if costs is None:
            return
        spent = sum(levels) * costs.layer + checks * costs.check + costs.step(len(levels) + 1)
        self.exit_yield.observe((accepted + 1) * costs.step(1) / spent)  # the keys' cost left out: exits pay it too


def batch_cap(plans: list[Plan], costs: StepCosts, keys: int = 0) -> int | None:
    """The most n-gram drafts an ``auto`` row of a batch should feed this step (None: no cap), from the
    batch's expected tokens per second over every cap K: rows are padded to the longest chunk, so a
    row's long draft makes every row's step dearer. Rows drafting under the fixed "ngram" policy keep
    their drafts (their chunk is a floor); rows without n-gram drafts count one token each. ``keys``: the
    longest row's keys (every row's padded queries attend to that many)."""
    auto = [p for p in plans if p.source == "ngram" and len(p.yields) > 1]
    if len(plans) < 2 or not auto:
        return None
    floor = max((len(p.tokens) for p in plans if p.source == "ngram" and len(p.yields) == 1), default=0)
    fixed = [p for p in plans if not (p.source == "ngram" and len(p.yields) > 1)]
    made_fixed = sum(len(p.tokens) + 1 if p.source == "ngram" else 1 for p in fixed)  # an upper bound: unknown
    judged_fixed = made_fixed
    best, best_cap = -1.0, 0
    for cap in range(max(len(p.tokens) for p in auto) + 1):
        made = made_fixed + sum(p.yields[min(cap, len(p.yields) - 1)] for p in auto)
        judged = judged_fixed + sum(min(cap, len(p.tokens)) + 1 for p in auto)
        q = max(cap, floor) + 1
        rate = made / costs.step(len(plans) * q, judged, keys + q, len(plans))
        if rate > best:
            best, best_cap = rate, cap
    return best_cap
