"""One sequence's decoding rules, written once: sampling, budget, stop, drafting, verification, output.

``SequenceRun`` is everything about a sequence that is not tensors in flight: its settings, its
random generator, its gate, the tokens it has fed (``length``), the tokens that still owe deeper
blocks their keys/values (``pending``, catch-up), its unverified drafts (exact mode), its output
and its statistics. ``BatchDecoder`` moves the tensors and calls these rules; a single sequence
is a batch of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

from shortcuts.engine.drafts import PLAIN, Drafter, DraftStats, Plan, Source, StepCosts
from shortcuts.engine.exit_head import ExitGate
from shortcuts.engine.sampling import (
    Processors,
    TopLogprobs,
    distribution,
    logprobs,
    make_generator,
    pick,
    sample,
)
from shortcuts.engine.settings import GenerationSettings

TokenKind = Literal["full", "exited", "accepted", "corrected"]
FinishReason = Literal["length", "stop", "abort"]  # abort: cancelled (``BatchDecoder.cancel``)


@dataclass(frozen=True)
class TokenTrace:
    """How one generated token was produced.

    exit_layer: the depth (1..L) whose head chose the token; L is the full model.
    confidence: max softmax probability of that head.
    kind: "full" (full model), "exited" (approximate mode, exit head), "accepted" (exact mode: a
        draft that the full model confirmed), "corrected" (exact mode: the full model's token
        replacing a rejected draft).
    source: exact mode's draft source of an accepted token: "exit" (the exit head drafted it at
        ``exit_layer``) or "ngram" (prompt lookup; ``exit_layer`` is the full model's, which judged
        it); None for every other token.
    logprob, top_logprobs: only when ``GenerationSettings.logprobs`` asks: log softmax of the
        deciding head's raw logits (the head at ``exit_layer``) at the token, and that head's most
        likely (token, logprob) pairs.
    """

    token: int
    exit_layer: int
    confidence: float
    kind: TokenKind
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None
    source: Source | None = None


@dataclass
class Stats:
    """Work done after the prompt: token-block evaluations, gate checks, drafts."""

    steps: int = 0  # tokens fed through the model
    exit_checks: int = 0
    layers_computed: int = 0  # (token, block) evaluations, catch-up and verification included
    layers_skipped: int = 0  # blocks the fed tokens did not run in their own step
    kv_fills: int = 0  # copy policy: (token, block) key/value fills of skipped blocks
    drafted: int = 0
    accepted: int = 0
    drafted_by: dict[str, int] = field(default_factory=dict)  # exact mode, by source ("ngram", "exit")
    accepted_by: dict[str, int] = field(default_factory=dict)
    verifications: int = 0  # exact mode: full-depth passes (each decides 1 + its accepted drafts)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def count(self, source: Source, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        self.drafted_by[source] = self.drafted_by.get(source, 0) + drafted
        self.accepted_by[source] = self.accepted_by.get(source, 0) + accepted


@dataclass
class Generation:
    tokens: list[int]
    trace: list[TokenTrace]
    finish_reason: FinishReason
    stats: Stats

    @property
    def mean_exit_layer(self) -> float:
        return sum(t.exit_layer for t in self.trace) / max(len(self.trace), 1)


@dataclass(frozen=True)
class SequenceOutput:
    """What one sequence produced since its last report (``BatchDecoder.step``): its new tokens, in
    order, and how it finished once it is over (it has then left the batch)."""

    seq: SequenceRun
    tokens: tuple[TokenTrace, ...]
    finish: FinishReason | None

    @property
    def generation(self) -> Generation:
        """The sequence's whole output so far."""
        return self.seq.generation


@dataclass
class Pending:
    """A token that left early and still owes blocks level+1..L their keys/values (catch-up)."""

    h: Tensor  # (1, d), its state after block ``level``
    level: int


@dataclass
class Draft:
    """An unverified token: drafted by the exit head at ``level`` (with its confidence and, when
    asked, its log-probabilities) or by the n-gram lookup (level L)."""

    token: int
    level: int
    confidence: float
    source: Source
    logprob: float | None = None
    top_logprobs: TopLogprobs | None = None


class SequenceRun:
    """The rules of one sequence in a batch row; see the module docstring.

    ``forced`` (teacher forcing): the sequence feeds these tokens whatever it picks; ``picked``
    then records what it would have picked at each step (``EarlyExitDecoder.follow``).
    ``prompt``: the prompt's ids, for the repetition penalty and the n-gram lookup. ``costs`` and
    ``draft_stats``: the decoder's measured step costs and what its rows learned about drafts (exact
    mode's ``auto`` policy)."""

    def __init__(self, row: int, prompt_len: int, settings: GenerationSettings, num_layers: int,
                 context_length: int, eos_ids: tuple[int, ...], device: str | torch.device = "cpu",
                 forced: list[int] | None = None, prompt: Sequence[int] = (),
                 costs: StepCosts | None = None, draft_stats: DraftStats | None = None):
        self.row, self.settings, self.num_layers = row, settings, num_layers
        self.prompt = tuple(prompt)
        self.processors = Processors(settings, self.prompt) if settings.penalized else None
        self.generator = make_generator(settings.seed, device)
        self._generators = {torch.device(device): self.generator}
        self.gate = ExitGate(settings.exit)
        exits = settings.exit
        drafts = exits.mode != "exact" or exits.draft != "none"
        self.levels = frozenset(exits.check_levels(num_layers)) if exits.mode != "off" and drafts else frozenset()
        self.check_order = tuple(sorted(self.levels))
        self.forced = forced
        self.stop = set(eos_ids if settings.stop_token_ids is None else settings.stop_token_ids)
        self.budget = min(settings.max_new_tokens, context_length - prompt_len)
        if forced is not None:
            self.stop, self.budget = set(), len(forced)
        self.length = prompt_len  # tokens fed so far
        self.pending: list[Pending] = []  # catch-up: fed tokens that still owe deeper blocks (the last fed)
        self.drafts: list[Draft] = []  # exact mode: drafts not yet verified
        self.drafter = Drafter(exits, self.prompt, bool(self.levels), costs, draft_stats) \
            if exits.mode == "exact" else None
        self.plan: Plan = PLAIN  # exact mode: this step's draft plan
        self.cycle_checks = 0  # exact mode: exit checks since the last verification
        self.check = False  # whether this step checks the gate
        self.check_top: int | None = None  # the exit head's top-1 at this token's previous check
        self.tokens: list[int] = []
        self.trace: list[TokenTrace] = []
        self.picked: list[TokenTrace] = []
        self.stats = Stats()
        self.finish: FinishReason | None = None
        self._reported = 0  # traces handed out by ``report``
        self._finish_reported = False

    # --- output -----------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def generation(self) -> Generation:
        """The output so far (finish reason "abort" while still running)."""
        return Generation(list(self.tokens), list(self.trace), self.finish or "abort", self.stats)

    def report(self) -> SequenceOutput | None:
        """The tokens (and the finish) not reported yet; None when there is nothing new."""
        new = tuple(self.trace[self._reported:])
        finish = None if self._finish_reported else self.finish
        if not new and finish is None:
            return None
        self._reported, self._finish_reported = len(self.trace), self.finish is not None
        return SequenceOutput(self, new, finish)

    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    def missing(self, layer: int) -> int:
        """How many fed tokens layer ``layer`` (0-based) has no keys/values for yet."""
        return sum(p.level <= layer for p in self.pending)

    # --- picking (the logits processors apply to every head alike) --------------------------------
    def adjusted(self, logits: Tensor, drafted: int = 0) -> Tensor:
        """A head's logits (V,) after the penalties and bias, the output being the tokens so far and
        the first ``drafted`` unverified drafts."""
        if self.processors is None:
            return logits
        return self.processors(logits, self.tokens + [d.token for d in self.drafts[:drafted]])

    def choose(self, logits: Tensor, top: tuple[int, float], drafted: int = 0) -> int:
        """The token from a head's logits (V,) given their (top-1, max-probability): the top-1 under plain
        greedy decoding (no extra work), else picked from the processed logits."""
        s = self.settings
        if s.greedy and not s.penalized:
            return top[0]
        return pick(self.adjusted(logits, drafted), s.temperature, s.top_p, self.generator_on(logits.device), s.top_k,
                    s.min_p)

    def generator_on(self, device: torch.device) -> torch.Generator:
        """The sequence's generator on ``device`` (draws happen where the logits are: an exit head's on
        its block's device, the full head's on the LM head's). One device: the one generator; each
        further device gets its own, seeded from the seed and how many came before."""
        if device not in self._generators:
            seed = self.settings.seed
            self._generators[device] = make_generator(None if seed is None else seed + len(self._generators), device)
        return self._generators[device]

    def distribution(self, logits: Tensor, drafted: int = 0) -> Tensor:
        """The sampling distribution (V,) of a head's logits, processors applied."""
        s = self.settings
        return distribution(self.adjusted(logits, drafted), s.temperature, s.top_p, s.top_k, s.min_p)

    def scored(self, t: TokenTrace, logits: Tensor) -> TokenTrace:
        """``t`` with its log-probabilities under ``logits`` (V,) when the settings ask for them."""
        n = self.settings.logprobs
        if n is None:
            return t
        lp, top = logprobs(logits, t.token, n)
        return replace(t, logprob=lp, top_logprobs=top)

    def emit(self, t: TokenTrace) -> bool:
        """Append a token; True when generation is over."""
        if self.forced is not None:
            self.picked.append(t)
            t = replace(t, token=self.forced[len(self.tokens)])
        self.tokens.append(t.token)
        self.trace.append(t)
        if self.drafter is not None:
            self.drafter.append(t.token)
        if t.token in self.stop:
            self.finish = "stop"
        elif self.remaining() <= 0:
            self.finish = "length"
        return self.finish is not None

    # --- one step ---------------------------------------------------------------------------------
    @property
    def next_token(self) -> int:
        return self.drafts[-1].token if self.drafts else self.tokens[-1]

    @property
    def feed(self) -> list[int]:
        """The tokens this step feeds at positions ``length``..: the next token, then any n-gram drafts."""
        return [self.next_token, *self.plan.tokens]

    def begin_step(self) -> Plan:
        """Plan the step. Exact mode: a row between drafts asks its drafter (n-gram drafts to feed now,
        an exit cycle, or a plain step); an exit cycle checks the gate until max_draft, the budget or a
        drafted stop token, so that the step goes full depth and verifies."""
        mode = self.settings.exit.mode
        self.gate.reset()
        self.check_top = None
        self.stats.steps += 1
        if mode != "exact":
            self.check = mode == "approximate"
            return self.plan
        room = min(self.settings.exit.max_draft, self.remaining() - 1)
        d = self.drafts
        if not d:
            assert self.drafter is not None
            self.plan = self.drafter.plan(room, self.stop, self.length)
        self.check = self.plan.source == "exit" and len(d) < room and not (d and d[-1].token in self.stop)
        return self.plan

    def cap(self, k: int) -> None:
        """Feed at most k of this step's n-gram drafts (the batch's cap)."""
        p = self.plan
        if p.source == "ngram" and len(p.tokens) > k:
            self.plan = replace(p, tokens=p.tokens[:k], yields=p.yields[: k + 1]) if k else PLAIN

    def checks(self, level: int) -> bool:
        return self.check and level in self.levels

    def next_check(self, level: int) -> int:
        """The first level after ``level`` where the gate is checked, else L."""
        return next((lv for lv in self.check_order if lv > level), self.num_layers)

    def fires(self, confidence: float, top: int, ent: float | None, score: float | None = None) -> bool:
        """The sequence's ``ExitGate`` on the head's max-probability, top-1, entropy, learned score."""
        self.stats.exit_checks += 1
        self.cycle_checks += 1
        self.check_top = top
        return self.gate.decide(confidence, top, ent, score)

    @property
    def prev_confidence(self) -> float:
        """The confidence that decided the token fed now (a draft's, or the emitted token's)."""
        return self.drafts[-1].confidence if self.drafts else self.trace[-1].confidence

    def exited(self, level: int, logits: Tensor, top: tuple[int, float]) -> None:
        """The fed token left at ``level`` with the exit head's ``logits`` (V,), (top-1, confidence).
        Exact mode drafts the exit head's most likely token (after the processors): a deterministic
        draft, which verification keeps exactly when the full model picks it too."""
        self.length += 1
        self.stats.layers_skipped += self.num_layers - level
        drafted = len(self.drafts)
        if self.settings.exit.mode == "exact":
            token = top[0] if not self.settings.penalized else int(self.adjusted(logits, drafted).argmax())
            t = self.scored(TokenTrace(token, level, top[1], "exited"), logits)
            self.drafts.append(Draft(token, level, top[1], "exit", t.logprob, t.top_logprobs))
            return
        q = None if self.settings.greedy else self.distribution(logits, drafted)
        token = self.choose(logits, top, drafted) if q is None else sample(q, self.generator_on(q.device))
        self.emit(self.scored(TokenTrace(token, level, top[1], "exited"), logits))

    def pick_full(self, logits: Tensor, top: tuple[int, float], drafted: int = 0) -> TokenTrace:
        """The full model's token from its logits (V,), given their (top-1, max-probability), after
        the first ``drafted`` drafts."""
        token = self.choose(logits, top, drafted)
        return self.scored(TokenTrace(token, self.num_layers, top[1], "full"), logits)

    def reached_top(self, full_logits: Tensor, tops: list[tuple[int, float]], start: int) -> None:
        """The fed tokens (with every pending token) went through all blocks; ``full_logits`` (q, V)
        are the full head's on the row's tokens at positions start.. (only the last unless exact),
        ``tops`` their (top-1, max-probability). Exact mode keeps the positions up to the last
        accepted draft (the batch crops the row's cache to ``length``)."""
        self.length += 1
        self.pending.clear()
        if self.settings.exit.mode != "exact":
            self.emit(self.pick_full(full_logits[-1], tops[-1]))
            return
        plan = self.plan
        if plan.source == "ngram":
            self.drafts = [Draft(t, self.num_layers, 0.0, "ngram") for t in plan.tokens]
        drafts = self.drafts
        traces, accepted = self.verify(full_logits, tops)
        self.length = start + accepted + 1
        self._observe(plan, drafts, accepted)
        self.drafts, self.plan = [], PLAIN
        for t in traces:
            if self.emit(t):
                return

    def _observe(self, plan: Plan, drafts: list[Draft], accepted: int) -> None:
        """Count a verification and tell the drafter how its drafts fared."""
        self.stats.verifications += 1
        if plan.source is not None and drafts:
            self.stats.count(plan.source, len(drafts), accepted)
        assert self.drafter is not None
        if plan.source == "ngram":
            self.drafter.observe_ngram(plan.n, len(drafts), accepted)
        elif plan.source == "exit":
            self.drafter.observe_exit([d.level for d in drafts], self.cycle_checks, accepted)
        self.cycle_checks = 0

    def verify(self, full_logits: Tensor, tops: list[tuple[int, float]]) -> tuple[list[TokenTrace], int]:
        """Keep the drafts the full model agrees with (full_logits row k judges drafts[k]), then its
        correction or its next token (row len(drafts)); also how many drafts were kept. The full
        model picks at each position as plain decoding would (greedy: its top; sampling: one draw
        from its distribution) and a draft is kept iff it is that pick (``drafts`` module docstring:
        the speculative rule for a one-hot draft), so the output is plain decoding's, draw for draw."""
        drafts, L = self.drafts, self.num_layers
        assert full_logits.shape[0] == len(drafts) + 1
        out: list[TokenTrace] = []
        for k, d in enumerate(drafts):
            best = self.choose(full_logits[k], tops[k], k)
            if best != d.token:
                return [*out, self.scored(TokenTrace(best, L, tops[k][1], "corrected"), full_logits[k])], k
            if d.source == "exit":
                out.append(TokenTrace(d.token, d.level, d.confidence, "accepted", d.logprob, d.top_logprobs, "exit"))
            else:
                out.append(self.scored(TokenTrace(d.token, L, tops[k][1], "accepted", source="ngram"), full_logits[k]))
        return [*out, self.pick_full(full_logits[-1], tops[-1], len(drafts))], len(drafts)
