"""The static key/value cache: one preallocated buffer per layer, one length per (layer, row).

Each row (a slot of the batch) is one sequence. Early exit lets every row fall behind on its own in
every layer (a token that leaves at level l has keys and values in layers 1..l only until catch-up
or the copy policy fills the rest), so ``lengths[layer][row]`` are independent, and speculative
decoding crops a row back on its own.

Invariant kept by the engine: layer i of row r holds the keys and values of positions
0..lengths[i][r]-1, contiguous and in order. The buffers are allocated once, zeroed (slots a mask
hides must hold finite numbers: a hidden slot gets weight 0, and 0 * NaN would still be NaN), on
each layer's own device, and never grow: ``capacity`` is the longest sequence the cache holds.

A ``RowCall`` is the geometry of one block call on some rows: which rows, where each row's tokens
start, how many of the call's q tokens are real (shorter rows are right-padded: padding keys land
past the row's length, where nothing reads them), and the attention mask for that geometry.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class RowCall:
    """Rows, first positions and real token counts of one call with q tokens per row.

    ``limit`` (the cache's capacity): padding that would run past it is written at position limit - 1
    instead, which no real token reaches (a sequence's fed positions stop at its context - 2: its last
    token is never fed), so a short row next to a long chunk never overflows the cache."""

    def __init__(self, rows: Sequence[int], starts: Sequence[int], counts: Sequence[int], q: int,
                 device: torch.device, limit: int | None = None):
        if not rows or not len(rows) == len(starts) == len(counts):
            raise ValueError("a call needs one start and one count per row, and at least one row")
        self.rows, self.starts, self.counts, self.q = list(rows), list(starts), list(counts), q
        self.kv_len = max(starts) + q
        self.device = device
        self.rows_t = torch.tensor(self.rows, device=device)
        # rows a, a+1, ..., b-1 in order: a block reads a view of the buffers instead of gathering them
        first = self.rows[0]
        self.span = (first, first + len(self.rows)) if self.rows == list(range(first, first + len(self.rows))) else None
        self.positions = torch.tensor(self.starts, device=device).unsqueeze(1) + torch.arange(q, device=device)
        if limit is not None and self.kv_len > limit:
            if max(s + c for s, c in zip(self.starts, self.counts, strict=True)) >= limit:
                raise ValueError(f"real positions up to {limit - 1} would fill the cache's last slot")
            self.kv_len = limit
            self.positions = self.positions.clamp(max=limit - 1)
        self.limit = limit
        self._masks: dict[int | None, Tensor | None] = {}
        self.rope: dict[str | None, tuple[Tensor, Tensor]] = {}  # rotary cos/sin per kind (runner._rotary)
        self._moved: dict[torch.device, RowCall] = {device: self}

    def mask(self, window: int | None) -> Tensor | None:
        """Boolean mask (n, 1, q, kv_len), True where query j of a row (position start + j) sees key k:
        k <= start + j and (no window or start + j - k < window). None when every key is visible to
        every query (one query per row, equal starts, no window cut): SDPA's fast path."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> Tensor | None:
        if self.q == 1 and len(set(self.starts)) == 1 and (window is None or self.kv_len <= window):
            return None
        pos = self.positions.unsqueeze(-1)  # (n, q, 1)
        key = torch.arange(self.kv_len, device=pos.device)  # (kv,)
        visible = key <= pos
        if window is not None:
            visible &= pos - key < window
        return visible.unsqueeze(1)  # (n, 1, q, kv)

    def moved(self, device: torch.device) -> RowCall:
        """The same call with its index tensors on another device (blocks split over devices); made
        once per device, so the blocks of a device share its masks and rotary lookups."""
        if device not in self._moved:
            self._moved[device] = RowCall(self.rows, self.starts, self.counts, self.q, device, self.limit)
            self._moved[device]._moved = self._moved
        return self._moved[device]


class KVCache:
    """Zeroed buffers (rows, H_kv, capacity, D) per layer; ``lengths[layer][row]`` positions are valid."""

    def __init__(self, num_layers: int, num_rows: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, devices: Sequence[torch.device | str], slack: int = 0):
        if min(num_layers, num_rows, capacity, kv_heads, head_dim) <= 0 or slack < 0:
            raise ValueError(f"{num_layers=}, {num_rows=}, {capacity=}, {kv_heads=} and {head_dim=} must be positive, "
                             f"{slack=} >= 0")
        if len(devices) != num_layers:
            raise ValueError(f"one device per layer: {len(devices)} devices for {num_layers} layers")
        self.num_layers, self.num_rows, self.capacity = num_layers, num_rows, capacity
        # static-shape segments (``graphs``): a spare row for padding rows, ``slack`` positions for padding tokens
        self.slack = slack
        self.spare_row: int | None = num_rows if slack else None
        shape = (num_rows + (1 if slack else 0), kv_heads, capacity + slack, head_dim)
        with torch.inference_mode(False):  # ordinary tensors wherever the cache is made (one compiled graph)
            self.keys = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]
            self.values = [torch.zeros(shape, dtype=dtype, device=dev) for dev in devices]
        self.lengths: list[list[int]] = [[0] * num_rows for _ in range(num_layers)]

    def length(self, layer: int, row: int = 0) -> int:
        return self.lengths[layer][row]

    def used(self) -> float:
        """Fraction of the cache's (layer, row, position) slots holding valid keys."""
        return sum(map(sum, self.lengths)) / (self.num_layers * self.num_rows * self.capacity)

    def reset_row(self, row: int) -> None:
        """Free a slot: its old keys stay in the buffer (finite, hidden) until overwritten."""
        for lengths in self.lengths:
            lengths[row] = 0

    def crop_row(self, row: int, length: int) -> None:
        """Forget every position >= ``length`` of one row in every layer (speculative rollback)."""
        if length < 0:
            raise ValueError(f"{length=} must be >= 0")
        for lengths in self.lengths:
            lengths[row] = min(lengths[row], length)

    def claim(self, layer: int, call: RowCall) -> tuple[Tensor, Tensor]:
        """Book the call's tokens in ``layer`` (each row's length advances by its real count) and hand
        out that layer's buffers, for the block to write keys/values at ``call.positions``."""
        lengths = self.lengths[layer]
        if call.kv_len > self.capacity:
            raise ValueError(f"positions up to {call.kv_len - 1} exceed the cache's capacity {self.capacity}")
        for row, start, count in zip(call.rows, call.starts, call.counts, strict=True):
            if lengths[row] != start:
                raise RuntimeError(f"layer {layer} row {row} caches {lengths[row]} positions, but its tokens "
                                   f"start at {start}: layers must be fed contiguous positions")
            lengths[row] = start + count
        return self.keys[layer], self.values[layer]

    def write(self, layer: int, call: RowCall, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write the call's keys/values (n, H_kv, q, D) at each row's length; return the call's rows'
        buffers up to ``kv_len``, (n, H_kv, kv_len, D) each."""
        k_buf, v_buf = self.claim(layer, call)
        index = (call.rows_t.unsqueeze(1), slice(None), call.positions)  # -> (n, q, H, D)
        k_buf[index] = key.transpose(1, 2)
        v_buf[index] = value.transpose(1, 2)
        return k_buf[call.rows_t, :, : call.kv_len], v_buf[call.rows_t, :, : call.kv_len]

    def row_kv(self, layer: int, row: int = 0) -> tuple[Tensor, Tensor]:
        """The valid keys and values of one row in one layer, (1, H_kv, length, D) each."""
        n = self.lengths[layer][row]
        return self.keys[layer][row : row + 1, :, :n], self.values[layer][row : row + 1, :, :n]
