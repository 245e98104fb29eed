"""A key/value cache with one independent length per layer.

Early exit makes layers fall behind: a token that leaves at level l has keys and values in
layers 1..l only, until the catch-up pass (or the copy policy) fills the rest. So every layer
keeps its own buffer and its own length, and can be cropped on its own (speculative decoding
rolls rejected drafts back).

Invariant kept by the engine: layer i holds the keys and values of positions 0..length(i)-1,
contiguous and in order. Hugging Face attention modules call ``update(k, v, layer_idx)``; this
class answers that call, so the HF decoder blocks run unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor


class LayerKVCache:
    """Growable per-layer buffers of shape (B, H_kv, capacity, D); ``lengths[i]`` are valid."""

    def __init__(self, num_layers: int, initial_capacity: int = 64):
        if num_layers <= 0:
            raise ValueError(f"{num_layers=} must be positive")
        if initial_capacity <= 0:
            raise ValueError(f"{initial_capacity=} must be positive")
        self.num_layers = num_layers
        self.initial_capacity = initial_capacity
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths: list[int] = [0] * num_layers

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def _reserve(self, layer: int, like: Tensor, needed: int) -> None:
        """Make room for ``needed`` positions in ``layer``, doubling the buffer when it is full."""
        buf = self.keys[layer]
        if buf is not None and buf.shape[2] >= needed:
            return
        capacity = max(needed, self.initial_capacity, 2 * (0 if buf is None else buf.shape[2]))
        B, H, _, D = like.shape
        n = self.lengths[layer]
        for store in (self.keys, self.values):
            old = store[layer]
            new = like.new_empty(B, H, capacity, D)
            if old is not None and n:
                new[:, :, :n] = old[:, :, :n]
            store[layer] = new

    def update(self, key: Tensor, value: Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
        """Append the chunk's keys/values (B, H_kv, q, D) to ``layer_idx``; return all of them."""
        n, q = self.lengths[layer_idx], key.shape[2]
        self._reserve(layer_idx, key, n + q)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        assert k_buf is not None
        assert v_buf is not None
        k_buf[:, :, n : n + q] = key
        v_buf[:, :, n : n + q] = value
        self.lengths[layer_idx] = n + q
        return k_buf[:, :, : n + q], v_buf[:, :, : n + q]  # (B, H_kv, n+q, D)

    def crop(self, layer: int, length: int) -> None:
        """Forget every position >= ``length`` in ``layer`` (a no-op if it is already shorter)."""
        if length < 0:
            raise ValueError(f"{length=} must be >= 0")
        self.lengths[layer] = min(self.lengths[layer], length)

    def crop_all(self, length: int) -> None:
        for layer in range(self.num_layers):
            self.crop(layer, length)

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """The valid keys and values of one layer, (B, H_kv, length, D) each."""
        k, v = self.keys[layer], self.values[layer]
        if k is None or v is None:
            raise ValueError(f"layer {layer} has no cached keys yet")
        n = self.lengths[layer]
        return k[:, :, :n], v[:, :, :n]

    # --- the parts of the HF Cache interface that model code may ask for ----------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def __len__(self) -> int:
        return self.num_layers
