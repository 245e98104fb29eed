"""Runs of consecutive blocks at static shapes, captured once as CUDA graphs and replayed.

A decode step's block calls are tiny on a GPU: the time goes to launching kernels (about twenty a
block) and to Python. ``SegmentGraphs`` runs blocks first..last-1 for the rows of a call at padded
("bucketed") shapes, so that one captured graph serves every step of that shape:

- rows: padded to a bucket (1, 2, 4, 8, ...); padding rows write into a spare row of the cache
  that no sequence owns (``KVCache.spare_row``);
- tokens per row: padded to a bucket (1, 2, 4, 8, 16), right-padded as the eager path pads
  catch-up chunks: a padding token's keys land past its row's length, where nothing reads them
  (the cache has ``slack`` positions past its capacity for them);
- keys attended: the first ``kv`` positions, a power of two >= every row's last position, under a
  mask built inside the graph from the positions (causal, plus the sliding window); the rotary
  tables are looked up inside the graph too.

Static inputs (states, rows, positions) are buffers the graph reads; each run copies the call into
them, replays, and clones the states out (the next replay overwrites them). The host keeps the
cache's lengths (``KVCache.claim``) as the eager path does. Graphs are captured lazily, the first
time a shape is seen, into one shared memory pool.

On a CPU nothing is captured: the same static-shape code runs eagerly (``capture=False``), which is
how the tests check it against the eager path, token for token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.engine.blocks import Blocks
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.exit_head import LevelHead, confidence_and_top


class Stack(Protocol):
    """What a segment runs: the blocks of a ``LayerRunner`` with their masks' windows and rotary tables
    (a protocol, so that the runner, which owns the segments, is not imported here)."""

    lm: CausalLM
    blocks: Blocks
    context_length: int
    windows: list[int | None]
    layer_types: list[str | None]
    typed_rope: bool
    rope: dict[torch.device, dict[str | None, tuple[Tensor, Tensor]]]
    block_fn: Callable[..., Tensor]

log = logging.getLogger("onejump.engine")
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (1, 2, 4, 8, 16)
MIN_KV = 64
SLACK = TOKEN_BUCKETS[-1]  # positions past the capacity that padding tokens may write


def bucket(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size >= n, None when n is larger than every size."""
    return next((s for s in sizes if s >= n), None)


def kv_bucket(last_position: int, limit: int) -> int:
    """Keys attended: a power of two covering positions 0..last_position, at least ``MIN_KV``, at most ``limit``."""
    kv = MIN_KV
    while kv <= last_position:
        kv *= 2
    return min(kv, limit)


@dataclass(frozen=True)
class ExitCheck:
    """An exit check at the end of a segment: ``head`` (the exit head of level ``level``) on the newest state
    of the group rows ``rows``; ``last`` holds every group row's newest-token index."""

    head: LevelHead
    level: int
    rows: list[int]
    last: list[int]


@dataclass
class Checked:
    """What the check gave for its rows: exit logits (m, V) float32, max probability and top-1 (m,)."""

    logits: Tensor
    conf: Tensor
    top: Tensor


@dataclass(frozen=True)
class Shape:
    first: int
    last: int
    rows: int
    tokens: int
    kv: int


class _Segment:
    """Blocks first..last-1 at one static shape: static inputs, the body, and its graph (if captured)."""

    def __init__(self, runner: Stack, cache: KVCache, shape: Shape, device: torch.device,
                 head: LevelHead | None = None):
        self.runner, self.cache, self.shape, self.head = runner, cache, shape, head
        assert cache.spare_row is not None
        self.spare = cache.spare_row
        d = runner.lm.hidden_size
        dtype = cache.keys[shape.first].dtype
        self.h = torch.zeros(shape.rows, shape.tokens, d, dtype=dtype, device=device)
        self.rows = torch.full((shape.rows,), self.spare, dtype=torch.long, device=device)
        self.positions = torch.arange(shape.tokens, device=device).repeat(shape.rows, 1)
        self.newest = torch.zeros(shape.rows, dtype=torch.long, device=device)  # each row's newest token
        self.out: tuple[Tensor, ...] = ()
        self.graph: torch.cuda.CUDAGraph | None = None

    def body(self) -> tuple[Tensor, ...]:
        """The blocks on the static inputs, then the exit check if the segment has one (pure device work: no
        host reads, so it can be captured). Returns (states,) or (states, logits, conf, top)."""
        h = self.blocks()
        if self.head is None:
            return (h,)
        logits = self.head(h[torch.arange(self.shape.rows, device=h.device), self.newest].float())
        conf, top = confidence_and_top(logits)
        return h, logits, conf, top

    def blocks(self) -> Tensor:
        r, s = self.runner, self.shape
        keys = torch.arange(s.kv, device=self.positions.device)
        causal = keys <= self.positions.unsqueeze(-1)  # (n, q, kv)
        masks: dict[int | None, Tensor] = {}
        rope: dict[str | None, tuple[Tensor, Tensor]] = {}
        pos = self.positions.clamp(max=r.context_length - 1)  # padding past the context reads a real entry
        h = self.h
        for i in range(s.first, s.last):
            window = r.windows[i]
            if window not in masks:
                visible = causal if window is None else causal & (self.positions.unsqueeze(-1) - keys < window)
                masks[window] = visible.unsqueeze(1)  # (n, 1, q, kv)
            cos = sin = None
            tables = r.rope[r.blocks.devices[i]]
            if tables:
                kind = r.layer_types[i] if r.typed_rope else None
                if kind not in rope:
                    table_cos, table_sin = tables[kind]
                    rope[kind] = (table_cos[pos], table_sin[pos])
                cos, sin = rope[kind]
            h = r.block_fn(r.blocks.geometry, r.blocks.weights[i], h, self.cache.keys[i], self.cache.values[i],
                           self.rows, self.positions, s.kv, cos, sin, masks[window])
        return h

    def capture(self, pool: Any) -> None:
        """Warm up on a side stream (cuBLAS workspaces, lazy inits), then capture the body."""
        stream = torch.cuda.Stream(self.h.device)
        stream.wait_stream(torch.cuda.current_stream(self.h.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.body()
        torch.cuda.current_stream(self.h.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.out = self.body()
        self.graph = graph  # only a capture that succeeded is replayed

    def run(self, h: Tensor, call: RowCall) -> Tensor:
        """The blocks on the call's rows (h (n, q, d), n and q at most the shape's); returns (n, q, d)."""
        n, q = h.shape[:2]
        self.h.zero_()
        self.h[:n, :q] = h
        self.rows.fill_(self.spare)
        self.rows[:n] = call.rows_t
        self.positions.copy_(torch.arange(self.shape.tokens, device=h.device).expand_as(self.positions))
        self.positions[:n] = call.positions[:, :1] + torch.arange(self.shape.tokens, device=h.device)
        if self.graph is None:
            self.out = self.body()
        else:
            self.graph.replay()
        return self.out[0][:n, :q].clone()

    def checked(self, check: ExitCheck) -> Checked:
        """The fused check's outputs for the check's rows (after ``run``, which needs ``newest`` set first)."""
        rows = torch.tensor(check.rows, device=self.newest.device)
        _, logits, conf, top = self.out
        return Checked(logits[rows], conf[rows], top[rows])


class SegmentGraphs:
    """Static-shape segments of blocks, captured as CUDA graphs (``capture``) or run eagerly.

    ``supports(first, last, call)`` says whether a call can take this path: its blocks on one
    device, its rows and tokens within the buckets, and its positions within the cache's slack."""

    def __init__(self, runner: Stack, capture: bool, max_rows: int = 8):
        self.runner = runner
        self.capture = capture
        self.row_buckets = tuple(b for b in ROW_BUCKETS if b < max_rows) + (max_rows,)
        self.segments: dict[tuple[int, Shape, int | None], _Segment] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0
        self.capture_error: str | None = None  # why capturing stopped, if it did

    def supports(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache,
                 head: LevelHead | None = None) -> bool:
        devices = self.runner.blocks.devices
        if head is not None and head.device != devices[first]:
            return False
        return (cache.spare_row is not None and len(set(devices[first:last])) == 1
                and bucket(h.shape[0], self.row_buckets) is not None and bucket(h.shape[1], TOKEN_BUCKETS) is not None
                and max(call.starts) + h.shape[1] <= cache.capacity)

    def run(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache) -> Tensor:
        """Blocks first..last-1 on the call's rows (the host books the cache lengths, the segment writes keys)."""
        return self._segment(first, last, h, call, cache, None).run(h, call)

    def run_checked(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache,
                    check: ExitCheck) -> tuple[Tensor, Checked]:
        """``run`` with the exit check of level ``last`` fused to the end of the segment."""
        seg = self._segment(first, last, h, call, cache, check)
        seg.newest.zero_()
        seg.newest[: len(check.last)] = torch.tensor(check.last, device=seg.newest.device)
        out = seg.run(h, call)
        return out, seg.checked(check)

    def _segment(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache,
                 check: ExitCheck | None) -> _Segment:
        """The segment of this shape (captured on first use), the cache's lengths booked for the call."""
        for i in range(first, last):
            cache.claim(i, call)
        rows, tokens = bucket(h.shape[0], self.row_buckets), bucket(h.shape[1], TOKEN_BUCKETS)
        assert rows is not None
        assert tokens is not None
        kv = kv_bucket(max(call.starts) + tokens - 1, cache.capacity + cache.slack)
        shape = Shape(first, last, rows, tokens, kv)
        key = (id(cache), shape, None if check is None else check.level)
        seg = self.segments.get(key)
        if seg is None:
            seg = self.segments[key] = _Segment(self.runner, cache, shape, h.device,
                                                None if check is None else check.head)
            if self.capture:
                try:
                    seg.capture(self.pool)
                    self.captured += 1
                except RuntimeError as e:  # an op that syncs with the host (e.g. a kernel library's) cannot be captured
                    self.capture, self.capture_error = False, f"{type(e).__name__}: {e}"
                    log.warning("CUDA graph capture failed, static shapes run eagerly from now on: %s", e)
        return seg


Runner = Callable[[int, int, Tensor, RowCall, KVCache], Tensor]
