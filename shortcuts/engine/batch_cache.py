"""A key/value cache for a batch of sequences: one padded buffer per layer, one length per (layer, row).

Each row (a slot of the batch) is one sequence; early exit lets every row fall behind on its own
in every layer, so ``lengths[layer][row]`` are independent. Before a decoder block runs on some
of the rows, the batch decoder ``bind``s a ``RowCall``: which rows take part, the cache length of
each at this layer (the position of its first token in the call) and how many of the call's q
tokens are real (shorter rows are right-padded). The Hugging Face attention then calls
``update(k, v, layer_idx)`` unchanged; this cache writes each row's q keys at that row's own
length (padding keys land past the valid length, where nothing reads them), advances the length
by the real count only, and returns the bound rows' buffers up to ``RowCall.kv_len``. The per-row
attention mask (``RowCall.mask``) hides every slot a row does not own.

Buffers start zeroed, so the slots a mask hides always hold finite numbers (a hidden slot gets
weight exactly 0, and 0 * NaN would still be NaN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class RowCall:
    """The geometry of one block call on a set of rows: rows, starts, real counts, q queries each."""

    def __init__(self, rows: list[int], starts: list[int], counts: list[int], q: int, device: torch.device,
                 max_position: int):
        if not rows or not len(rows) == len(starts) == len(counts):
            raise ValueError("a call needs one start and one count per row, and at least one row")
        self.rows, self.starts, self.counts, self.q = rows, starts, counts, q
        self.kv_len = max(starts) + q
        n, first = len(rows), rows[0]
        self.span = slice(first, first + n) if rows == list(range(first, first + n)) else None
        self.rows_t = torch.tensor(rows, device=device)
        positions = torch.tensor(starts).unsqueeze(1) + torch.arange(q)  # (n, q), padding included
        self.positions = positions.to(device)
        self.position_ids = positions.clamp(max=max_position).to(device)  # padding stays in the table
        self._masks: dict[int | None, Tensor | None] = {}

    def mask(self, window: int | None, dtype: torch.dtype) -> Tensor | None:
        """Additive mask (n, 1, q, kv_len): query j of a row (position start + j) sees key k iff
        k <= start + j and (no window or start + j - k < window). None when every key is visible
        to every query (one query per row, equal starts, no window cut), as ``runner.attention_mask``."""
        if window not in self._masks:
            self._masks[window] = self._build_mask(window, dtype)
        return self._masks[window]

    def _build_mask(self, window: int | None, dtype: torch.dtype) -> Tensor | None:
        if self.q == 1 and len(set(self.starts)) == 1 and (window is None or self.kv_len <= window):
            return None
        pos = self.positions.unsqueeze(-1)  # (n, q, 1)
        key = torch.arange(self.kv_len, device=pos.device)  # (kv,)
        visible = key <= pos
        if window is not None:
            visible &= pos - key < window
        mask = torch.zeros(visible.shape, dtype=dtype, device=pos.device)
        return mask.masked_fill_(~visible, torch.finfo(dtype).min).unsqueeze(1)  # (n, 1, q, kv)


class BatchKVCache:
    """Zeroed buffers (rows, H_kv, capacity, D) per layer; ``lengths[layer][row]`` positions are valid."""

    def __init__(self, num_layers: int, num_rows: int, initial_capacity: int = 64):
        if num_layers <= 0 or num_rows <= 0 or initial_capacity <= 0:
            raise ValueError(f"{num_layers=}, {num_rows=} and {initial_capacity=} must be positive")
        self.num_layers, self.num_rows, self.initial_capacity = num_layers, num_rows, initial_capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths: list[list[int]] = [[0] * num_rows for _ in range(num_layers)]
        self.call: RowCall | None = None

    def bind(self, call: RowCall) -> None:
        """The rows the next block calls run on (until the next ``bind``)."""
        self.call = call

    def length(self, layer: int, row: int) -> int:
        return self.lengths[layer][row]

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

    def _reserve(self, layer: int, like: Tensor, needed: int) -> None:
        buf = self.keys[layer]
        if buf is not None and buf.shape[2] >= needed:
            return
        old_cap = 0 if buf is None else buf.shape[2]
        capacity = max(needed, self.initial_capacity, 2 * old_cap)
        _, H, _, D = like.shape
        for store in (self.keys, self.values):
            new = like.new_zeros(self.num_rows, H, capacity, D)
            old = store[layer]
            if old is not None:
                new[:, :, :old_cap] = old
            store[layer] = new

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Write the bound rows' keys/values (n, H_kv, q, D) at each row's length; return the bound
        rows' buffers up to ``kv_len``, (n, H_kv, kv_len, D) each."""
        call = self.call
        if call is None or key.shape[0] != len(call.rows) or key.shape[2] != call.q:
            raise RuntimeError(f"update with keys {tuple(key.shape)} does not match the bound rows")
        lengths = self.lengths[layer_idx]
        for row, start, count in zip(call.rows, call.starts, call.counts, strict=True):
            if lengths[row] != start:
                raise RuntimeError(f"layer {layer_idx} row {row} caches {lengths[row]} positions, but its tokens "
                                   f"start at {start}: layers must be fed contiguous positions")
            lengths[row] = start + count
        self._reserve(layer_idx, key, call.kv_len)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        assert k_buf is not None
        assert v_buf is not None
        if len(call.rows) == 1:  # one row: plain slices, as LayerKVCache does
            r, s = call.rows[0], call.starts[0]
            k_buf[r : r + 1, :, s : s + call.q] = key
            v_buf[r : r + 1, :, s : s + call.q] = value
        else:
            index = (call.rows_t.unsqueeze(1), slice(None), call.positions)  # -> (n, q, H, D)
            k_buf[index] = key.transpose(1, 2)
            v_buf[index] = value.transpose(1, 2)
        if call.span is not None:
            return k_buf[call.span, :, : call.kv_len], v_buf[call.span, :, : call.kv_len]
        return k_buf[call.rows_t, :, : call.kv_len], v_buf[call.rows_t, :, : call.kv_len]

    def row_kv(self, layer: int, row: int) -> tuple[Tensor, Tensor]:
        """The valid keys and values of one row in one layer, (1, H_kv, length, D) each."""
        k, v = self.keys[layer], self.values[layer]
        if k is None or v is None:
            raise ValueError(f"layer {layer} has no cached keys yet")
        n = self.lengths[layer][row]
        return k[row : row + 1, :, :n], v[row : row + 1, :, :n]

    # --- the parts of the HF Cache interface that model code may ask for ----------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.lengths[layer_idx])

    def __len__(self) -> int:
        return self.num_layers
