"""Run a model one decoder block at a time over the static KV cache, rows of a batch at a time.

``LayerRunner`` supplies what the model's own ``forward`` would have built around its blocks:
token (+ absolute position) embeddings, rotary tables per layer type, the per-row attention mask
per layer (causal, plus the sliding window on sliding layers, built from each row's own cache
length, which is what early exit needs), and the head. Blocks may live on different devices
(a model split with a device map): the states follow the blocks, and a token that exits early
never touches the later devices.

``self_check`` compares the whole layer-by-layer pass with the model's own logits on a short
input; loading refuses a model (or a transformers release) for which they differ. With a quantized
weight format (``weights``) the reference is the model run with the weights the engine multiplies by
(dequantized), and the difference from the dense model (the quantization's error) is measured too.
``release_model_weights`` then frees the model's copies of every matrix the engine holds in its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from shortcuts.adapter import CausalLM, soft_cap
from shortcuts.assets import cache_root
from shortcuts.engine.blocks import (
    Blocks,
    Format,
    Norm,
    block_forward,
    kv_forward,
    norm_of,
    packed_modules,
    rope_tables,
)
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.exit_head import confidence_and_top
from shortcuts.engine.graphs import SLACK, Checked, ExitCheck, SegmentGraphs
from shortcuts.engine.settings import Quantization
from shortcuts.engine.weights import Dense, Int8, Linear, head_format, prepare_linear
from shortcuts.errors import UnsupportedModelError

INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"
log = logging.getLogger("onejump.engine")


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


@dataclass(frozen=True)
class SelfCheck:
    """What ``LayerRunner.self_check`` measured: the engine's logits against the model run with the same
    (dequantized) weights (``math``: the largest difference over the logits' largest magnitude;
    ``math_rms``: the norm of the difference over the logits' norm), and against the dense model (``error``,
    ``error_rms``: the quantization's error; the same as ``math`` for format "none"). ``metric`` ("max" or
    "rms") is the one held to ``tolerance``."""

    quantization: str
    dtype: str
    math: float
    math_rms: float
    error: float
    error_rms: float
    tolerance: float
    metric: str

    @property
    def held(self) -> float:
        return self.math if self.metric == "max" else self.math_rms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _differences(ours: Tensor, ref: Tensor) -> tuple[float, float]:
    """(largest |ours - ref| over the largest |ref|, ||ours - ref|| over ||ref||)."""
    d = ours - ref.to(ours.device)
    return float(d.abs().max() / ref.abs().max().clamp_min(1e-6)), float(d.norm() / ref.norm().clamp_min(1e-6))


def math_tolerance(quantization: Quantization, dtype: torch.dtype, model_dtype: torch.dtype) -> tuple[str, float]:
    """(metric, tolerance) the engine's logits are held to against the reference's. The dense engine in
    float32 agrees to rounding (the largest difference, 1e-3); 16-bit activations through every block round
    every product (the largest difference measured 9.9e-2 on SmolLM2's 30 blocks in bf16 on an H200,
    docs/gpu.md; tiny models far less: 0.15). The quantized kernels round their inputs (torch's int8/int4 CPU
    kernels take bf16, bitsandbytes' 4-bit CPU kernel computes in bf16, LLM.int8 quantizes the activations by
    row), which moves one position's largest logit by up to 25% on SmolLM2 and the norm of the difference by
    2-10% (docs/quantization.md): they are held to the norm, at 0.15 (0.3 for LLM.int8); a kernel or packing
    mistake moves it by about 100%."""
    if quantization == "none":
        sixteen = torch.float32 not in (dtype, model_dtype)
        return "max", 0.15 if sixteen else 1e-3 if model_dtype == torch.float32 else 3e-2
    return "rms", 0.3 if quantization == "bnb-8bit" else 0.15


class LayerRunner:
    """Embedding, single decoder blocks and the head of a ``CausalLM``, over a ``KVCache``, with the
    matrices in the weight format ``quantization`` (``weights``; each computes in its kernel's dtype) and
    the blocks (norms, attention, residual stream, KV cache) in ``dtype`` (default: the model's)."""

    def __init__(self, lm: CausalLM, max_seq_len: int | None = None, compile: bool = False,
                 quantization: Quantization = "none", dtype: torch.dtype | None = None, bnb_4bit_type: str = "nf4"):
        self.lm = lm
        self.num_layers = lm.num_layers
        config = lm.config
        if compile and quantization.startswith("bnb"):
            raise ValueError(f"compile=True does not take quantization={quantization!r}: bitsandbytes' layers do "
                             "not compile; use int8/int4 or run eagerly")
        self.quantization: Quantization = quantization
        self.dtype = dtype or lm.lm_head.weight.dtype
        fmt = Format(quantization, pack=not compile, dtype=self.dtype, bnb_4bit_type=bnb_4bit_type)
        self.blocks = Blocks(lm, fmt)  # compiled graphs take dense weights
        self.windows = layer_windows(config, self.num_layers)
        types = getattr(config, "layer_types", None)
        self.layer_types: list[str | None] = list(types) if types else [None] * self.num_layers
        self.wpe = getattr(lm.decoder, "wpe", None)  # GPT-2's absolute positions
        model_context = int(getattr(config, "max_position_embeddings", None) or config.n_positions)
        self.context_length = min(model_context, max_seq_len or model_context)
        tables = rope_tables(lm, self.context_length, self.blocks.head_dim)
        self.typed_rope = len(tables) > 1 or None not in tables
        # a copy of the rotary tables on every block's device: a block never reads another device's
        self.rope = {dev: {kind: (cos.to(dev, self.dtype, copy=True), sin.to(dev, self.dtype, copy=True))
                           for kind, (cos, sin) in tables.items()} for dev in dict.fromkeys(self.blocks.devices)}
        self.compiled = compile
        head = lm.lm_head
        self.final_norm: Norm = norm_of(lm.norm, lm.spec.norm_kind, lm.spec.norm_offset, self.dtype)
        self.head: Linear = prepare_linear(head.weight, getattr(head, "bias", None), head_format(quantization),
                                           head.weight.device, pack=not compile, bnb_4bit_type=bnb_4bit_type,
                                           dtype=self.dtype if quantization == "none" else None)
        # a head tied to the embedding and held at int8: token rows are read from it (the float copy is freed)
        self.embedding_from_head = (lm.lm_head.weight is lm.embed_tokens.weight and isinstance(self.head, Int8)
                                    and _plain_embedding(lm.embed_tokens))
        self.block_fn: Callable[..., Tensor] = compiled_block() if compile else block_forward
        self._head_fn: Callable[[Norm, Linear, Tensor], Tensor] = compiled_head() if compile else head_forward
        self.released = False
        self.graphs: SegmentGraphs | None = None  # static-shape segments (``use_graphs``)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the matrices the engine holds (the blocks' and the head)."""
        return sum(lin.nbytes for w in self.blocks.weights for lin in w.linears) + self.head.nbytes

    def use_graphs(self, max_rows: int, capture: bool | None = None) -> None:
        """Run runs of blocks at static shapes (``graphs.SegmentGraphs``), captured as CUDA graphs when the
        blocks are on a GPU (``capture`` None) or eagerly (the CPU, and the tests)."""
        if capture is None:
            capture = all(d.type == "cuda" for d in self.blocks.devices)
        self.graphs = SegmentGraphs(self, capture, max_rows)

    def new_cache(self, rows: int = 1, capacity: int | None = None) -> KVCache:
        b = self.blocks
        return KVCache(self.num_layers, rows, capacity or self.context_length, b.num_kv_heads, b.head_dim,
                       self.dtype, b.devices, slack=SLACK if self.graphs is not None else 0)

    # --- embedding ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_rows(self, ids: Tensor, positions: Tensor) -> Tensor:
        """Token ids (n, q) at positions (n, q) -> input states (n, q, d); Gemma scales inside its embedding."""
        if int(positions.max()) >= self.context_length:
            raise ValueError(f"positions up to {int(positions.max())} exceed the context {self.context_length}")
        h = self._lookup(ids)
        if self.wpe is not None:
            h = h + self.wpe(positions.to(self.wpe.weight.device)).to(h.device)
        return h.to(self.dtype)

    def _lookup(self, ids: Tensor) -> Tensor:
        """The token embedding of ids: the model's module, or the rows of the int8 head it is tied to
        (dequantized; Gemma's scale applied as its module does)."""
        if not self.embedding_from_head:
            return self.lm.embed_tokens(ids.to(self.lm.embed_tokens.weight.device))
        head = self.head
        assert isinstance(head, Int8)
        ids = ids.to(head.q.device)
        h = head.q[ids].float() * head.scale[ids].float().unsqueeze(-1)
        scale = getattr(self.lm.embed_tokens, "embed_scale", None)
        return h if scale is None else h * scale.to(h.dtype)

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
        span = call.span if self.block_fn is block_forward else None  # compiled: one graph for every row
        return self.block_fn(self.blocks.geometry, self.blocks.weights[i], h, k_buf, v_buf, call.rows_t,
                             call.positions, call.kv_len, cos, sin, call.mask(self.windows[i]), span)

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
        """The model's head on final states: (..., d) -> (..., V) float32: the final norm, then the
        unembedding in the engine's weight format."""
        norm_device = self.final_norm.weight.device  # the norm may sit with the last block, the head elsewhere
        if norm_device != self.lm.device:
            h = self.final_norm(h.to(norm_device, self.dtype)).to(self.lm.device)
            return soft_cap(head_forward(None, self.head, h).float(), self.lm.softcap)
        return soft_cap(self._head_fn(self.final_norm, self.head, h.to(self.dtype)).float(), self.lm.softcap)

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
        with self.scope():
            for i in range(self.num_layers):
                h = self.block(i, h, call, cache)
            return self.full_logits(h)

    @torch.inference_mode()
    def warm_up(self, rows: int = 2) -> float:
        """Seconds to run once each kind of call the decoder makes (prefill; one row, one token; several
        rows at equal and at different lengths; rows carrying catch-up chunks), on ``rows`` rows (at least
        3): with ``compile`` this is the compile time (sizes 1 are specialised, larger sizes and lengths
        are dynamic)."""
        with self.scope():
            return self._warm_up(rows)

    def scope(self) -> AbstractContextManager[None]:
        """Where compiled blocks run (a step, a prefill, a forward pass): ``compiling``'s settings, held
        for that call only (nothing when the blocks are not compiled)."""
        return compiling() if self.compiled else nullcontext()

    def _warm_up(self, rows: int) -> float:
        t0 = time.perf_counter()
        dev = self.lm.device
        n = max(rows, 3)
        cache = self.new_cache(n)
        every = list(range(n))
        calls = [RowCall([0], [0], [6], 6, dev), RowCall([0], [6], [3], 3, dev),  # prefill, catch-up chunks
                 RowCall([0], [9], [1], 1, dev), RowCall([0], [10], [1], 1, dev),  # single decode
                 RowCall(every[1:], [0] * (n - 1), [11] * (n - 1), 11, dev),  # prefill other rows
                 RowCall(every[:2], [11, 11], [1, 1], 1, dev),  # rows at different lengths, one with a chunk:
                 RowCall(every, [12, 12] + [11] * (n - 2), [1, 1] + [2] * (n - 2), 2, dev),
                 RowCall(every, [13] * n, [1] * n, 1, dev), RowCall(every, [14] * n, [1] * n, 1, dev),
                 RowCall(every[:2], [15, 15], [2, 2], 2, dev), RowCall(every[:2], [17, 17], [3, 3], 3, dev)]
        for call in calls:
            h = self.embed_rows(torch.ones(len(call.rows), call.q, dtype=torch.long), call.positions.cpu())
            for i in range(self.num_layers):
                h = self.block(i, h, call, cache)
            self.full_logits(h[0, -1])  # the head: a prefill's last token, every row's newest, a verified chunk
            self.full_logits(h[:, -1])
            self.full_logits(h[0])
        return time.perf_counter() - t0

    @torch.inference_mode()
    def self_check(self, tokens: int = 12) -> SelfCheck:
        """The layer-by-layer logits against the model's own on a short input (prefill, then one token
        with the cache). With a quantized format the reference runs the model with the engine's
        dequantized weights (``math``), and the difference from the dense model is measured (``error``).
        Raises ``UnsupportedModelError`` when the difference is out of tolerance (``math_tolerance``); needs
        the model's weights (before ``release_model_weights``)."""
        if self.released:
            raise RuntimeError("self_check needs the model's own weights, which release_model_weights freed")
        vocab = self.lm.vocab_size
        ids = (torch.arange(tokens) * 7919 % max(vocab - 1, 1)).unsqueeze(0) + 1
        model_ids = ids.to(self.lm.embed_tokens.weight.device)
        dense = self.lm.model(model_ids).logits.float()
        cache = self.new_cache(1)
        ours = torch.cat([self.forward(ids[:, :-1], cache), self.forward(ids[:, -1:], cache)], dim=1)
        ref = dense
        if self.quantization != "none":
            with self._dequantized_model():
                ref = self.lm.model(model_ids).logits.float()
        metric, tol = math_tolerance(self.quantization, self.dtype, self.lm.lm_head.weight.dtype)
        check = SelfCheck(self.quantization, str(self.dtype).removeprefix("torch."), *_differences(ours, ref),
                          *_differences(ours, dense), tol, metric)
        if not check.held <= tol:
            import transformers

            raise UnsupportedModelError(
                f"onejump's layer-by-layer pass does not reproduce {self.lm.name}'s logits (difference "
                f"{check.held:.2e} of the logits' scale ({metric}), tolerance {tol:.0e}, weights {self.quantization}) "
                f"with transformers {transformers.__version__}; this model or this transformers release is not "
                "supported by the engine")
        log.info("self-check of %s (weights %s, %s): %.2e (%s) of the logits' scale from the model run with the "
                 "same weights (tolerance %.0e), %.2e (largest) and %.2e (rms) from the dense model", self.lm.name,
                 self.quantization, check.dtype, check.held, metric, tol, check.error, check.error_rms)
        return check

    @contextlib.contextmanager
    def _dequantized_model(self) -> Iterator[None]:
        """The model's packed modules (and its head, when quantized) hold the engine's dequantized
        weights for the duration (new tensors; the model's own are put back after)."""
        saved: list[tuple[Any, Any]] = []
        rows = self._module_rows()
        try:
            for module, (lin, start, stop, conv) in rows.items():
                w = lin.dequantized()[start:stop]
                saved.append((module, module.weight))
                module.weight = torch.nn.Parameter((w.T if conv else w).to(module.weight), requires_grad=False)
            if not isinstance(self.head, Dense):
                head = self.lm.lm_head
                deq = torch.nn.Parameter(self.head.dequantized().to(head.weight), requires_grad=False)
                if self.embedding_from_head:  # the engine reads its token rows from the head: so does the reference
                    saved.append((self.lm.embed_tokens, self.lm.embed_tokens.weight))
                    self.lm.embed_tokens.weight = deq
                saved.append((head, head.weight))  # else a tied head is untied for the duration
                head.weight = deq
            yield
        finally:
            for module, weight in reversed(saved):
                module.weight = weight

    def _module_rows(self) -> dict[Any, tuple[Linear, int, int, bool]]:
        """Each packed module of the model -> (the engine's matrix holding it, its rows there, Conv1D?)."""
        out: dict[Any, tuple[Linear, int, int, bool]] = {}
        modules = iter(packed_modules(self.lm))
        qkv_parts, up_parts = 1 if self.blocks.gpt2 else 3, 2 if self.blocks.gated else 1
        for w in self.blocks.weights:
            for lin, parts in ((w.qkv, qkv_parts), (w.o, 1), (w.up, up_parts), (w.down, 1)):
                start = 0
                for _ in range(parts):
                    module, conv = next(modules)
                    rows = module.weight.shape[1 if conv else 0]
                    out[module] = (lin, start, start + rows, conv)
                    start += rows
        return out

    def release_model_weights(self) -> int:
        """Free the model's copy of every matrix the engine holds in its own format (the blocks'
        projections, the head; the embedding too when the engine reads its rows from an int8 head tied to
        it, else the embedding stays, and with it a head tied to it), leaving empty tensors on the same
        devices; returns the bytes released. The model's own forward is unusable after."""
        keep = set() if self.embedding_from_head else {id(self.lm.embed_tokens.weight)}
        modules = [m for m, _ in packed_modules(self.lm)]
        modules += [self.lm.lm_head] + ([self.lm.embed_tokens] if self.embedding_from_head else [])
        freed: dict[int, int] = {}
        for module in modules:
            w = module.weight
            if id(w) in keep or w.numel() == 0:
                continue
            freed[id(w)] = w.numel() * w.element_size()
            module.weight = torch.nn.Parameter(w.new_empty(0), requires_grad=False)
        self.released = True
        _trim_heap()
        log.info("released %.0f MB of the model's weights (the engine holds its own)", sum(freed.values()) / 2**20)
        return sum(freed.values())


def _plain_embedding(module: Any) -> bool:
    """An embedding whose forward is a row lookup (times Gemma's ``embed_scale``), nothing else."""
    return type(module) is torch.nn.Embedding or (isinstance(module, torch.nn.Embedding) and
                                                  hasattr(module, "embed_scale"))


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS stays high)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        if name:
            ctypes.CDLL(name).malloc_trim(0)


def head_forward(norm: Norm | None, head: Linear, h: Tensor) -> Tensor:
    """The unembedding of final states h (..., d), after the final norm when one is given."""
    return head(h if norm is None else norm(h))


def compiled_head() -> Callable[..., Tensor]:
    """``head_forward`` under ``torch.compile`` (with ``compiled_block``: the quantized formats' compiled
    products keep float32 activations, and the head decides the token). It runs within ``LayerRunner.scope``."""
    return torch.compile(head_forward, dynamic=None, fullgraph=True)


def compiled_block() -> Callable[..., Tensor]:
    """``block_forward`` under ``torch.compile``: the weights are inputs, so one graph serves every
    layer. Sizes start static and turn dynamic once they change (torch's automatic dynamic shapes),
    so after ``LayerRunner.warm_up`` batch sizes, catch-up chunks and growing sequences reuse a handful
    of graphs (sizes 1 are specialised; with or without a mask). They run within ``LayerRunner.scope``."""
    return torch.compile(block_forward, dynamic=None, fullgraph=True)


@contextmanager
def compiling() -> Iterator[None]:
    """Where the compiled blocks run, and may compile (``LayerRunner.scope``: a step, a prefill): room in
    dynamo's cache for the graphs the engine's shapes need (its default, 8 per function, is too few), and
    inductor's artifacts cached on disk ($TORCHINDUCTOR_CACHE_DIR, default ``<onejump cache>/inductor``)
    so that a restart compiles from the cache. Both are restored on leaving, so the process's other
    compiles are not touched (a scope per step, not per block: entering costs ~0.1 ms)."""
    import torch._dynamo  # only when compiling: dynamo is slow to import

    limit = max(torch._dynamo.config.cache_size_limit, 64)
    given = os.environ.get(INDUCTOR_CACHE)
    os.environ[INDUCTOR_CACHE] = given or str(cache_root() / "inductor")
    try:
        with torch._dynamo.config.patch(cache_size_limit=limit):
            yield
    finally:
        if given is None:
            del os.environ[INDUCTOR_CACHE]
