"""Teacher-forced exit statistics: what every exit level would decide at every decode step.

One full forward pass over prompt + the full model's own greedy continuation gives, for each
decode step and each level l, the exit head's top-1, confidence and entropy, and the full
model's top-1. With the catch-up KV policy the early-exit decoder sees exactly these states
(skipped layers' keys/values are the full model's, computed later), so replaying a gate over the
table gives, without decoding again, the exit layer and the token the decoder would pick at each
step given the full model's prefix: per-token greedy agreement, the exit-depth histogram, the
oracle ceiling, and a calibrated threshold. ``EarlyExitDecoder.follow`` checks this by decoding.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.collect import read_corpus
from shortcuts.engine.exit_head import ExitHead, entropy
from shortcuts.engine.learned_gate import FEATURES, LearnedGate, build_features, head_stats
from shortcuts.engine.settings import ExitSettings
from shortcuts.lab.traces import all_levels, first_usable


@dataclass
class LevelTable:
    """Per decode step n and level l (column l-1, l = 1..L-1) what the exit head says."""

    confidence: Tensor  # (N, L-1) max softmax probability
    entropy: Tensor  # (N, L-1) nats
    top: Tensor  # (N, L-1) top-1 token
    final_top: Tensor  # (N,) the full model's top-1
    prompt: Tensor  # (N,) which prompt the step belongs to
    num_layers: int
    # what the learned gate's features need (None in tables built by hand)
    margin: Tensor | None = None  # (N, L-1) top-1 minus top-2 probability
    delta: Tensor | None = None  # (N, L-1) norm(h_l - h_{l-1}) / norm(h_{l-1}), h_0 the embedding
    final_conf: Tensor | None = None  # (N,) the full model's max probability

    def __len__(self) -> int:
        return int(self.final_top.shape[0])

    @property
    def num_prompts(self) -> int:
        return int(self.prompt.max()) + 1 if len(self) else 0

    @staticmethod
    def cat(tables: list[LevelTable]) -> LevelTable:
        offsets = [0]
        for t in tables[:-1]:
            offsets.append(offsets[-1] + t.num_prompts)
        def cat(k: str) -> Tensor | None:
            parts = [getattr(t, k) for t in tables]
            return None if any(p is None for p in parts) else torch.cat(parts)

        return LevelTable(*(cat(k) for k in ("confidence", "entropy", "top", "final_top")),  # type: ignore[arg-type, call-arg]
                          torch.cat([t.prompt + o for t, o in zip(tables, offsets, strict=True)]),
                          tables[0].num_layers, cat("margin"), cat("delta"), cat("final_conf"))

    @property
    def step_rank(self) -> Tensor:
        """(N,) the index of each row within its prompt (rows are in prompt, then step, order)."""
        first = torch.full((self.num_prompts,), len(self), dtype=torch.long).scatter_reduce_(
            0, self.prompt, torch.arange(len(self)), "amin")
        return torch.arange(len(self)) - first[self.prompt]


# --- prompts and the full model's continuations ----------------------------------------------------
def held_out_prompts(lm: CausalLM, corpus: str | Path, n: int, offset: int = 0, seed: int = 0,
                     min_tokens: int = 8, max_tokens: int = 48) -> list[list[int]]:
    """``n`` sentences of a corpus (.jsonl or .txt, see ``collect.read_corpus``), shuffled with
    ``seed``, skipping the first ``offset`` (so calibration and sweep use disjoint slices), tokenized."""
    texts = read_corpus(corpus)
    random.Random(seed).shuffle(texts)
    out = first_usable(lm, texts[offset:], n, min_tokens, max_tokens)
    if len(out) == n:
        return out
    raise ValueError(f"{corpus} has only {len(out)} usable sentences after offset {offset}; {n} asked")


@torch.inference_mode()
def continuations(lm: CausalLM, prompts: list[list[int]], new_tokens: int, batch_size: int = 16) -> list[list[int]]:
    """The full model's greedy continuation of each prompt, ``new_tokens`` long (EOS suppressed)."""
    pad = lm.tokenizer.pad_token_id or 0
    out: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="reference", unit="batch"):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=lm.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=lm.device)
        gen = lm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=pad)
        out += gen[:, width:].tolist()
    return out


# --- the table ---------------------------------------------------------------------------------------
def _head_stats(logits: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n, V) logits -> confidence, entropy (NaN unless ``with_entropy``: it costs as much again), top-1,
    margin (top-1 minus top-2 probability)."""
    conf, margin, top = head_stats(logits)
    return conf, entropy(logits) if with_entropy else torch.full_like(conf, float("nan")), top, margin


@torch.inference_mode()
def states_table(head: ExitHead, full_head: Callable[[Tensor], Tensor], states: Tensor, prompt: Tensor,
                 num_layers: int, chunk: int = 256, with_entropy: bool = True) -> LevelTable:
    """The table of decode-step states (N, L+1, d): level 0 the embedding, 1..L-1 the exit levels,
    L the final state (pre-norm); ``full_head`` maps final states to the model's logits."""
    L = num_layers

    def chunks(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, ...]]) -> list[Tensor]:
        parts = [fn(x[s : s + chunk]) for s in range(0, len(x), chunk)]
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    final_conf, _, final_top, _ = chunks(states[:, L], lambda f: _head_stats(full_head(f.float()), False))
    stats = [chunks(states[:, lv], lambda h, lv=lv: _head_stats(head(h.float(), lv), with_entropy))  # type: ignore[misc]
             for lv in range(1, L)]
    conf, ent, top, margin = (torch.stack([s[k] for s in stats], dim=1).cpu() for k in range(4))
    x = states.float()
    delta = (x[:, 1:L] - x[:, : L - 1]).norm(dim=-1) / x[:, : L - 1].norm(dim=-1).clamp_min(1e-6)
    return LevelTable(conf, ent, top, final_top.cpu(), prompt.cpu(), L, margin, delta.cpu(), final_conf.cpu())


@torch.inference_mode()
def _batch_table(lm: CausalLM, head: ExitHead, prompts: list[list[int]], conts: list[list[int]],
                 chunk: int, with_entropy: bool) -> LevelTable:
    """Decode steps k = 1..K-1 of each continuation: the state at position len(prompt)+k-1 (fed
    token k-1) predicts token k. Step 0 is the prefill, always full depth, so it is left out."""
    outputs = all_levels(lm, [p + c for p, c in zip(prompts, conts, strict=True)])  # (B, T, L+1, d)
    rows = torch.cat([torch.full((len(c) - 1,), i) for i, c in enumerate(conts)]).to(lm.device)
    cols = torch.cat([torch.arange(len(p), len(p) + len(c) - 1) for p, c in zip(prompts, conts, strict=True)])
    return states_table(head, lm.head, outputs[rows, cols.to(lm.device)], rows, lm.num_layers, chunk, with_entropy)


def level_table(lm: CausalLM, head: ExitHead, prompts: list[list[int]], conts: list[list[int]],
                batch_size: int = 8, chunk: int = 256, with_entropy: bool = True) -> LevelTable:
    """The table for every prompt (in order) and its continuation; see ``_batch_table``."""
    if not prompts or min(len(c) for c in conts) < 2:
        raise ValueError("need at least one prompt and continuations of 2+ tokens (step 0 is the prefill)")
    tables = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="levels", unit="batch"):
        end = start + batch_size
        tables.append(_batch_table(lm, head, prompts[start:end], conts[start:end], chunk, with_entropy))
    return LevelTable.cat(tables)


# --- replaying gates ---------------------------------------------------------------------------------
def _fires(table: LevelTable, s: ExitSettings) -> Tensor:
    """(N, L-1) bool: the gate would let the token leave at this level (checked levels only)."""
    checked = torch.zeros(table.num_layers - 1, dtype=torch.bool)
    checked[[lv - 1 for lv in s.check_levels(table.num_layers)]] = True
    if s.gate == "confidence":
        fire = table.confidence >= s.threshold  # a threshold of 1.0 checks no level at all
    elif s.gate == "entropy":
        fire = table.entropy <= s.threshold
    else:
        fire = _patience(table.top, checked, s.patience)
    return fire & checked


def _patience(top: Tensor, checked: Tensor, patience: int) -> Tensor:
    """Same top-1 for ``patience`` checked levels in a row, counted over the checked levels."""
    fire = torch.zeros_like(top, dtype=torch.bool)
    streak = torch.zeros(top.shape[0], dtype=torch.long)
    last = torch.full((top.shape[0],), -1, dtype=top.dtype)
    for j in torch.nonzero(checked).flatten().tolist():
        streak = torch.where(top[:, j] == last, streak + 1, torch.ones_like(streak))
        last = top[:, j]
        fire[:, j] = streak >= patience
    return fire


def replay(table: LevelTable, s: ExitSettings) -> tuple[Tensor, Tensor]:
    """Exit level (1..L) and the token each step would pick under the gate (greedy)."""
    fire = _fires(table, s)
    L = table.num_layers
    any_fire = fire.any(-1)
    first = torch.where(any_fire, fire.float().argmax(-1), torch.full_like(table.final_top, L - 1))
    level = first + 1
    picked = torch.where(any_fire, table.top.gather(1, first.clamp(max=L - 2)[:, None])[:, 0], table.final_top)
    return level, picked


def oracle_levels(table: LevelTable) -> dict[str, Tensor]:
    """Ceilings: ``first_hit`` stops at the first level whose top-1 is the full model's (a perfect
    gate); ``stable`` at the first level from which every later level agrees (L when none)."""
    hit = table.top == table.final_top[:, None]  # (N, L-1)
    L = table.num_layers
    first_hit = torch.where(hit.any(-1), hit.float().argmax(-1) + 1, torch.full_like(table.final_top, L))
    miss_after = torch.flip(torch.cummax(torch.flip((~hit).long(), [1]), 1).values, [1])  # 1 if a miss at >= l
    stable_from = (miss_after == 0).long()
    stable = torch.where(stable_from.any(-1), stable_from.argmax(-1) + 1, torch.full_like(table.final_top, L))
    return {"first_hit": first_hit, "stable": stable}


# --- calibration ----------------------------------------------------------------------------------------
def bootstrap_lower_bound(agree: Tensor, prompt: Tensor, confidence: float = 0.95, draws: int = 2000,
                          seed: int = 0) -> float:
    """One-sided lower confidence bound on token agreement, resampling whole prompts (the tokens of a
    prompt are not independent)."""
    n_prompts = int(prompt.max()) + 1
    hits = torch.zeros(n_prompts).index_add_(0, prompt, agree.float())
    counts = torch.zeros(n_prompts).index_add_(0, prompt, torch.ones_like(agree, dtype=torch.float))
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n_prompts, (draws, n_prompts), generator=g)
    rates = hits[picks].sum(1) / counts[picks].sum(1)
    return float(torch.quantile(rates, 1.0 - confidence))


@dataclass(frozen=True)
class CostModel:
    """Per-token decode cost in decoder blocks: a check of the exit gate costs ``check`` blocks,
    the full LM head ``head`` blocks (paid only by tokens that go full depth). Layers a token skips
    count as free, which makes the predicted speed-up an upper bound: catch-up runs them later in a
    chunk with the next deep token, where on a CPU 4 tokens cost 1.5-2 blocks (docs/engine.md)."""

    check: float = 0.0
    head: float = 0.0

    @classmethod
    def from_model(cls, lm: CausalLM, rank: int | None) -> CostModel:
        """From multiply-adds per token: a block's parameters, V·d for the head, d·r + V·(r+1) for
        the fused check (V·d when the check needs a full head: identity or residual jumps)."""
        block = sum(p.numel() for p in lm.layers[0].parameters())
        V, d = lm.vocab_size, lm.hidden_size
        check = V * d if rank is None else d * rank + V * (rank + 1)
        return cls(check=check / block, head=V * d / block)

    def speedup(self, level: Tensor, checks: Tensor, num_layers: int) -> float:
        """(L + head) over the mean cost of the replayed tokens."""
        full = (level == num_layers).float()
        cost = level.float() + self.check * checks.float() + self.head * full
        return (num_layers + self.head) / float(cost.mean())


def checks_made(level: Tensor, s: ExitSettings, num_layers: int) -> Tensor:
    """How many gate checks each token paid: the checked levels up to its exit level."""
    checked = torch.tensor(s.check_levels(num_layers), dtype=torch.long)
    return (checked[None, :] <= level[:, None]).sum(-1)


@dataclass
class Calibration:
    gate: str
    threshold: float
    target: float
    confidence: float
    agreement: float
    lower_bound: float
    mean_exit_layer: float
    min_layer: int
    stride: int
    tokens: int
    prompts: int
    predicted_speedup: float = 1.0

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _grid(table: LevelTable, gate: str) -> list[float]:
    if gate == "confidence":
        return [round(x, 3) for x in torch.linspace(0.05, 1.0, 96).tolist()]
    top = float(table.entropy.max())
    return [round(x, 4) for x in torch.linspace(0.0, top, 96).tolist()]


def _candidates(table: LevelTable, gates: tuple[str, ...], min_layers: tuple[int, ...],
                stride: int) -> list[ExitSettings]:
    return [ExitSettings(mode="approximate", gate=g, threshold=t, min_layer=m, stride=stride)  # type: ignore[arg-type]
            for g in gates for m in min_layers for t in _grid(table, g)]


def calibrate(table: LevelTable, target: float, gates: tuple[str, ...] = ("confidence", "entropy"),
              confidence: float = 0.95, min_layers: tuple[int, ...] = (1,), stride: int = 1,
              cost: CostModel | None = None) -> Calibration:
    """Among gates x first exit levels x thresholds whose agreement lower bound reaches ``target``,
    the one with the highest predicted speed-up under ``cost`` (the default, free checks and head,
    ranks by mean exit layer alone); the never-exiting confidence threshold 1.0 when none does."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"{target=} must be in (0, 1]")
    if "entropy" in gates and bool(table.entropy.isnan().any()):
        raise ValueError("the table was built without entropies (with_entropy=False); the entropy gate needs them")
    cost = cost or CostModel()
    L = table.num_layers
    best = Calibration("confidence", 1.0, target, confidence, 1.0, 1.0, float(L), min(min_layers), stride,
                       len(table), table.num_prompts, 1.0)
    for s in _candidates(table, gates, min_layers, stride):
        level, picked = replay(table, s)
        speedup = cost.speedup(level, checks_made(level, s, L), L)
        if speedup <= best.predicted_speedup:
            continue
        agree = picked == table.final_top
        bound = bootstrap_lower_bound(agree, table.prompt, confidence)
        if bound >= target:
            best = Calibration(s.gate, s.threshold, target, confidence, float(agree.float().mean()), bound,
                               float(level.float().mean()), s.min_layer, stride, len(table), table.num_prompts,
                               speedup)
    return best


# --- settings over any gate, the learned gate, the search ------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One exit setting to replay: gate kind (confidence, entropy or learned), threshold, and the
    checked levels min_layer, min_layer + stride, ... < L (a confidence or learned threshold of 1.0
    checks none)."""

    gate: str
    threshold: float
    min_layer: int = 1
    stride: int = 1

    def levels(self, num_layers: int) -> list[int]:
        if self.gate in ("confidence", "learned") and self.threshold >= 1.0:
            return []
        return list(range(self.min_layer, num_layers, self.stride))

    def exit_settings(self) -> ExitSettings:
        return ExitSettings(mode="approximate", gate=self.gate, threshold=self.threshold,  # type: ignore[arg-type]
                            min_layer=self.min_layer, stride=self.stride)


def _prev_full_conf(table: LevelTable) -> Tensor:
    """(N,) the full model's confidence at the previous step of the same prompt (a prompt's first step:
    its own, standing in for the prefill's, which the table does not hold)."""
    assert table.final_conf is not None
    prev = torch.roll(table.final_conf, 1)
    first = table.step_rank == 0
    return torch.where(first, table.final_conf, prev)


def _need_features(table: LevelTable) -> None:
    if table.margin is None or table.delta is None or table.final_conf is None:
        raise ValueError("this table has no learned-gate features (build it with level_table or states_table)")


def gate_training_rows(table: LevelTable) -> tuple[Tensor, Tensor]:
    """Every (step, level) of a table as a training row of the learned gate: features (N·(L-1), F) with
    every level checked and the previous token decided at full depth, and the target (N·(L-1),): the
    exit head's top-1 is the full model's."""
    _need_features(table)
    L, N = table.num_layers, len(table)
    agree = torch.zeros_like(table.confidence)
    agree[:, 1:] = (table.top[:, 1:] == table.top[:, :-1]).float()
    lv = torch.arange(1, L).expand(N, L - 1)
    prev = _prev_full_conf(table)[:, None].expand(N, L - 1)
    x = build_features(table.confidence, table.margin, lv, agree, table.delta, prev, L)  # type: ignore[arg-type]
    return x.reshape(N * (L - 1), -1), (table.top == table.final_top[:, None]).reshape(-1)


def fit_learned_gate(table: LevelTable, l2: float = 1e-3) -> LearnedGate:
    x, y = gate_training_rows(table)
    return LearnedGate.fit(x, y, table.num_layers, l2=l2)


def replay_learned(table: LevelTable, gate: LearnedGate, s: Setting) -> tuple[Tensor, Tensor]:
    """Exit level and pick of each step under the learned gate at ``s.threshold`` over ``s``'s levels.
    Steps go in order within each prompt: a step's ``prev_confidence`` is the confidence that
    decided the previous step (exit head at its exit level, else the full model)."""
    _need_features(table)
    L, N = table.num_layers, len(table)
    level, picked = torch.full((N,), L), table.final_top.clone()
    levels = s.levels(L)
    if not levels:
        return level, picked
    cols = torch.tensor(levels) - 1
    conf, top = table.confidence[:, cols], table.top[:, cols]
    agree = torch.zeros_like(conf)
    agree[:, 1:] = (top[:, 1:] == top[:, :-1]).float()
    lv = (cols + 1).expand(N, len(cols))
    feats = build_features(conf, table.margin[:, cols], lv, agree, table.delta[:, cols],  # type: ignore[index]
                           torch.zeros_like(conf), L)
    base = gate.logit(feats)  # (N, C) without the prev_confidence term
    w_prev = float(gate.weights[FEATURES.index("prev_confidence")])
    cut = math.log(s.threshold / (1 - s.threshold)) if 0 < s.threshold < 1 else (-math.inf if s.threshold <= 0
                                                                                  else math.inf)
    used = table.final_conf.clone()  # type: ignore[union-attr]
    rank = table.step_rank
    for k in range(int(rank.max()) + 1):
        idx = torch.nonzero(rank == k).flatten()
        prev = table.final_conf[idx] if k == 0 else used[idx - 1]  # type: ignore[index]
        fire = base[idx] + w_prev * prev[:, None] >= cut
        hit, first = fire.any(-1), fire.float().argmax(-1)
        level[idx] = torch.where(hit, cols[first] + 1, L)
        picked[idx] = torch.where(hit, top[idx, first], table.final_top[idx])
        used[idx] = torch.where(hit, conf[idx, first], table.final_conf[idx])  # type: ignore[index]
    return level, picked


def replay_setting(table: LevelTable, s: Setting, gate: LearnedGate | None = None) -> tuple[Tensor, Tensor]:
    if s.gate == "learned":
        if gate is None:
            raise ValueError("the learned gate needs its weights")
        return replay_learned(table, gate, s)
    return replay(table, s.exit_settings())


def setting_checks(level: Tensor, s: Setting, num_layers: int) -> Tensor:
    """How many checks each token paid under ``s``: its checked levels up to its exit level."""
    checked = torch.tensor(s.levels(num_layers) or [num_layers], dtype=torch.long)
    return (checked[None, :] <= level[:, None]).sum(-1) if s.levels(num_layers) else torch.zeros_like(level)


def predicted_speedup(cost: CostModel, level: Tensor, s: Setting, num_layers: int, skip: float = 0.0) -> float:
    """Speed-up over full depth under ``cost``; each skipped layer still costs ``skip`` blocks (catch-up
    runs it later in a chunk with the next deep token)."""
    extra = skip * (num_layers - level).float()
    return cost.speedup(level.float() + extra, setting_checks(level, s, num_layers), num_layers)


def grid(table: LevelTable, gate: str) -> list[float]:
    if gate == "learned":
        return [round(x, 4) for x in (torch.linspace(0.1, 0.99, 90).tolist() + [0.992, 0.995, 0.997, 0.999])]
    return _grid(table, gate)


def search(table: LevelTable, target: float, costs: dict[str, CostModel], gate: LearnedGate | None = None,
           min_layers: tuple[int, ...] = (1,), strides: tuple[int, ...] = (1,), skip: float = 0.0,
           confidence: float = 0.95) -> dict[str, Calibration]:
    """For each gate kind in ``costs`` (confidence, entropy, learned), over thresholds x first levels x
    strides, the setting with the best predicted speed-up whose bootstrap lower bound on agreement
    reaches ``target``; when none does, the never-exiting confidence threshold 1.0 (speed-up 1.0)."""
    L, out = table.num_layers, {}
    for g, cost in costs.items():
        best = Calibration("confidence", 1.0, target, confidence, 1.0, 1.0, float(L), min(min_layers), 1, len(table),
                           table.num_prompts, 1.0)
        for m in min_layers:
            for stride in strides:
                for t in grid(table, g):
                    s = Setting(g, t, m, stride)
                    level, picked = replay_setting(table, s, gate)
                    speed = predicted_speedup(cost, level, s, L, skip)
                    if speed <= best.predicted_speedup:
                        continue
                    agree = picked == table.final_top
                    bound = bootstrap_lower_bound(agree, table.prompt, confidence)
                    if bound >= target:
                        best = Calibration(g, t, target, confidence, float(agree.float().mean()), bound,
                                           float(level.float().mean()), m, stride, len(table), table.num_prompts,
                                           speed)
        out[g] = best
    return out
