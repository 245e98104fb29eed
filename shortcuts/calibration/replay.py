"""Replaying an exit setting over a ``LevelTable``: the exit level and the pick of every step, the gate
checks each step paid, the perfect-gate ceilings, a bootstrap bound on agreement, and the learned gate
(fitted on a table, replayed step by step)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from shortcuts.calibration.table import LevelTable
from shortcuts.engine.learned_gate import FEATURES, LearnedGate, build_features
from shortcuts.engine.settings import ExitSettings


def replay(table: LevelTable, s: ExitSettings, learned: LearnedGate | None = None) -> tuple[Tensor, Tensor]:
    """Exit level (1..L) and the token each step would pick under ``s``'s gate (greedy) at the levels
    ``s.check_levels`` names; the learned gate needs its weights (``learned``)."""
    if s.gate == "learned":
        if learned is None:
            raise ValueError("the learned gate needs its weights")
        return _replay_learned(table, learned, s)
    fire = _fires(table, s)
    L = table.num_layers
    any_fire = fire.any(-1)
    first = torch.where(any_fire, fire.float().argmax(-1), torch.full_like(table.final_top, L - 1))
    level = first + 1
    picked = torch.where(any_fire, table.top.gather(1, first.clamp(max=L - 2)[:, None])[:, 0], table.final_top)
    return level, picked


def checks(level: Tensor, s: ExitSettings, num_layers: int) -> Tensor:
    """How many gate checks each token paid under ``s``: its checked levels up to its exit level."""
    checked = torch.tensor(s.check_levels(num_layers), dtype=torch.long)
    return (checked[None, :] <= level[:, None]).sum(-1)


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


# --- the learned gate ---------------------------------------------------------------------------------
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


def _replay_learned(table: LevelTable, gate: LearnedGate, s: ExitSettings) -> tuple[Tensor, Tensor]:
    """Exit level and pick of each step under the learned gate at ``s.threshold`` over ``s``'s levels.
    Steps go in order within each prompt: a step's ``prev_confidence`` is the confidence that
    decided the previous step (exit head at its exit level, else the full model)."""
    _need_features(table)
    L, N = table.num_layers, len(table)
    level, picked = torch.full((N,), L), table.final_top.clone()
    levels = s.check_levels(L)
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
