"""Run a model one decoder block at a time over the static KV cache, rows of a batch at a time.

``LayerRunner`` supplies what the model's own ``forward`` would have built around its blocks:
token (+ absolute position) embeddings, rotary tables per layer type, the per-row attention mask
per layer (causal, plus the sliding window on sliding layers, built from each row's own cache
length, which is what early exit needs), and the head. Blocks may live on different devices
(a model split with a device map): the states follow the blocks, and a token that exits early
never touches the later devices.

``self_check`` compares the whole layer-by-layer pass with the model's own logits on a short
input; loading refuses a model (or a transformers release) for which they differ.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM, soft_cap
from shortcuts.engine.blocks import Blocks, affine, block_forward, kv_forward, prepare, rope_tables
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.exit_head import confidence_and_top
from shortcuts.engine.graphs import SLACK, Checked, ExitCheck, SegmentGraphs
from shortcuts.errors import UnsupportedModelError


def layer_windows(config: object, num_layers: int) -> list[int | None]:
    """The sliding-window size of each layer, None for full attention (HF's conventions)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return [None] * num_layers
    if getattr(config, "model_type", None) == "mistral":  # Mistral slides on every layer when a window is set
        return [int(window)] * num_layers
    types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    return [int(window) if t == "sliding_attention" else None for t in types]


@dataclass
class Chunk:
    """q consecutive tokens of rows 0..B-1 (one sequence per row, all at the same position)."""

    h: Tensor  # (B, q, d)
    start: int

    @property
    def size(self) -> int:
        return self.h.shape[1]

    def call(self) -> RowCall:
        B, q = self.h.shape[:2]
        return RowCall(list(range(B)), [self.start] * B, [q] * B, q, self.h.device)


class LayerRunner:
    """Embedding, single decoder blocks and the head of a ``CausalLM``, over a ``KVCache``."""

    def __init__(self, lm: CausalLM, max_seq_len: int | None = None, compile: bool = False):
        self.lm = lm
        self.num_layers = lm.num_layers
        config = lm.config
        self.blocks = Blocks(lm, pack=not compile)  # compiled graphs take dense weights
        self.windows = layer_windows(config, self.num_layers)
        types = getattr(config, "layer_types", None)
        self.layer_types: list[str | None] = list(types) if types else [None] * self.num_layers
        self.wpe = getattr(lm.decoder, "wpe", None)  # GPT-2's absolute positions
        model_context = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self.context_length = min(model_context, max_seq_len or model_context)
        tables = rope_tables(lm, self.context_length, self.blocks.head_dim)
        self.typed_rope = len(tables) > 1 or None not in tables
        # a copy of the rotary tables on every block's device: a block never reads another device's
        self.rope = {dev: {kind: (cos.to(dev, copy=True), sin.to(dev, copy=True))
                           for kind, (cos, sin) in tables.items()} for dev in dict.fromkeys(self.blocks.devices)}
        head = lm.lm_head.weight
        self.unembedding = prepare(head, pack=True) if head.device.type == "cpu" else None
        self.block_fn: Callable[..., Tensor] = compiled_block() if compile else block_forward
        self.graphs: SegmentGraphs | None = None  # static-shape segments (``use_graphs``)

    def use_graphs(self, max_rows: int, capture: bool | None = None) -> None:
        """Run runs of blocks at static shapes (``graphs.SegmentGraphs``), captured as CUDA graphs when the
        blocks are on a GPU (``capture`` None) or eagerly (the CPU, and the tests)."""
        if capture is None:
            capture = all(d.type == "cuda" for d in self.blocks.devices)
        self.graphs = SegmentGraphs(self, capture, max_rows)

    def new_cache(self, rows: int = 1, capacity: int | None = None) -> KVCache:
        b = self.blocks
        return KVCache(self.num_layers, rows, capacity or self.context_length, b.num_kv_heads, b.head_dim,
                       self.lm.lm_head.weight.dtype, b.devices, slack=SLACK if self.graphs is not None else 0)

    # --- embedding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_rows(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Token ids (n, q) at positions (n, q) -> input states (n, q, d); Gemma scales inside its embedding."""
        if int(positions.max()) >= self.context_length:
            raise ValueError(f"positions up to {int(positions.max())} exceed the context {self.context_length}")
        h = self.lm.embed_tokens(ids.to(self.lm.embed_tokens.weight.device))
        if self.wpe is not None:
            h = h + self.wpe(positions.to(self.wpe.weight.device)).to(h.device)
        return h

    def embed(self, ids: Tensor, start: int) -> Chunk:
        """Token ids (B, q) at positions start.. for rows 0..B-1 -> a Chunk."""
        B, q = ids.shape
        positions = torch.arange(start, start + q).expand(B, q)
        return Chunk(self.embed_rows(ids, positions), start)

    # --- blocks ---------------------------------------------------------------------------------------
    def _rotary(self, i: int, call: RowCall, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """cos/sin (n, q, D) at the call's positions for block i, looked up once per call and rotary
        kind (every block of a step reuses them); (None, None) without rotary."""
        tables = self.rope[device]
        if not tables:
            return None, None
        kind = self.layer_types[i] if self.typed_rope else None
        if kind not in call.rope:  # the call is on ``device`` (block moves it), so is its lookup
            cos, sin = tables[kind]
            pos = call.positions.clamp(max=self.context_length - 1)  # padding stays in the table
            call.rope[kind] = (cos[pos], sin[pos])  # (n, q, D)
        return call.rope[kind]

    @torch.inference_mode()
    def block(self, i: int, h: Tensor, call: RowCall, cache: KVCache) -> Tensor:
        """Block i (0-based) on states h (n, q, d) of the call's rows, writing their keys/values."""
        dev = self.blocks.devices[i]
        h, call = h.to(dev), call.moved(dev)
        k_buf, v_buf = cache.claim(i, call)
        cos, sin = self._rotary(i, call, dev)
        return self.block_fn(self.blocks.geometry, self.blocks.weights[i], h, k_buf, v_buf, call.rows_t,
                              call.positions, call.kv_len, cos, sin, call.mask(self.windows[i]))

    @torch.inference_mode()
    def segment(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache) -> Tensor:
        """Blocks first..last-1 on states h (n, q, d) of the call's rows: as one static-shape segment
        (a replayed CUDA graph on a GPU) when ``use_graphs`` is on and the call fits, else block by block."""
        graphs = self.graphs
        if graphs is not None and graphs.supports(first, last, h, call, cache):
            dev = self.blocks.devices[first]
            return graphs.run(first, last, h.to(dev), call.moved(dev), cache)
        for i in range(first, last):
            h = self.block(i, h, call, cache)
        return h

    @torch.inference_mode()
    def checked_segment(self, first: int, last: int, h: Tensor, call: RowCall, cache: KVCache,
                        check: ExitCheck) -> tuple[Tensor, Checked]:
        """``segment``, then the exit check at level ``last`` on the newest state of the rows ``check.rows``:
        fused into the segment's graph when it runs as one (no launches of its own), else right after."""
        graphs = self.graphs
        if graphs is not None and graphs.supports(first, last, h, call, cache, check.head):
            dev = self.blocks.devices[first]
            return graphs.run_checked(first, last, h.to(dev), call.moved(dev), cache, check)
        h = self.segment(first, last, h, call, cache)
        rows = torch.tensor(check.rows, device=h.device)
        newest = torch.tensor([check.last[j] for j in check.rows], device=h.device)
        logits = check.head(h[rows, newest].to(check.head.device, torch.float32))
        conf, top = confidence_and_top(logits)
        return h, Checked(logits, conf, top)

    @torch.inference_mode()
    def fill_kv(self, i: int, h: Tensor, call: RowCall, cache: KVCache) -> None:
        """Write block i's keys/values for states h taken as its input (the copy policy: CALM
        propagates the exit state to the skipped layers); no attention, no MLP."""
        dev = self.blocks.devices[i]
        h, call = h.to(dev), call.moved(dev)
        k, v = kv_forward(self.blocks.geometry, self.blocks.weights[i], h, *self._rotary(i, call, dev))
        cache.write(i, call, k, v)

    @torch.inference_mode()
    def full_logits(self, h: Tensor) -> Tensor:
        """The model's own head on final states: (..., d) -> (..., V) float32. On a CPU the
        unembedding is ``prepare``d as the blocks' matrices are; elsewhere the model's head module."""
        h = h.to(self.lm.norm.weight.device)  # the final norm may sit with the last block, the head elsewhere
        if self.unembedding is None:
            return self.lm.head(h).float()
        x = self.lm.norm(h.to(self.lm.lm_head.weight.dtype)).to(self.lm.device)
        logits = affine(x, self.unembedding, getattr(self.lm.lm_head, "bias", None))
        return soft_cap(logits, self.lm.softcap).float()

    # --- one sequence per row, all rows in step (prefill, tests, the self-check) ----------------------
    def layer(self, i: int, chunk: Chunk, cache: KVCache) -> Chunk:
        chunk.h = self.block(i, chunk.h, chunk.call(), cache)
        return chunk

    @torch.inference_mode()
    def forward(self, ids: Tensor, cache: KVCache, start: int | None = None) -> Tensor:
        """All blocks on ids (B, q) of rows 0..B-1, continuing ``cache``; returns logits (B, q, V)."""
        chunk = self.embed(ids, cache.length(0) if start is None else start)
        call = chunk.call()
        h = chunk.h
        for i in range(self.num_layers):
            h = self.block(i, h, call, cache)
        return self.full_logits(h)

    @torch.inference_mode()
    def warm_up(self, rows: int = 2) -> float:
        """Seconds to run once each kind of call the decoder makes (prefill; one row, one token; several
        rows at equal and at different lengths; rows carrying catch-up chunks): with ``compile`` this is
        the compile time (sizes 1 are specialised, larger sizes and lengths are dynamic)."""
        t0 = time.perf_counter()
        dev = self.lm.device
        n = max(rows, 3)
        cache = self.new_cache(n)
        every = list(range(n))
        calls = [RowCall([0], [0], [6], 6, dev), RowCall([0], [6], [3], 3, dev),  # prefill, catch-up chunks
                 RowCall([0], [9], [1], 1, dev), RowCall([0], [10], [1], 1, dev),  # single decode
                 RowCall(every[1:], [0] * (n - 1), [11] * (n - 1), 11, dev),  # prefill other rows
                 RowCall(every[:2], [11, 11], [1, 1], 1, dev), RowCall(every, [12, 12, 11], [1, 1, 2], 2, dev),
                 RowCall(every, [13] * n, [1] * n, 1, dev), RowCall(every, [14] * n, [1] * n, 1, dev),
                 RowCall(every[:2], [15, 15], [2, 2], 2, dev), RowCall(every[:2], [17, 17], [3, 3], 3, dev)]
        for call in calls:
            h = self.embed_rows(torch.ones(len(call.rows), call.q, dtype=torch.long), call.positions.cpu())
            for i in range(self.num_layers):
                h = self.block(i, h, call, cache)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def self_check(self, tokens: int = 12, rtol: float = 1e-3) -> float:
        """The layer-by-layer logits against the model's own on a short input (prefill, then one
        token with the cache); raises ``UnsupportedModelError`` when they differ. Returns the
        largest difference relative to the logits' scale."""
        vocab = self.lm.vocab_size
        ids = (torch.arange(tokens) * 7919 % max(vocab - 1, 1)).unsqueeze(0) + 1
        ref = self.lm.model(ids.to(self.lm.embed_tokens.weight.device)).logits.float()
        cache = self.new_cache(1)
        ours = torch.cat([self.forward(ids[:, :-1], cache), self.forward(ids[:, -1:], cache)], dim=1)
        scale = float(ref.abs().max().clamp_min(1e-6))
        diff = float((ours - ref.to(ours.device)).abs().max()) / scale
        tol = rtol if self.lm.lm_head.weight.dtype == torch.float32 else 3e-2
        if not diff <= tol:
            import transformers

            raise UnsupportedModelError(
                f"onejump's layer-by-layer pass does not reproduce {self.lm.name}'s logits (largest difference "
                f"{diff:.2e} of the logits' scale, tolerance {tol:.0e}) with transformers {transformers.__version__}; "
                "this model or this transformers release is not supported by the engine")
        return diff


def compiled_block() -> Callable[..., Tensor]:
    """``block_forward`` under ``torch.compile``: the weights are inputs, so one graph serves every
    layer. Sizes start static and turn dynamic once they change (torch's automatic dynamic shapes),
    so after ``LayerRunner.warm_up`` batch sizes, catch-up chunks and growing sequences reuse a
    handful of graphs (sizes 1 are specialised; with or without a mask). Inductor's artifacts are
    cached on disk ($TORCHINDUCTOR_CACHE_DIR, default ``<onejump cache>/inductor``), so a restart
    compiles from the cache."""
    import os

    import torch._dynamo

    from shortcuts.assets import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(block_forward, dynamic=None, fullgraph=True)
