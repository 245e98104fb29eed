"""Continuous batching with per-sequence early exits.

``BatchDecoder`` decodes up to ``max_batch_size`` sequences together, one token step at a time.
In a step every running sequence feeds its next token; block i runs once for all the sequences
still climbing (the active rows of a ``KVCache``); after a checked level each sequence's own
gate decides whether it leaves, and the ones that leave drop out of the rows that run the deeper
blocks. Sequences keep their own settings (mode, gate, threshold, min_layer, stride, KV policy,
sampling, budget, stop tokens), so a sequence decodes exactly as ``EarlyExitDecoder.generate``
would decode it alone, up to float rounding of batched matrix products:

- catch-up: a sequence's exited tokens wait in its ``pending`` list and join that sequence's row
  (prepended, so the row carries several tokens) at the first block they skipped, in the next step
  that climbs that far. Rows with fewer tokens than the widest row are right-padded; the padding
  queries' outputs are discarded and their keys land past the row's length, where nothing reads them.
- copy: after the layer loop, each skipped block's key/value projections fill the exited tokens'
  keys and values from their exit states (``runner.kv_projection``, for the rows that need that block).
- exact (self-speculative): drafts are exits; a step that goes to full depth verifies the row's
  caught-up drafts with the full head on all of its tokens and crops the row on a rejection.

Continuous: ``add`` prefills a new prompt on its own (a batch of one, in its slot) and picks its
first token; the sequence joins the token steps after that. Tokens and finishes reach the caller by
one route, ``step``'s ``SequenceOutput``s: the next ``step`` after an ``add`` reports the new
sequences' first tokens (before anything else is computed, so a first token is never held back by
the others' step), every other ``step`` decodes one token for every running sequence and reports
that. Finished or cancelled sequences leave and free their slot for the next ``add``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.engine.cache import RowCall
from shortcuts.engine.drafts import DraftStats, Plan, StepCosts, batch_cap
from shortcuts.engine.exit_head import ExitHead, confidence_and_top, entropy, to_host
from shortcuts.engine.graphs import Checked, ExitCheck
from shortcuts.engine.learned_gate import LearnedGate, gate_features
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.sequence import Generation, Pending, SequenceOutput, SequenceRun
from shortcuts.engine.settings import GenerationSettings
from shortcuts.errors import Cancelled


class Model(Protocol):
    """What a batch decodes with: the model-facing half of ``EarlyExitDecoder`` (its runner, exit head,
    learned gate and checks), which builds batches of itself."""

    lm: CausalLM
    runner: LayerRunner
    num_layers: int
    exit_head: ExitHead
    learned_gate: LearnedGate | None
    eos_ids: tuple[int, ...]
    draft_stats: DraftStats

    @property
    def step_costs(self) -> StepCosts: ...

    def check_prompt(self, prompt_ids: list[int]) -> None: ...

    def check_settings(self, settings: GenerationSettings) -> None: ...


PREFILL_CHUNK = 256  # prompt tokens per forward pass in prefill and scoring; ``stop`` is asked between chunks
Stop = Callable[[], bool]  # True: stop the work (raises ``Cancelled`` between two chunks)


@dataclass
class _Group:
    """The rows climbing together: right-padded states (n, q, d) and each row's real token count,
    first position and not-yet-joined pending tokens. Rebuilt whenever rows leave or tokens join."""

    seqs: list[SequenceRun]
    h: Tensor  # (n, q, d)
    counts: list[int]
    starts: list[int]
    waiting: list[int]
    call: RowCall

    @property
    def last(self) -> Tensor:
        """The state of each row's newest token, (n, d)."""
        idx = torch.tensor([c - 1 for c in self.counts], device=self.h.device)
        return self.h[torch.arange(len(self.seqs), device=self.h.device), idx]


@dataclass
class _Exit:
    seq: SequenceRun
    level: int
    h: Tensor  # (1, 1, d): the exit state (copy policy: a single token)
    start: int


class BatchDecoder:
    """Decodes up to ``max_batch_size`` sequences together with per-sequence early exits.

    Shares the model, runner and exit head of ``decoder``. Use ``add`` / ``step`` / ``cancel``
    for continuous batching, or ``generate`` to run a list of prompts to completion."""

    def __init__(self, decoder: Model, max_batch_size: int = 8):
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"{max_batch_size=} must be an integer >= 1")
        self.decoder = decoder
        self.runner = decoder.runner
        self.num_layers = decoder.num_layers
        self.exit_head = decoder.exit_head
        self.learned = decoder.learned_gate
        self.max_batch_size = max_batch_size
        self.cache = self.runner.new_cache(max_batch_size)
        self.slots: list[SequenceRun | None] = [None] * max_batch_size
        self._added: list[SequenceRun] = []  # added since the last ``step``: their first token is unreported

    # --- public API ------------------------------------------------------------------------------
    @property
    def running(self) -> list[SequenceRun]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return self.slots.count(None)

    def kv_usage(self) -> float:
        """Fraction of the static KV cache holding valid keys (for the server's gauge)."""
        return self.cache.used()

    @torch.inference_mode()
    def add(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None,
            forced: list[int] | None = None, stop: Stop | None = None, chunk: int = PREFILL_CHUNK) -> SequenceRun:
        """Prefill a prompt in a free slot and pick its first token (the next ``step`` reports it); the
        sequence decodes in the steps after. A sequence done at once (one token, or a stop token)
        frees its slot before returning. ``forced``: teacher forcing (see ``SequenceRun``). The prompt
        goes through the blocks ``chunk`` tokens at a time; ``stop`` is asked before each chunk
        (``Cancelled`` when it says so: the slot stays free)."""
        settings = settings or GenerationSettings()
        ids = [int(t) for t in prompt_ids]
        self.decoder.check_prompt(ids)
        self.decoder.check_settings(settings)
        if None not in self.slots:
            raise RuntimeError(f"the batch is full ({self.max_batch_size} sequences)")
        row = self.slots.index(None)
        dec = self.decoder
        exits = settings.exit
        costs = dec.step_costs if exits.mode == "exact" and exits.draft == "auto" else None
        seq = SequenceRun(row, len(ids), settings, self.num_layers, self.runner.context_length, dec.eos_ids,
                          dec.lm.device, forced, prompt=ids, costs=costs, draft_stats=dec.draft_stats)
        self.cache.reset_row(row)
        with self.runner.scope():
            logits = self._prefill(row, ids, stop, chunk)
        if not seq.emit(seq.pick_full(logits, to_host(*confidence_and_top(logits[None]))[0])):
            self.slots[row] = seq
        self._added.append(seq)
        return seq

    def cancel(self, seq: SequenceRun) -> None:
        """Stop a sequence (finish reason "abort" unless it had finished) and free its slot; ``step``
        reports nothing more of it."""
        if seq.finish is None:
            seq.finish = "abort"
        self._release(seq)
        if seq in self._added:
            self._added.remove(seq)

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """What is new, per sequence: after ``add``, the added sequences' first tokens (nothing is
        decoded then); else one token step for every running sequence, whose new tokens and finishes
        it reports (finished sequences have freed their slots)."""
        if self._added:
            added, self._added = self._added, []
            return [out for s in added if (out := s.report()) is not None]
        seqs = self.running
        if not seqs:
            return []
        plans = [s.begin_step() for s in seqs]
        self._cap_drafts(seqs, plans)
        with self.runner.scope():
            self._fill_copies(self._climb(self._start(seqs)))
        for s in seqs:
            if s.done:
                self._release(s)
        return [out for s in seqs if (out := s.report()) is not None]

    def generate(self, prompts: Sequence[Sequence[int]],
                 settings: GenerationSettings | Sequence[GenerationSettings] | None = None) -> list[Generation]:
        """Decode every prompt (admitted in order as slots free up) to completion."""
        if settings is None or isinstance(settings, GenerationSettings):
            settings = [settings or GenerationSettings()] * len(prompts)
        if len(settings) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(settings)} settings")
        seqs: list[SequenceRun] = []
        while len(seqs) < len(prompts) or self.running or self._added:
            while len(seqs) < len(prompts) and self.free_slots:
                seqs.append(self.add(prompts[len(seqs)], settings[len(seqs)]))
            self.step()
        return [s.generation for s in seqs]

    # --- blocks on rows --------------------------------------------------------------------------
    def _group(self, seqs: list[SequenceRun], h: Tensor, counts: list[int], starts: list[int],
               waiting: list[int]) -> _Group:
        return _Group(seqs, h, counts, starts, waiting, RowCall([s.row for s in seqs], starts, counts, h.shape[1],
                                                                h.device, self.cache.capacity))

    def _prefill(self, row: int, ids: list[int], stop: Stop | None = None, chunk: int = PREFILL_CHUNK) -> Tensor:
        """The prompt through every block in its own row (a batch of one), ``chunk`` tokens at a time;
        the last logits (V,)."""
        n, size = len(ids), max(chunk, 1)
        h = None
        for a in range(0, n, size):
            if stop is not None and stop():
                self.cache.reset_row(row)
                raise Cancelled(f"prefill stopped after {a} of {n} tokens")
            q = min(size, n - a)
            h = self.runner.embed_rows(torch.tensor([ids[a : a + q]]), torch.arange(a, a + q).unsqueeze(0))
            call = RowCall([row], [a], [q], q, h.device)
            for i in range(self.num_layers):
                h = self.runner.block(i, h, call, self.cache)
        assert h is not None
        return self.runner.full_logits(h[0, -1])

    # --- one step --------------------------------------------------------------------------------
    def _cap_drafts(self, seqs: list[SequenceRun], plans: list[Plan]) -> None:
        """Cap the ``auto`` rows' n-gram drafts at what pays for the whole batch (``drafts.batch_cap``:
        its chunk is padded to the longest row)."""
        if len(seqs) < 2 or not any(p.source == "ngram" and len(p.yields) > 1 for p in plans):
            return
        cap = batch_cap(plans, self.decoder.step_costs, max(s.length for s in seqs))
        if cap is not None:
            for s, p in zip(seqs, plans, strict=True):
                if len(p.yields) > 1:
                    s.cap(cap)

    def _start(self, seqs: list[SequenceRun]) -> _Group:
        """Every running sequence's fed tokens (its next token, then any n-gram drafts) at its
        position, one row each, right-padded to the longest."""
        feeds = [s.feed for s in seqs]
        counts = [len(f) for f in feeds]
        q = max(counts)
        ids = torch.tensor([f + [f[-1]] * (q - len(f)) for f in feeds])
        starts = [s.length for s in seqs]
        positions = (torch.tensor(starts).unsqueeze(1) + torch.arange(q)).clamp(max=self.runner.context_length - 1)
        h = self.runner.embed_rows(ids, positions)
        return self._group(seqs, h, counts, starts, [len(s.pending) for s in seqs])

    def _climb(self, g: _Group) -> list[_Exit]:
        """Blocks 1..L for the rows still climbing, a run of blocks at a time (``runner.segment``) from one
        event to the next: a level where a row checks its gate, or where pending tokens join. Returns the
        copy-policy exits to fill."""
        copies: list[_Exit] = []
        learned = self.learned is not None and any(s.settings.exit.gate == "learned" for s in g.seqs)
        i = 0
        while True:
            g = self._join(g, i)
            end = i + 1 if learned else self._next_event(g, i)
            h_in = g.last if learned else None  # the learned gate's feature: the state before the block
            rows = [j for j, s in enumerate(g.seqs) if s.checks(end)] if end < self.num_layers else []
            checked = None
            if rows and not learned:  # the check runs with the segment (in its graph, when it is one)
                check = ExitCheck(self.exit_head.levels[end], end, rows, [c - 1 for c in g.counts])
                g.h, checked = self.runner.checked_segment(i, end, g.h, g.call, self.cache, check)
            else:
                g.h = self.runner.segment(i, end, g.h, g.call, self.cache)
            for s, c in zip(g.seqs, g.counts, strict=True):
                s.stats.layers_computed += c * (end - i)
            i = end
            if i == self.num_layers:
                break
            left = self._check_exits(g, i, copies, h_in, checked)
            if left is None:
                return copies
            g = left
        self._top(g)
        return copies

    def _next_event(self, g: _Group, i: int) -> int:
        """The first level after ``i`` where a row of the group checks its gate or a pending token of a
        row joins (pending levels never increase with position: the last not yet joined joins first), else L."""
        end = self.num_layers
        for s, w in zip(g.seqs, g.waiting, strict=True):
            if s.check:
                end = min(end, s.next_check(i))
            if w:
                end = min(end, s.pending[w - 1].level)
        return end

    def _join(self, g: _Group, layer: int) -> _Group:
        """Prepend to each row its pending tokens whose next block is ``layer``."""
        joined = []
        for s, w in zip(g.seqs, g.waiting, strict=True):
            k = w
            while k and s.pending[k - 1].level == layer:
                k -= 1
            joined.append(w - k)
        if not any(joined):
            return g
        pieces = []
        for j, (s, w, n) in enumerate(zip(g.seqs, g.waiting, joined, strict=True)):
            states = [p.h for p in s.pending[w - n : w]]  # each (1, d)
            pieces.append(torch.cat([*states, g.h[j, : g.counts[j]]], dim=0))
        h = torch.nn.utils.rnn.pad_sequence(pieces, batch_first=True)  # (n, q', d), right-padded with zeros
        counts = [c + n for c, n in zip(g.counts, joined, strict=True)]
        starts = [st - n for st, n in zip(g.starts, joined, strict=True)]
        waiting = [w - n for w, n in zip(g.waiting, joined, strict=True)]
        return self._group(g.seqs, h, counts, starts, waiting)

    def _check_exits(self, g: _Group, level: int, copies: list[_Exit], h_in: Tensor | None,
                     checked: Checked | None = None) -> _Group | None:
        """Gate the rows that check ``level``; the ones that leave are handed their exit and dropped.
        ``h_in``: each row's newest state before the block (the learned gate's feature), or None;
        ``checked``: the exit head's outputs for those rows when the segment computed them."""
        idx = [j for j, s in enumerate(g.seqs) if s.checks(level)]
        if not idx:
            return g
        seqs = [g.seqs[j] for j in idx]
        if checked is None:
            h = g.last[idx]
            logits = self.exit_head(h, level)  # (m, V)
            score = None if h_in is None else self._learned_scores(seqs, logits, level, h, h_in[idx])
            leave = self._gates(seqs, logits, score)
        else:
            logits = checked.logits
            leave = self._gates(seqs, logits, None, (checked.conf, checked.top))
        if not any(x is not None for x in leave):
            return g
        for k, (j, top) in enumerate(zip(idx, leave, strict=True)):
            if top is not None:
                self._leave(g, j, level, copies)
                g.seqs[j].exited(level, logits[k], top)
        gone = {j for j, conf in zip(idx, leave, strict=True) if conf is not None}
        keep = [j for j in range(len(g.seqs)) if j not in gone]
        return self._select(g, keep) if keep else None

    def _learned_scores(self, seqs: list[SequenceRun], logits: Tensor, level: int, h: Tensor,
                        h_in: Tensor) -> Tensor | None:
        """The learned gate's score of every checked row (m,), or None when no row uses it."""
        if self.learned is None or not any(s.settings.exit.gate == "learned" for s in seqs):
            return None
        dev = logits.device
        prev_top = torch.tensor([-1 if s.check_top is None else s.check_top for s in seqs], device=dev)
        prev_conf = torch.tensor([s.prev_confidence for s in seqs], device=dev)
        features, _, _ = gate_features(logits, level, self.num_layers, h.to(dev), h_in.to(dev), prev_top, prev_conf)
        return self.learned.score(features)

    def _gates(self, seqs: list[SequenceRun], logits: Tensor, score: Tensor | None = None,
               conf_top: tuple[Tensor, Tensor] | None = None) -> list[tuple[int, float] | None]:
        """Each sequence's gate on its row of exit logits; (top-1, confidence) of those that leave, else None.
        The rows' max-probability, top-1 (entropy, learned score) cross to the host together: one
        sync per check. ``conf_top``: max-probability and top-1 already computed (a fused check)."""
        conf, top = confidence_and_top(logits) if conf_top is None else conf_top
        columns = [conf, top.to(conf.dtype)]
        columns.append(entropy(logits) if any(s.settings.exit.gate == "entropy" for s in seqs) else conf)
        columns.append(conf if score is None else score.to(conf))
        host = torch.stack(columns, dim=1).tolist()  # the one sync of this check
        out: list[tuple[int, float] | None] = []
        for s, (c, t, e, sc) in zip(seqs, host, strict=True):
            out.append((int(t), c) if s.fires(c, int(t), e, sc) else None)
        return out

    def _leave(self, g: _Group, j: int, level: int, copies: list[_Exit]) -> None:
        """Row j's tokens skip blocks level+1..L: they wait (catch-up) or get filled later (copy)."""
        s = g.seqs[j]
        if s.settings.exit.kv_policy == "copy":
            assert g.counts[j] == 1
            copies.append(_Exit(s, level, g.h[j : j + 1, :1], g.starts[j]))
            return
        w = g.waiting[j]
        s.pending[w:] = [Pending(g.h[j, k : k + 1], level) for k in range(g.counts[j])]

    def _select(self, g: _Group, keep: list[int]) -> _Group:
        q = max(g.counts[j] for j in keep)
        h = g.h[torch.tensor(keep, device=g.h.device), :q]
        return self._group([g.seqs[j] for j in keep], h, [g.counts[j] for j in keep],
                           [g.starts[j] for j in keep], [g.waiting[j] for j in keep])

    def _top(self, g: _Group) -> None:
        """The rows that went through every block: the full head decides (on every token of an exact row)."""
        rows: list[int] = []
        toks: list[int] = []
        spans: list[tuple[int, int]] = []
        for j, s in enumerate(g.seqs):
            first = 0 if s.settings.exit.mode == "exact" else g.counts[j] - 1
            spans.append((len(rows), len(rows) + g.counts[j] - first))
            rows += [j] * (g.counts[j] - first)
            toks += list(range(first, g.counts[j]))
        dev = g.h.device
        logits = self.runner.full_logits(g.h[torch.tensor(rows, device=dev), torch.tensor(toks, device=dev)])
        tops = to_host(*confidence_and_top(logits))  # one sync for every row of the step
        for j, (s, (a, b)) in enumerate(zip(g.seqs, spans, strict=True)):
            assert g.waiting[j] == 0
            s.reached_top(logits[a:b], tops[a:b], g.starts[j])
            if s.length < self.cache.length(0, s.row):
                self.cache.crop_row(s.row, s.length)

    def _fill_copies(self, exits: list[_Exit]) -> None:
        """Copy policy: block j's keys/values for every token that left at a level <= j."""
        if not exits:
            return
        exits = sorted(exits, key=lambda e: e.level)
        g: _Group | None = None
        members = 0
        for layer in range(exits[0].level, self.num_layers):
            n = sum(e.level <= layer for e in exits)
            if n != members:
                members = n
                part = exits[:n]
                dev = self.runner.blocks.devices[layer]  # exits from several levels: maybe several devices
                h = torch.cat([e.h.to(dev) for e in part], dim=0)  # (n, 1, d)
                g = self._group([e.seq for e in part], h, [1] * n, [e.start for e in part], [0] * n)
            assert g is not None
            self.runner.fill_kv(layer, g.h, g.call, self.cache)
        for e in exits:
            e.seq.stats.kv_fills += self.num_layers - e.level

    def _release(self, seq: SequenceRun) -> None:
        """Free the slot; the row's keys stay in ``cache`` (readable for inspection) until the next ``add``."""
        if 0 <= seq.row < len(self.slots) and self.slots[seq.row] is seq:
            self.slots[seq.row] = None
