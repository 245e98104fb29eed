"""The decoder blocks as plain tensor math: onejump's own forward pass, checked against the model's.

The engine does not call Hugging Face decoder layers (their keyword arguments and cache protocol
change between releases). ``Blocks`` reads each block's weights once, in a compact form (one fused
q/k/v matrix, one fused gate/up matrix), and runs pre-norm blocks of the supported families:

- llama / mistral / qwen2 / qwen3: RMSNorm, GQA attention with rotary (qkv bias for Qwen2,
  per-head q/k RMSNorm for Qwen3), SiLU-gated MLP;
- gemma3_text: the same with (1 + w) RMSNorms, sandwich norms around attention and MLP, a
  query scale of query_pre_attn_scalar^-1/2, GELU(tanh)-gated MLP, sliding-window layers;
- gpt2: LayerNorm, fused Conv1D attention, absolute positions, GELU(tanh) MLP.

What the model's ``forward`` adds around the blocks comes from the model itself: the token
embedding module (Gemma scales inside it) and the rotary module, tabulated once for every
position (``rope_tables``). ``unsupported`` names what this math does not do (partial rotary,
attention soft-capping, ...) so loading refuses such a model instead of decoding it wrongly;
``runner.LayerRunner.self_check`` then compares the whole pass with the model's own logits.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcuts.adapter import CausalLM
from shortcuts.engine.settings import Quantization
from shortcuts.engine.weights import Linear, prepare_linear
from shortcuts.errors import UnsupportedModelError

ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


class Norm(NamedTuple):
    """y = norm(x) * weight (+ bias): RMSNorm or LayerNorm over the last axis; weight already holds
    Gemma's +1 offset."""

    kind: str  # "rms" | "layer"
    weight: Tensor
    bias: Tensor | None
    eps: float

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "rms" and x.dtype == torch.float32 and x.device.type == "cpu":
            # 4 ops: F.rms_norm's CPU path adds dtype copies and a separate division (30 vs 23 us a call here)
            return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(self.eps)) * self.weight
        if self.kind == "rms":
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class BlockWeights(NamedTuple):
    """One decoder block (a tuple of tensors and ``weights.Linear`` tuples, so that a compiled block takes
    them as inputs and one graph serves every layer). Matrices are ``weights.prepare_linear``d in the
    engine's weight format, each with its bias. Sizes (out, in): qkv (Hq·D + 2·Hkv·D, d), o (d, Hq·D),
    up (2·I or I, d; gate then up), down (d, I)."""

    attn_norm: Norm
    qkv: Linear
    q_norm: Norm | None
    k_norm: Norm | None
    o: Linear
    post_attn_norm: Norm | None  # Gemma's sandwich norm on the attention output
    mlp_norm: Norm
    up: Linear  # gate and up stacked for gated MLPs
    down: Linear
    post_mlp_norm: Norm | None

    @property
    def linears(self) -> tuple[Linear, ...]:
        return (self.qkv, self.o, self.up, self.down)


@dataclass(frozen=True)
class Format:
    """How ``Blocks`` prepares the matrices: the weight format, oneDNN packing (format "none" on a CPU;
    compiled blocks take dense weights), the dtype the blocks compute in (norms, attention, KV cache) and
    bitsandbytes' 4-bit type."""

    quantization: Quantization = "none"
    pack: bool = True
    dtype: torch.dtype | None = None  # None: the model's
    bnb_4bit_type: str = "nf4"

    def linear(self, weight: Tensor, bias: Tensor | None) -> Linear:
        """Format "none" stores the weight in the blocks' dtype; the others compute in their kernel's."""
        dtype = self.dtype if self.quantization == "none" else None
        return prepare_linear(weight, bias, self.quantization, weight.device, pack=self.pack,
                              bnb_4bit_type=self.bnb_4bit_type, dtype=dtype)


def norm_of(module: Any, kind: str, offset: float, dtype: torch.dtype | None) -> Norm:
    eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", None)
    if eps is None:
        raise UnsupportedModelError(f"cannot find the epsilon of {type(module).__name__}")
    bias = getattr(module, "bias", None)
    weight = (module.weight.detach() + offset).to(dtype or module.weight.dtype)
    return Norm(kind, weight, None if bias is None else bias.detach().to(weight.dtype), float(eps))


def _bias(*linears: Any) -> Tensor | None:
    biases = [getattr(m, "bias", None) for m in linears]
    if all(b is None for b in biases):
        return None
    return torch.cat([b.detach() if b is not None else m.weight.new_zeros(m.weight.shape[0])
                      for m, b in zip(linears, biases, strict=True)])


def _block(matrices: dict[str, Tensor], biases: dict[str, Tensor | None], fmt: Format,
           **norms: Norm | None) -> BlockWeights:
    """BlockWeights from (out, in) matrices qkv, o, up, down and their biases."""
    ready = {name: fmt.linear(m, biases[name]) for name, m in matrices.items()}
    return BlockWeights(qkv=ready["qkv"], o=ready["o"], up=ready["up"], down=ready["down"],
                        **norms)  # type: ignore[arg-type]


def _decoder_block(layer: Any, offset: float, gemma: bool, fmt: Format) -> BlockWeights:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm = getattr(attn, "q_norm", None)
    k_norm = getattr(attn, "k_norm", None)
    mlp_norm = layer.pre_feedforward_layernorm if gemma else layer.post_attention_layernorm
    projections = {"qkv": (attn.q_proj, attn.k_proj, attn.v_proj), "o": (attn.o_proj,),
                   "up": (mlp.gate_proj, mlp.up_proj), "down": (mlp.down_proj,)}
    dt = fmt.dtype
    return _block({k: torch.cat([m.weight.detach() for m in ms]) for k, ms in projections.items()},
                  {k: _bias(*ms) for k, ms in projections.items()}, fmt,
                  attn_norm=norm_of(layer.input_layernorm, "rms", offset, dt),
                  q_norm=None if q_norm is None else norm_of(q_norm, "rms", offset, dt),
                  k_norm=None if k_norm is None else norm_of(k_norm, "rms", offset, dt),
                  post_attn_norm=norm_of(layer.post_attention_layernorm, "rms", offset, dt) if gemma else None,
                  mlp_norm=norm_of(mlp_norm, "rms", offset, dt),
                  post_mlp_norm=norm_of(layer.post_feedforward_layernorm, "rms", offset, dt) if gemma else None)


def _gpt2_block(layer: Any, fmt: Format) -> BlockWeights:
    """GPT-2's Conv1D stores (in, out): transposed to (out, in)."""
    attn, mlp = layer.attn, layer.mlp
    convs = {"qkv": attn.c_attn, "o": attn.c_proj, "up": mlp.c_fc, "down": mlp.c_proj}
    return _block({k: c.weight.detach().T for k, c in convs.items()}, {k: c.bias.detach() for k, c in convs.items()},
                  fmt, attn_norm=norm_of(layer.ln_1, "layer", 0.0, fmt.dtype), q_norm=None,
                  k_norm=None, post_attn_norm=None, mlp_norm=norm_of(layer.ln_2, "layer", 0.0, fmt.dtype),
                  post_mlp_norm=None)


def packed_modules(lm: CausalLM) -> list[tuple[Any, bool]]:
    """Every module whose weight ``Blocks`` copies into its matrices, with whether it stores (in, out)
    (GPT-2's Conv1D): what the engine may free once it holds its own copies."""
    if lm.config.model_type == "gpt2":
        return [(m, True) for layer in lm.layers for m in (layer.attn.c_attn, layer.attn.c_proj, layer.mlp.c_fc,
                                                            layer.mlp.c_proj)]
    names = ("q_proj", "k_proj", "v_proj", "o_proj")
    return [(m, False) for layer in lm.layers
            for m in (*(getattr(layer.self_attn, n) for n in names), layer.mlp.gate_proj, layer.mlp.up_proj,
                      layer.mlp.down_proj)]


def unsupported(config: Any) -> list[str]:
    """What this block math does not reproduce for ``config`` (empty when all is handled)."""
    problems = []
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is not None and float(factor) != 1.0:
        problems.append(f"partial rotary (partial_rotary_factor={factor})")
    for name in ("attn_logit_softcapping", "attention_logit_softcapping"):
        if getattr(config, name, None):
            problems.append(f"attention soft-capping ({name}={getattr(config, name)})")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx")
    if config.model_type == "gpt2" and not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or \
        getattr(config, "activation_function", None)
    if act not in ACTIVATIONS:
        problems.append(f"activation {act!r}")
    rope = getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) in ("dynamic", "longrope"):
        problems.append(f"position-dependent rope scaling ({rope.get('rope_type', rope.get('type'))})")
    return problems


@dataclass(frozen=True)
class Geometry:
    """What every block shares: heads, head size, query scale, activation."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    activation: str  # "silu" | "gelu_tanh"
    gated: bool


def block_forward(g: Geometry, w: BlockWeights, h: Tensor, k_buf: Tensor, v_buf: Tensor, rows: Tensor,
                  positions: Tensor, kv_len: int, cos: Tensor | None, sin: Tensor | None,
                  mask: Tensor | None, span: tuple[int, int] | None = None) -> Tensor:
    """One block on states h (n, q, d) of cache rows ``rows`` (n,) at ``positions`` (n, q): writes the
    keys/values into the layer's buffers (rows, H_kv, capacity, D), attends over the rows' first
    ``kv_len`` positions under ``mask`` (n, 1, q, kv_len) (None: all visible), returns the new states.
    ``span`` (a, b): the rows are a..b-1 in order, so attention reads a view of the buffers instead of
    gathering a copy (the eager engine's calls; compiled and captured ones pass None).
    Pure tensor code (no host reads): the same function runs eagerly or under ``torch.compile``."""
    n, q, _ = h.shape
    Hq = g.num_heads
    qs, ks, vs = _heads(g, w, w.qkv(w.attn_norm(h)), cos, sin)  # (n, H, q, D)
    k_buf[rows[:, None], :, positions] = ks.transpose(1, 2)  # (n, q, H_kv, D) at each row's positions
    v_buf[rows[:, None], :, positions] = vs.transpose(1, 2)
    if span is None:
        keys, values = k_buf[rows, :, :kv_len], v_buf[rows, :, :kv_len]  # (n, H_kv, kv_len, D)
    else:
        keys, values = k_buf[span[0] : span[1], :, :kv_len], v_buf[span[0] : span[1], :, :kv_len]
    attn = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=g.scale, enable_gqa=True)
    out = w.o(attn.transpose(1, 2).reshape(n, q, Hq * g.head_dim))
    if w.post_attn_norm is not None:
        out = w.post_attn_norm(out)
    h = h + out
    x = w.up(w.mlp_norm(h))
    if g.gated:
        gate, up = x.chunk(2, dim=-1)
        x = (F.silu(gate) if g.activation == "silu" else F.gelu(gate, approximate="tanh")) * up
    else:
        x = F.gelu(x, approximate="tanh")
    x = w.down(x)
    if w.post_mlp_norm is not None:
        x = w.post_mlp_norm(x)
    return h + x


def _heads(g: Geometry, w: BlockWeights, qkv: Tensor, cos: Tensor | None,
           sin: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys and values (n, H, q, D) from the fused projection (n, q, ·), normed and rotated.
    Without per-head norms, queries and keys are rotated together (one rotation's ops instead of two)."""
    n, q, _ = qkv.shape
    D, Hq, Hkv = g.head_dim, g.num_heads, g.num_kv_heads
    vs = qkv[..., (Hq + Hkv) * D :].view(n, q, Hkv, D).transpose(1, 2)
    if w.q_norm is None and w.k_norm is None and cos is not None and sin is not None:
        qk = rotate(qkv[..., : (Hq + Hkv) * D].view(n, q, Hq + Hkv, D).transpose(1, 2), cos, sin)
        return qk[:, :Hq], qk[:, Hq:], vs
    qs, ks = qkv[..., : Hq * D].view(n, q, Hq, D), qkv[..., Hq * D : (Hq + Hkv) * D].view(n, q, Hkv, D)
    if w.q_norm is not None:
        qs = w.q_norm(qs)
    if w.k_norm is not None:
        ks = w.k_norm(ks)
    qs, ks = qs.transpose(1, 2), ks.transpose(1, 2)
    if cos is not None and sin is not None:
        qs, ks = rotate(qs, cos, sin), rotate(ks, cos, sin)
    return qs, ks, vs


def kv_forward(g: Geometry, w: BlockWeights, h: Tensor, cos: Tensor | None,
               sin: Tensor | None) -> tuple[Tensor, Tensor]:
    """A block's keys and values (n, H_kv, q, D) for input states h (n, q, d), rotated: the copy
    policy's fill (norm, k/v projections, k-norm, rotary; no attention, no MLP). The fused projection runs
    whole (queries dropped): a k/v copy of it would hold a second copy of those rows for a rare policy."""
    n, q, _ = h.shape
    D, Hq, Hkv = g.head_dim, g.num_heads, g.num_kv_heads
    ks, vs = w.qkv(w.attn_norm(h))[..., Hq * D :].split([Hkv * D, Hkv * D], dim=-1)
    ks, vs = ks.view(n, q, Hkv, D), vs.view(n, q, Hkv, D)
    if w.k_norm is not None:
        ks = w.k_norm(ks)
    ks, vs = ks.transpose(1, 2), vs.transpose(1, 2)
    if cos is not None and sin is not None:
        ks = rotate(ks, cos, sin)
    return ks, vs


def quantized(lm: CausalLM) -> bool:
    """Whether the model's blocks hold quantized weights (a bitsandbytes or other pre-quantized checkpoint:
    integer storage)."""
    return any(not p.dtype.is_floating_point for p in lm.layers.parameters())


class Blocks:
    """Every decoder block of a ``CausalLM`` as ``BlockWeights`` in a weight ``Format``, plus the attention
    geometry."""

    def __init__(self, lm: CausalLM, fmt: Format | None = None):
        fmt = fmt or Format()
        config = lm.config
        if problems := unsupported(config):
            raise UnsupportedModelError(f"{lm.name}: onejump's engine does not handle {', '.join(problems)}")
        if quantized(lm):
            raise UnsupportedModelError(f"{lm.name}: the checkpoint is already quantized; the engine quantizes "
                                        "dense weights itself: load the dense model and choose the weight format "
                                        "(ONEJUMP_QUANTIZATION / --quantization)")
        self.gpt2 = config.model_type == "gpt2"
        gemma = config.model_type.startswith("gemma")
        act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None) or \
            config.activation_function
        self.activation = ACTIVATIONS[act]
        self.gated = not self.gpt2
        self.num_heads = int(config.num_attention_heads if not self.gpt2 else config.n_head)
        self.num_kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        d = lm.hidden_size
        self.head_dim = int(getattr(config, "head_dim", None) or d // self.num_heads)
        scalar = getattr(config, "query_pre_attn_scalar", None) if gemma else None
        self.scale = float(scalar if scalar is not None else self.head_dim) ** -0.5
        self.geometry = Geometry(self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.activation,
                                 self.gated)
        offset = lm.spec.norm_offset
        self.format = fmt
        self.weights = [_gpt2_block(layer, fmt) if self.gpt2 else _decoder_block(layer, offset, gemma, fmt)
                        for layer in lm.layers]
        self.devices = lm.placement().blocks  # block i runs where its weights are


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x (n, H, q, D) with cos/sin (n, q, D), the rotate-half convention."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@torch.no_grad()
def rope_tables(lm: CausalLM, positions: int, head_dim: int) -> dict[str | None, tuple[Tensor, Tensor]]:
    """cos/sin (positions, D) for every rotary kind the model uses (Gemma 3: one per layer type),
    from the model's own rotary module(s); {} for models without rotary embeddings. transformers 5
    gives Gemma 3 one module taking the layer type; 4.57 a second module for sliding layers."""
    base = lm.decoder
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        return {}
    typed = "layer_type" in inspect.signature(rotary.forward).parameters
    local = getattr(base, "rotary_emb_local", None)
    kinds: list[str | None] = sorted(set(getattr(lm.config, "layer_types", None) or [None])) if typed or local \
        else [None]
    pos = torch.arange(positions, device=lm.device).unsqueeze(0)
    dummy = torch.zeros(1, dtype=lm.lm_head.weight.dtype, device=lm.device)
    tables = {}
    for kind in kinds:
        module = local if local is not None and kind == "sliding_attention" else rotary
        cos, sin = module(dummy, pos, kind) if typed else module(dummy, pos)
        if cos.shape[-1] != head_dim:
            raise UnsupportedModelError(f"rotary covers {cos.shape[-1]} of {head_dim} head dimensions (partial rotary)")
        tables[kind] = (cos[0].contiguous(), sin[0].contiguous())
    return tables
