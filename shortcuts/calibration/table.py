"""Teacher-forced exit statistics: what every exit level would decide at every decode step.

One full forward pass over prompt + the full model's own greedy continuation gives, for each
decode step and each level l, the exit head's top-1, confidence and entropy, and the full
model's top-1. With the catch-up KV policy the early-exit decoder sees exactly these states
(skipped layers' keys/values are the full model's, computed later), so replaying a gate over the
table (``replay``) gives, without decoding again, the exit layer and the token the decoder would
pick at each step given the full model's prefix. ``EarlyExitDecoder.follow`` checks this by decoding.

At a weight format other than the dense model's (``engine.weights``), the table comes from the engine at
that format (``engine_table``): its full depth continues the prompts, its blocks give the states, its
head and exit head (in that format) decide; what calibrates each precision apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.collect import block_outputs
from shortcuts.engine.cache import RowCall
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead, entropy
from shortcuts.engine.learned_gate import head_stats
from shortcuts.engine.settings import ExitSettings, GenerationSettings


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


# --- the full model's continuations and every level's states --------------------------------------------
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


@torch.inference_mode()
def all_levels(lm: CausalLM, ids: list[list[int]]) -> Tensor:
    """(B, T, L+1, d) states of a right-padded batch: the embedding (block 1's input) and each block's output."""
    first: list[Tensor] = []

    def grab(_m: object, args: tuple, kwargs: dict) -> None:
        first.append(args[0] if args else kwargs["hidden_states"])

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        outs = block_outputs(lm, ids)
    finally:
        hook.remove()
    return torch.stack([first[0], *outs], dim=2)


# --- the table ---------------------------------------------------------------------------------------
def _head_stats(logits: Tensor, with_entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n, V) logits -> confidence, entropy (NaN unless ``with_entropy``: it costs as much again), top-1,
    margin (top-1 minus top-2 probability)."""
    conf, margin, top = head_stats(logits)
    return conf, entropy(logits) if with_entropy else torch.full_like(conf, float("nan")), top, margin


def _never(n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics of a level left out of a table: no gate fires there (confidence 0, entropy +inf,
    top-1 -1: never the full model's)."""
    zeros = torch.zeros(n, device=device)
    return zeros, torch.full_like(zeros, float("inf")), torch.full((n,), -1, dtype=torch.long, device=device), zeros


@torch.inference_mode()
def states_table(head: ExitHead, full_head: Callable[[Tensor], Tensor], states: Tensor, prompt: Tensor,
                 num_layers: int, chunk: int = 256, with_entropy: bool = True,
                 levels: Iterable[int] | None = None, desc: str | None = None) -> LevelTable:
    """The table of decode-step states (N, L+1, d): level 0 the embedding, 1..L-1 the exit levels,
    L the final state (pre-norm); ``full_head`` maps final states to the model's logits. ``levels``: only
    these exit levels are evaluated (default all); at the others no gate fires (``_never``). ``desc``: a
    progress bar over the levels with this label."""
    L = num_layers
    wanted = set(range(1, L) if levels is None else levels)

    def chunks(x: Tensor, fn: Callable[[Tensor], tuple[Tensor, ...]]) -> list[Tensor]:
        parts = [fn(x[s : s + chunk]) for s in range(0, len(x), chunk)]
        return [torch.cat(p) for p in zip(*parts, strict=True)]

    final_conf, _, final_top, _ = chunks(states[:, L], lambda f: _head_stats(full_head(f.float()), False))
    bar = tqdm(range(1, L), desc=desc, unit="level", disable=desc is None)
    stats = [chunks(states[:, lv], lambda h, lv=lv: _head_stats(head(h.float(), lv), with_entropy))  # type: ignore[misc]
             if lv in wanted else list(_never(len(states), final_conf.device)) for lv in bar]
    conf, ent, top, margin = (torch.stack([s[k] for s in stats], dim=1).cpu() for k in range(4))
    x = states.float()
    delta = (x[:, 1:L] - x[:, : L - 1]).norm(dim=-1) / x[:, : L - 1].norm(dim=-1).clamp_min(1e-6)
    return LevelTable(conf, ent, top, final_top.cpu(), prompt.cpu(), L, margin, delta.cpu(), final_conf.cpu())


@dataclass(frozen=True)
class TableHead:
    """An exit head to tabulate, and the levels it is evaluated at (None: all)."""

    head: ExitHead
    levels: tuple[int, ...] | None = None


@torch.inference_mode()
def _batch_tables(lm: CausalLM, heads: dict[str, TableHead], prompts: list[list[int]], conts: list[list[int]],
                  chunk: int, with_entropy: bool) -> dict[str, LevelTable]:
    """Decode steps k = 1..K-1 of each continuation: the state at position len(prompt)+k-1 (fed
    token k-1) predicts token k. Step 0 is the prefill, always full depth, so it is left out. One forward
    pass, one table per head."""
    outputs = all_levels(lm, [p + c for p, c in zip(prompts, conts, strict=True)])  # (B, T, L+1, d)
    rows = torch.cat([torch.full((len(c) - 1,), i) for i, c in enumerate(conts)]).to(lm.device)
    cols = torch.cat([torch.arange(len(p), len(p) + len(c) - 1) for p, c in zip(prompts, conts, strict=True)])
    states = outputs[rows, cols.to(lm.device)]
    return {k: states_table(h.head, lm.head, states, rows, lm.num_layers, chunk, with_entropy, h.levels)
            for k, h in heads.items()}


def level_tables(lm: CausalLM, heads: dict[str, TableHead], prompts: list[list[int]], conts: list[list[int]],
                 batch_size: int = 8, chunk: int = 256, with_entropy: bool = True) -> dict[str, LevelTable]:
    """The table of each head for every prompt (in order) and its continuation; see ``_batch_tables``."""
    if not prompts or min(len(c) for c in conts) < 2:
        raise ValueError("need at least one prompt and continuations of 2+ tokens (step 0 is the prefill)")
    parts: dict[str, list[LevelTable]] = {k: [] for k in heads}
    for start in tqdm(range(0, len(prompts), batch_size), desc="levels", unit="batch"):
        end = start + batch_size
        for k, t in _batch_tables(lm, heads, prompts[start:end], conts[start:end], chunk, with_entropy).items():
            parts[k].append(t)
    return {k: LevelTable.cat(v) for k, v in parts.items()}


def level_table(lm: CausalLM, head: ExitHead, prompts: list[list[int]], conts: list[list[int]],
                batch_size: int = 8, chunk: int = 256, with_entropy: bool = True) -> LevelTable:
    """The table for every prompt (in order) and its continuation; see ``_batch_tables``."""
    return level_tables(lm, {"head": TableHead(head)}, prompts, conts, batch_size, chunk, with_entropy)["head"]


def continued_table(lm: CausalLM, head: ExitHead, prompts: list[list[int]], new_tokens: int,
                    with_entropy: bool = True, engine: EarlyExitDecoder | None = None) -> LevelTable:
    """The full model continues ``prompts`` greedily for ``new_tokens``; the table of those steps. With
    ``engine`` (a decoder at some weight format) the engine's full depth, states and heads (``engine_table``)."""
    if engine is not None:
        return engine_table(engine, prompts, engine_continuations(engine, prompts, new_tokens), with_entropy)
    return level_table(lm, head, prompts, continuations(lm, prompts, new_tokens), with_entropy=with_entropy)


# --- the same from the engine, at its weight format ---------------------------------------------------
def engine_continuations(engine: EarlyExitDecoder, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The engine's full-depth greedy continuation of each prompt, ``new_tokens`` long (EOS suppressed)."""
    s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=ExitSettings(mode="off"))
    return [engine.generate(p, s).tokens for p in tqdm(prompts, desc="reference", unit="prompt")]


@torch.inference_mode()
def engine_levels(engine: EarlyExitDecoder, ids: list[int]) -> Tensor:
    """(T, L+1, d) states of one sequence through the engine's blocks: the embedding, then each block's output."""
    runner = engine.runner
    cache = runner.new_cache(1, len(ids))
    h = runner.embed_rows(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0))
    call = RowCall([0], [0], [len(ids)], len(ids), h.device)
    states = [h[0]]
    for i in range(runner.num_layers):
        h = runner.block(i, h, call, cache)
        states.append(h[0].to(states[0].device))
    return torch.stack(states, dim=1)


def engine_table(engine: EarlyExitDecoder, prompts: list[list[int]], conts: list[list[int]],
                 with_entropy: bool = True, chunk: int = 256) -> LevelTable:
    """``level_table`` from the engine: its blocks' states, its exit head, its full head."""
    heads = {"head": TableHead(engine.exit_head)}
    return engine_tables(engine, heads, prompts, conts, with_entropy, chunk)["head"]


def engine_tables(engine: EarlyExitDecoder, heads: dict[str, TableHead], prompts: list[list[int]],
                  conts: list[list[int]], with_entropy: bool = True, chunk: int = 256) -> dict[str, LevelTable]:
    """``level_tables`` from the engine: its blocks' states, each head (built on its runner), its full head."""
    if not prompts or min(len(c) for c in conts) < 2:
        raise ValueError("need at least one prompt and continuations of 2+ tokens (step 0 is the prefill)")
    states, rows = [], []
    for i, (p, c) in enumerate(tqdm(list(zip(prompts, conts, strict=True)), desc="levels", unit="prompt")):
        states.append(engine_levels(engine, p + c)[len(p) : len(p) + len(c) - 1])
        rows.append(torch.full((len(c) - 1,), i))
    x, r = torch.cat(states), torch.cat(rows)
    return {k: states_table(h.head, engine.runner.full_logits, x, r, engine.num_layers, chunk, with_entropy, h.levels)
            for k, h in heads.items()}
