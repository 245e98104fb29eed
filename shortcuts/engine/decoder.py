"""The early-exit decoder: one token at a time, leaving the forward pass when the jump is confident.

Each generated token is fed through blocks 1, 2, ...; after the blocks listed by the exit
settings the exit head (head of the jump's estimate of the final state) is checked by a gate.

- mode "off": every block, the model's own head (plain decoding, for reference).
- mode "approximate": a token that exits at level l is predicted by the exit head.
- mode "exact": exits only draft tokens; a full-depth pass over the drafted chunk verifies
  them, keeps the longest prefix the full model agrees with plus the full model's next token,
  and crops the caches past it (self-speculative decoding).

Skipped layers (kv_policy): with "catchup" a token that exits at level l waits in ``pending``
with its level-l state; the next token that goes deeper than l carries it through the skipped
blocks in the same chunk (FREE / EE-LLM). Its keys/values are therefore exactly the full
model's, only computed later, and exact mode's verification pass is just that catch-up run to
the top. Pending levels never increase with position, so every layer's cache stays a
contiguous prefix. With "copy" the skipped layers' keys/values are filled at once from the
exit state (CALM's state propagation); nothing waits, but those keys/values are approximate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.engine.cache import LayerKVCache
from shortcuts.engine.exit_head import ExitGate, ExitHead, max_probability
from shortcuts.engine.runner import Chunk, LayerRunner
from shortcuts.engine.sampling import distribution, make_generator, pick, sample, speculative_accept
from shortcuts.engine.settings import GenerationSettings
from shortcuts.jump import LowRankJumps

TokenKind = Literal["full", "exited", "accepted", "corrected"]
FinishReason = Literal["length", "stop", "abort"]  # abort: the on_token callback asked to stop
OnToken = Callable[["TokenTrace"], bool]


@dataclass(frozen=True)
class TokenTrace:
    """How one generated token was produced.

    exit_layer: the depth (1..L) whose head chose the token; L is the full model.
    confidence: max softmax probability of that head.
    kind: "full" (full model), "exited" (approximate mode, exit head), "accepted" (exact mode: a
        draft from the exit head that the full model confirmed), "corrected" (exact mode: the
        full model's token replacing a rejected draft).
    """

    token: int
    exit_layer: int
    confidence: float
    kind: TokenKind


@dataclass
class Stats:
    """Work done after the prompt: token-block evaluations, gate checks, drafts."""

    steps: int = 0  # tokens fed through the model
    exit_checks: int = 0
    layers_computed: int = 0  # (token, block) evaluations, catch-up and verification included
    layers_skipped: int = 0  # blocks the fed tokens did not run in their own step
    kv_fills: int = 0  # copy policy: (token, block) attention runs that filled skipped keys/values
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Generation:
    tokens: list[int]
    trace: list[TokenTrace]
    finish_reason: FinishReason
    stats: Stats

    @property
    def mean_exit_layer(self) -> float:
        return sum(t.exit_layer for t in self.trace) / max(len(self.trace), 1)


@dataclass
class Pending:
    """A token that left early and still owes blocks level+1..L their keys/values (catch-up)."""

    h: Tensor  # (1, 1, d), its state after block ``level``
    level: int


@dataclass
class DecodeState:
    """The KV cache, the tokens fed so far (``length``) and the pending tokens (the last ones fed)."""

    cache: LayerKVCache
    length: int = 0
    pending: list[Pending] = field(default_factory=list)

    def missing(self, layer: int) -> int:
        """How many fed tokens layer ``layer`` (0-based) has no keys/values for yet."""
        return sum(p.level <= layer for p in self.pending)


@dataclass
class StepResult:
    level: int  # exit level of the fed token, L when it went through every block
    logits: Tensor  # (V,) the head that decided: exit head, or the full head
    confidence: float
    start: int  # position of the first token of the final chunk
    full_logits: Tensor | None = None  # (q, V) full logits of positions start.. (full depth only)


@dataclass
class Draft:
    token: int
    level: int
    confidence: float
    q: Tensor | None  # (V,) draft distribution, for speculative sampling


class SequenceRun:
    """The mutable parts of one sequence's generation: sampler, stop rule, budget, output, stats
    (one ``generate`` call; ``batch.BatchSequence`` extends it with its row in a batch)."""

    def __init__(self, decoder: EarlyExitDecoder, prompt_len: int, settings: GenerationSettings,
                 on_token: OnToken | None = None):
        self.settings = settings
        self.on_token = on_token
        self.generator = make_generator(settings.seed)
        self.gate = ExitGate(settings.exit)
        self.stop = set(decoder.eos_ids if settings.stop_token_ids is None else settings.stop_token_ids)
        self.budget = min(settings.max_new_tokens, decoder.runner.context_length - prompt_len)
        exits = settings.exit
        self.levels = set(exits.check_levels(decoder.num_layers)) if exits.mode != "off" else set()
        self.tokens: list[int] = []
        self.trace: list[TokenTrace] = []
        self.stats = Stats()
        self.finish: FinishReason | None = None

    def pick(self, logits: Tensor) -> int:
        s = self.settings
        return pick(logits, s.temperature, s.top_p, self.generator)

    def remaining(self) -> int:
        return self.budget - len(self.tokens)

    def verify(self, drafts: list[Draft], full_logits: Tensor, num_layers: int) -> tuple[list[TokenTrace], int | None]:
        """Keep the drafts the full model agrees with (full_logits row k judges drafts[k]), then its
        correction or its next token (row len(drafts)); also the index of the rejected draft, if any."""
        s = self.settings
        assert full_logits.shape[0] == len(drafts) + 1
        out: list[TokenTrace] = []
        self.stats.drafted += len(drafts)
        for k, d in enumerate(drafts):
            row = full_logits[k]
            if s.greedy:
                top = int(row.argmax())
                fix = None if top == d.token else top
            else:
                assert d.q is not None
                fix = speculative_accept(distribution(row, s.temperature, s.top_p), d.q, d.token, self.generator)
            if fix is not None:
                return [*out, TokenTrace(fix, num_layers, max_probability(row), "corrected")], k
            self.stats.accepted += 1
            out.append(TokenTrace(d.token, d.level, d.confidence, "accepted"))
        last = full_logits[-1]
        return [*out, TokenTrace(self.pick(last), num_layers, max_probability(last), "full")], None

    def emit(self, t: TokenTrace) -> bool:
        """Append a token; True when generation is over."""
        self.tokens.append(t.token)
        self.trace.append(t)
        if self.on_token is not None and not self.on_token(t):
            self.finish = "abort"
        elif t.token in self.stop:
            self.finish = "stop"
        elif self.remaining() <= 0:
            self.finish = "length"
        return self.finish is not None


class EarlyExitDecoder:
    """Greedy or sampled decoding of a ``CausalLM`` with early exits through a low-rank jump.

    ``jump`` None uses the identity shortcut (the logit lens) as exit head. The exit head is
    precomputed here once (fused for a pure jump)."""

    def __init__(self, lm: CausalLM, jump: LowRankJumps | None = None):
        self.lm = lm
        self.runner = LayerRunner(lm)
        self.num_layers = lm.num_layers
        self.exit_head = ExitHead(lm, jump)
        eos = lm.config.eos_token_id
        self.eos_ids: tuple[int, ...] = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)

    # --- public API ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], settings: GenerationSettings | None = None,
                 on_token: OnToken | None = None) -> Generation:
        """Continue ``prompt_ids``; see ``GenerationSettings`` and ``ExitSettings``. ``on_token`` sees
        each token as it is decided; returning False stops generation (finish_reason "abort")."""
        return self.generate_with_state(prompt_ids, settings, on_token)[0]

    @torch.inference_mode()
    def generate_with_state(self, prompt_ids: list[int], settings: GenerationSettings | None = None,
                            on_token: OnToken | None = None) -> tuple[Generation, DecodeState]:
        """``generate``, also returning the decode state (KV cache, pending tokens) for inspection."""
        settings = settings or GenerationSettings()
        self.check_prompt(prompt_ids)
        mode = settings.exit.mode
        run = SequenceRun(self, len(prompt_ids), settings, on_token)
        state, logits = self.prefill(prompt_ids)
        first = TokenTrace(run.pick(logits), self.num_layers, max_probability(logits), "full")
        if not run.emit(first):
            if mode == "exact":
                self._decode_exact(run, state)
            else:
                self._decode_plain(run, state)
        assert run.finish is not None
        return Generation(run.tokens, run.trace, run.finish, run.stats), state

    @torch.inference_mode()
    def follow(self, prompt_ids: list[int], continuation: list[int],
               settings: GenerationSettings | None = None) -> list[TokenTrace]:
        """Teacher forcing: feed ``continuation`` (e.g. the full model's own output) token by token
        and return, for tokens 1.., what the decoder would have picked there (greedy) and at which
        level. Measures per-token agreement under a KV policy without letting errors compound."""
        settings = settings or GenerationSettings()
        if settings.exit.mode == "exact":
            raise ValueError("follow() replays modes 'off' and 'approximate'; exact mode always agrees")
        self.check_prompt(prompt_ids + continuation[:-1])
        run = SequenceRun(self, len(prompt_ids), settings)
        state, _ = self.prefill(prompt_ids)
        check = settings.exit.mode == "approximate"
        out: list[TokenTrace] = []
        for token in continuation[:-1]:
            res = self._step(run, state, token, check=check, all_logits=False)
            kind: TokenKind = "full" if res.level == self.num_layers else "exited"
            out.append(TokenTrace(int(res.logits.argmax()), res.level, res.confidence, kind))
        return out

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> tuple[DecodeState, Tensor]:
        """Run the prompt through every block; return the state and the last position's logits (V,)."""
        state = DecodeState(self.runner.new_cache())
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        chunk = self.runner.layers(0, self.num_layers, self.runner.embed(ids, 0), state.cache)
        state.length = len(prompt_ids)
        return state, self.runner.full_logits(chunk.h[0, -1])

    @torch.inference_mode()
    def flush(self, state: DecodeState) -> None:
        """Run every pending token through the blocks it skipped, so all layers cover all tokens."""
        if not state.pending:
            return
        chunk, waiting = None, len(state.pending)
        for i in range(state.pending[-1].level, self.num_layers):
            chunk, waiting = self._join(state, chunk, waiting, i)
            if chunk is not None:
                self.runner.layer(i, chunk, state.cache)
        state.pending.clear()

    # --- one token --------------------------------------------------------------------------------
    def _join(self, state: DecodeState, chunk: Chunk | None, waiting: int, i: int) -> tuple[Chunk | None, int]:
        """Prepend the pending tokens whose next block is i (level == i) to the chunk."""
        joined = waiting
        while waiting and state.pending[waiting - 1].level == i:
            waiting -= 1
        if waiting == joined:
            return chunk, waiting
        states = [p.h for p in state.pending[waiting:joined]] + ([] if chunk is None else [chunk.h])
        start = state.length - (len(state.pending) - waiting)
        return Chunk(torch.cat(states, dim=1), start), waiting  # (1, q, d)

    def _step(self, run: SequenceRun, state: DecodeState, token: int, check: bool, all_logits: bool) -> StepResult:
        """Feed one token at position ``state.length``; exit at the first level where the gate fires."""
        L, policy = self.num_layers, run.settings.exit.kv_policy
        chunk: Chunk | None = self.runner.embed(torch.tensor([[token]]), state.length)
        waiting = len(state.pending)
        run.gate.reset()
        run.stats.steps += 1
        for i in range(L):
            chunk, waiting = self._join(state, chunk, waiting, i)
            assert chunk is not None
            self.runner.layer(i, chunk, state.cache)
            run.stats.layers_computed += chunk.size
            level = i + 1
            if not (check and level in run.levels):
                continue
            logits = self.exit_head(chunk.h[:, -1], level)[0]  # (V,)
            run.stats.exit_checks += 1
            leave, confidence = run.gate(logits)
            if leave:
                self._leave(run, state, chunk, waiting, level, policy)
                return StepResult(level, logits, confidence, chunk.start)
        assert chunk is not None
        assert waiting == 0
        state.pending.clear()
        state.length += 1
        full = self.runner.full_logits(chunk.h[0] if all_logits else chunk.h[0, -1:])  # (q, V)
        return StepResult(L, full[-1], max_probability(full[-1]), chunk.start, full)

    def _leave(self, run: SequenceRun, state: DecodeState, chunk: Chunk, waiting: int, level: int, policy: str) -> None:
        """The fed token exits at ``level``: its (and the chunk's) skipped blocks wait or are filled."""
        if policy == "copy":
            for j in range(level, self.num_layers):
                self.runner.fill_kv(j, chunk, state.cache)
            run.stats.kv_fills += (self.num_layers - level) * chunk.size
        else:
            state.pending[waiting:] = [Pending(chunk.h[:, k : k + 1], level) for k in range(chunk.size)]
        state.length += 1
        run.stats.layers_skipped += self.num_layers - level

    # --- decoding loops ---------------------------------------------------------------------------
    def _decode_plain(self, run: SequenceRun, state: DecodeState) -> None:
        """Modes off and approximate: each step's deciding head picks the next token."""
        check = run.settings.exit.mode == "approximate"
        token = run.tokens[-1]
        while True:
            res = self._step(run, state, token, check=check, all_logits=False)
            token = run.pick(res.logits)
            kind: TokenKind = "full" if res.level == self.num_layers else "exited"
            if run.emit(TokenTrace(token, res.level, res.confidence, kind)):
                return

    def _decode_exact(self, run: SequenceRun, state: DecodeState) -> None:
        """Draft with exits until a step goes full depth (by itself, or forced after max_draft
        drafts), which verifies the drafts; emit what survives and continue from there."""
        s = run.settings
        token = run.tokens[-1]
        drafts: list[Draft] = []
        while True:
            room = min(s.exit.max_draft, run.remaining() - 1)
            check = len(drafts) < room and not (drafts and drafts[-1].token in run.stop)
            res = self._step(run, state, token, check=check, all_logits=True)
            if res.level < self.num_layers:
                q = None if s.greedy else distribution(res.logits, s.temperature, s.top_p)
                token = int(res.logits.argmax()) if q is None else sample(q, run.generator)
                drafts.append(Draft(token, res.level, res.confidence, q))
                continue
            for t in self._verify(run, state, drafts, res):
                if run.emit(t):
                    return
            token, drafts = run.tokens[-1], []

    def _verify(self, run: SequenceRun, state: DecodeState, drafts: list[Draft], res: StepResult) -> list[TokenTrace]:
        """Row k of ``res.full_logits`` predicts the token after position start + k, i.e. drafts[k];
        a rejection at k crops every cache to drop drafts[k:] (positions start+k+1..)."""
        assert res.full_logits is not None
        traces, rejected = run.verify(drafts, res.full_logits, self.num_layers)
        if rejected is not None:
            state.cache.crop_all(res.start + rejected + 1)
            state.length = res.start + rejected + 1
        return traces

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """ValueError for a prompt that cannot be decoded: empty, filling the context, unknown ids."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS token)")
        n, vocab = len(prompt_ids), self.lm.vocab_size
        if n >= self.runner.context_length:
            raise ValueError(f"the prompt has {n} tokens; the model's context is {self.runner.context_length}, "
                             "which leaves no room to generate")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
