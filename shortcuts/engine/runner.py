"""Run a model one decoder block at a time, each block with its own slice of the KV cache.

The Hugging Face blocks do the math; this module supplies what the HF model's ``forward``
would have built around them: token (+ absolute position) embeddings, rotary embeddings per
layer type, and a 4-D additive attention mask per layer (causal, plus the sliding window on
sliding layers). Because each layer's mask is built from that layer's own cache length, layers
may hold caches of different lengths, which is what early exit needs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from shortcuts.adapter import CausalLM
from shortcuts.engine.cache import LayerKVCache


@dataclass
class Chunk:
    """q consecutive tokens in flight: their hidden states and the position of the first one."""

    h: Tensor  # (B, q, d)
    start: int
    rope: dict[str | None, Any] = field(default_factory=dict)  # rotary (cos, sin) per layer type, memoised
    _positions: Tensor | None = None

    @property
    def size(self) -> int:
        return self.h.shape[1]

    @property
    def stop(self) -> int:
        return self.start + self.size

    def position_ids(self) -> Tensor:
        if self._positions is None:
            self._positions = torch.arange(self.start, self.stop, device=self.h.device).unsqueeze(0)  # (1, q)
        return self._positions


def layer_windows(config: Any, num_layers: int) -> list[int | None]:
    """The sliding-window size of each layer, None for full attention (HF's conventions)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [None] * num_layers
    if config.model_type == "mistral":  # Mistral slides on every layer when a window is set
        return [int(window)] * num_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


def attention_mask(start: int, q: int, kv_len: int, window: int | None, dtype: torch.dtype,
                   device: torch.device) -> Tensor | None:
    """Additive mask (1, 1, q, kv_len) for queries at positions start..start+q-1 over keys
    0..kv_len-1: key k is visible iff k <= pos and (no window or pos - k < window).
    None when every key is visible (one query, no window cut), so SDPA takes its fast path."""
    if q == 1 and (window is None or kv_len <= window):
        return None
    pos = torch.arange(start, start + q, device=device).unsqueeze(1)  # (q, 1)
    key = torch.arange(kv_len, device=device).unsqueeze(0)  # (1, kv)
    visible = key <= pos
    if window is not None:
        visible &= pos - key < window
    mask = torch.zeros(q, kv_len, dtype=dtype, device=device)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)[None, None]  # (1, 1, q, kv)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (B, H, q, D) with cos/sin (B, q, D), HF's rotate-half convention."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LayerRunner:
    """Embedding, single decoder blocks and the head of a ``CausalLM``, cache slice by slice."""

    def __init__(self, lm: CausalLM):
        self.lm = lm
        self.num_layers = lm.num_layers
        config = lm.config
        base = lm.model.base_model
        self.windows = layer_windows(config, self.num_layers)
        types = getattr(config, "layer_types", None)
        self.layer_types: list[str | None] = list(types) if types else [None] * self.num_layers
        self.rotary: nn.Module | None = getattr(base, "rotary_emb", None)
        params = inspect.signature(self.rotary.forward).parameters if self.rotary is not None else {}
        self.typed_rotary = "layer_type" in params  # Gemma 3: one rotary per layer type
        self.wpe: nn.Module | None = getattr(base, "wpe", None)  # GPT-2's absolute positions
        self.context_length = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self.is_gpt2 = config.model_type == "gpt2"

    def new_cache(self) -> LayerKVCache:
        return LayerKVCache(self.num_layers)

    @torch.inference_mode()
    def embed(self, ids: Tensor, start: int) -> Chunk:
        """Token ids (B, q) at positions start..start+q-1 -> a Chunk of input states (B, q, d)."""
        if start + ids.shape[1] > self.context_length:
            raise ValueError(f"positions up to {start + ids.shape[1] - 1} exceed the context {self.context_length}")
        h = self.lm.embed_tokens(ids.to(self.lm.device))  # (B, q, d); Gemma scales inside its embedding
        chunk = Chunk(h, start)
        if self.wpe is not None:
            chunk.h = h + self.wpe(chunk.position_ids())
        return chunk

    def _rope(self, chunk: Chunk, layer: int) -> Any:
        return self.rope(chunk.rope, chunk.h, chunk.position_ids, layer)

    def rope(self, memo: dict[str | None, Any], h: Tensor, positions: Callable[[], Tensor] | Tensor,
             layer: int) -> Any:
        """Rotary (cos, sin) for layer ``layer`` at ``positions`` (B, q), computed once per layer type
        and kept in ``memo``; None for models without rotary embeddings."""
        if self.rotary is None:
            return None
        key = self.layer_types[layer] if self.typed_rotary else None
        if key not in memo:
            pos = positions() if callable(positions) else positions
            memo[key] = self.rotary(h, pos, key) if self.typed_rotary else self.rotary(h, pos)
        return memo[key]

    def _attention_kwargs(self, layer: int, chunk: Chunk, cache: LayerKVCache) -> dict[str, Any]:
        """What a block's attention needs besides the states: mask, positions, rotary, cache."""
        if cache.length(layer) != chunk.start:
            raise RuntimeError(f"layer {layer} caches {cache.length(layer)} positions, but the chunk starts at "
                               f"{chunk.start}: layers must be fed contiguous positions")
        kv_len = chunk.stop
        mask = attention_mask(chunk.start, chunk.size, kv_len, self.windows[layer], chunk.h.dtype, chunk.h.device)
        kwargs: dict[str, Any] = {"attention_mask": mask, "past_key_values": cache,
                                  "position_ids": chunk.position_ids()}
        rope = self._rope(chunk, layer)
        if rope is not None:
            kwargs["position_embeddings"] = rope
        return kwargs

    @torch.inference_mode()
    def layer(self, i: int, chunk: Chunk, cache: LayerKVCache) -> Chunk:
        """Run block i (0-based) on the chunk, appending its keys/values to layer i's cache."""
        out = self.lm.layers[i](chunk.h, use_cache=True, **self._attention_kwargs(i, chunk, cache))
        chunk.h = out[0] if isinstance(out, tuple) else out  # (B, q, d)
        return chunk

    def layers(self, start: int, stop: int, chunk: Chunk, cache: LayerKVCache) -> Chunk:
        """Run blocks start..stop-1 (0-based) in order."""
        for i in range(start, stop):
            self.layer(i, chunk, cache)
        return chunk

    @torch.inference_mode()
    def fill_kv(self, i: int, chunk: Chunk, cache: LayerKVCache) -> None:
        """Write layer i's keys/values for the chunk computed from ``chunk.h`` as that layer's input
        (the state-copy policy: CALM propagates the exit state to the skipped layers). Only the
        key/value path runs (norm, k/v projections, k-norm, rotary), the model's own modules: the
        attention itself and the MLP are not needed, so a fill costs a few percent of a block."""
        if cache.length(i) != chunk.start:
            raise RuntimeError(f"layer {i} caches {cache.length(i)} positions, but the chunk starts at {chunk.start}")
        k, v = self.kv_projection(i, chunk.h, self._rope(chunk, i))
        cache.update(k, v, i)

    def kv_projection(self, i: int, h: Tensor, rope: Any) -> tuple[Tensor, Tensor]:
        """Block i's keys and values (B, H_kv, q, D) for input states h (B, q, d): the model's own
        norm, k/v projections and k-norm, then rotary (``rope`` = (cos, sin) or None)."""
        block = self.lm.layers[i]
        if self.is_gpt2:
            attn = block.attn
            _, k, v = attn.c_attn(block.ln_1(h)).split(attn.split_size, dim=2)
        else:
            attn = block.self_attn
            x = block.input_layernorm(h)
            k, v = attn.k_proj(x), attn.v_proj(x)
        shape = (*h.shape[:-1], -1, attn.head_dim)
        k, v = k.view(shape), v.view(shape)
        if getattr(attn, "k_norm", None) is not None:  # Qwen3, Gemma 3: per-head norm before rotary
            k = attn.k_norm(k)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        return (k if rope is None else rotate(k, *rope)), v

    @torch.inference_mode()
    def full_logits(self, h: Tensor) -> Tensor:
        """The model's own head on final states: (..., d) -> (..., V) float32."""
        return self.lm.head(h).float()

    @torch.inference_mode()
    def forward(self, ids: Tensor, cache: LayerKVCache, start: int | None = None) -> Tensor:
        """All blocks on a chunk of ids (B, q), continuing ``cache``; returns logits (B, q, V)."""
        start = cache.length(0) if start is None else start
        chunk = self.layers(0, self.num_layers, self.embed(ids, start), cache)
        return self.full_logits(chunk.h)
