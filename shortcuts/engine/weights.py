"""Weight formats of the engine's matrices: one prepared (out, in) matrix with its bias, whatever its storage.

``prepare_linear(weight, bias, quantization, device)`` quantizes a dense (out, in) weight once, at load,
into the format ``quantization`` names (``settings.QUANTIZATIONS``):

- ``none``: the weight as it is (the model's dtype), packed for oneDNN on a CPU (about 1.5x faster than
  ``nn.Linear`` for one row), a dense (in, out) copy elsewhere;
- ``int8``: weight-only int8, one scale per output channel (symmetric), torch's ``_weight_int8pack_mm``;
- ``int4``: weight-only int4 in groups of ``INT4_GROUP`` input channels (asymmetric: scale and zero per
  group), torch's ``_weight_int4pack_mm_for_cpu`` (``_weight_int4pack_mm`` on CUDA);
- ``bnb-8bit``: bitsandbytes' LLM.int8 (``Linear8bitLt``; activations int8 by row, no outlier columns:
  ``BNB_THRESHOLD``);
- ``bnb-4bit``: bitsandbytes' 4-bit (``Linear4bit``), nf4 unless ``bnb_4bit_type="fp4"``.

torch's int8/int4 CPU kernels are fast only with bf16 activations (docs/quantization.md), so those formats
compute in bf16 (``compute_dtype``); every format takes x of any float dtype and returns y in x's dtype.
A matrix a kernel cannot take (int4: out not a multiple of 16 or in not a multiple of the group; int8:
in not a multiple of 16) falls back to the next format that can (int4 -> int8 -> none).

Every format is a ``NamedTuple`` of tensors and constants, so a block compiled with ``torch.compile``
takes the weights as graph inputs and one graph serves every layer (the bitsandbytes formats hold an
``nn.Module`` and do not compile). ``dequantized()`` gives back the (out, in) matrix the format
multiplies by, which the load-time self-check uses as the reference's weights.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from shortcuts.engine.settings import QUANTIZATIONS, Quantization

INT4_GROUP = 32  # measured on SmolLM2 and Gemma-3 (docs/quantization.md): g32 is as fast as g64/g128, and exact
# on weights that came from a 32-wide GGUF block format
# LLM.int8's outlier threshold: 0, no outlier columns. With HF's 6.0 the columns taken apart in fp16 are those
# where any row of a product exceeds it, so a row's result depends on the other rows of the batch (or of
# a verified chunk): exact mode would not reproduce full depth. 0 keeps every row to itself (int8 by row).
BNB_THRESHOLD = 0.0
_KERNEL_MULTIPLE = 16  # torch's int8/int4 CPU kernels need in (int4: out as well) to be a multiple of 16


@runtime_checkable
class Linear(Protocol):
    """A prepared (out, in) matrix with its bias: x (..., in) -> x·Wᵀ + b (..., out), y in x's dtype."""

    @property
    def nbytes(self) -> int: ...

    @property
    def format(self) -> str: ...

    def __call__(self, x: Tensor) -> Tensor: ...

    def dequantized(self) -> Tensor: ...


def _size(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _plus(y: Tensor, bias: Tensor | None) -> Tensor:
    return y if bias is None else y + bias


def _one_row(x: Tensor) -> bool:
    """A matrix-vector product traced by ``torch.compile`` on a CPU: inductor's fused reduction reads the
    (out, in) weight once, faster than oneDNN's or MKL's product for one row (docs/quantization.md)."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() == x.shape[-1]


def _row_product(x: Tensor, w: Tensor) -> Tensor:
    """x (..., in) with one row, times (out, in) ``w`` of any dtype, in x's dtype, as a reduction."""
    return (x.reshape(1, 1, -1) * w).sum(-1).reshape(*x.shape[:-1], -1)


class Dense(NamedTuple):
    """The weight as it is: oneDNN-packed on a CPU (eager), else the dense (out, in) matrix."""

    weight: Tensor  # mkldnn-packed (out, in) or dense (out, in)
    bias: Tensor | None

    @property
    def format(self) -> str:
        return "none"

    @property
    def nbytes(self) -> int:
        return _size(self.weight, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != self.weight.dtype:  # the engine keeps them equal; other callers may not
            return Dense(self.weight, self.bias)(x.to(self.weight.dtype)).to(x.dtype)
        if self.weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        if _one_row(x):
            return _plus(_row_product(x, self.weight), self.bias)
        return F.linear(x, self.weight, self.bias)

    def dequantized(self) -> Tensor:
        if self.weight.is_mkldnn:
            raise ValueError("a oneDNN-packed weight cannot be read back; the model's own is the reference")
        return self.weight


class Int8(NamedTuple):
    """Weight-only int8 with one scale per output channel: W ≈ q · scale[:, None]."""

    q: Tensor  # (out, in) int8
    scale: Tensor  # (out,) in the compute dtype
    bias: Tensor | None  # in the compute dtype

    @property
    def format(self) -> str:
        return "int8"

    @property
    def nbytes(self) -> int:
        return _size(self.q, self.scale, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype == torch.float32:
            # compiled: x stays float32 (bf16 activations cost agreement: docs/quantization.md); one row is a
            # fused int8 reduction (faster than the bf16 kernel), several rows a dequantized product
            y = _row_product(x, self.q) if _one_row(x) else F.linear(x, self.q.to(x.dtype))
            y = y * self.scale.to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scale.dtype)
        if self.q.is_cuda:  # torch's int8 kernel is a CPU (and MPS) kernel: dequantize on the fly
            y = F.linear(x2, self.q.to(x2.dtype)) * self.scale
        else:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)
        return _plus(y, self.bias).to(x.dtype).reshape(*shape[:-1], -1)

    def dequantized(self) -> Tensor:
        return self.q.float() * self.scale.float()[:, None]


class Int4(NamedTuple):
    """Weight-only int4 in groups of ``group`` input channels: W ≈ (q - 8) · scale + zero, packed for
    torch's kernel (its layout differs between the CPU and CUDA kernels)."""

    packed: Tensor
    scales_zeros: Tensor  # (in / group, out, 2) in the compute dtype
    group: int
    bias: Tensor | None
    inner_k_tiles: int  # CUDA's packing; 0 for the CPU kernel

    @property
    def format(self) -> str:
        return "int4"

    @property
    def nbytes(self) -> int:
        return _size(self.packed, self.scales_zeros, self.bias)

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(self.scales_zeros.dtype)
        if self.inner_k_tiles:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group, self.scales_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scales_zeros)
        return _plus(y, self.bias).to(x.dtype).reshape(*shape[:-1], -1)

    def dequantized(self) -> Tensor:
        eye = torch.eye(self.scales_zeros.shape[0] * self.group, dtype=self.scales_zeros.dtype,
                        device=self.packed.device)
        return Int4(self.packed, self.scales_zeros, self.group, None, self.inner_k_tiles)(eye).float().T


class Bnb(NamedTuple):
    """A bitsandbytes layer (``Linear8bitLt`` or ``Linear4bit``) holding the quantized weight and the bias."""

    module: Any  # torch.nn.Module
    kind: str  # "bnb-8bit" | "bnb-4bit"
    dtype: torch.dtype  # the compute dtype

    @property
    def format(self) -> str:
        return self.kind

    @property
    def nbytes(self) -> int:
        w = self.module.weight
        extra = [getattr(w, "SCB", None)]
        state = getattr(w, "quant_state", None)
        if state is not None:
            extra += [state.absmax, getattr(state, "code", None)]
        return _size(w.data, self.module.bias, *extra)

    def __call__(self, x: Tensor) -> Tensor:
        shape = x.shape  # bitsandbytes' kernels take (rows, in)
        return self.module(x.reshape(-1, shape[-1]).to(self.dtype)).to(x.dtype).reshape(*shape[:-1], -1)

    def dequantized(self) -> Tensor:
        m = self.module
        if self.kind == "bnb-8bit":  # the row scales move to the layer's state at its first call
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
            return m.weight.data.float() * scb.float()[:, None] / 127
        # 4-bit: the layer on the identity (its CPU kernel repacks the weight at the first call)
        eye = torch.eye(m.in_features, dtype=self.dtype, device=m.weight.device)
        y = Bnb(m, self.kind, self.dtype)(eye)
        return (y if m.bias is None else y - m.bias.to(y)).float().T


def linear_tensors(lin: Linear) -> list[Tensor]:
    """Every tensor a prepared matrix reads (placement checks)."""
    if isinstance(lin, Bnb):
        w = lin.module.weight
        state = getattr(w, "quant_state", None)
        extra = [getattr(w, "SCB", None)] + ([state.absmax, state.code] if state is not None else [])
        return [t for t in (w.data, lin.module.bias, *extra) if isinstance(t, Tensor)]
    return [t for t in lin if isinstance(t, Tensor)]  # type: ignore[attr-defined]


def head_format(quantization: Quantization) -> Quantization:
    """The format of the head and of the exit head's big matrix: a 4-bit format's 8-bit sibling (as
    llama.cpp's 4-bit files keep their output matrix at 6 bits or more: a 4-bit head picks other tokens
    far more often, docs/quantization.md), else the format itself."""
    return {"int4": "int8", "bnb-4bit": "bnb-8bit"}.get(quantization, quantization)  # type: ignore[return-value]


def compute_dtype(quantization: Quantization, dtype: torch.dtype) -> torch.dtype:
    """The dtype a format multiplies in, for a model whose weights are ``dtype``: bf16 for torch's
    int8/int4 kernels, the model's own for the others."""
    return torch.bfloat16 if quantization in ("int8", "int4") else dtype


def prepare_linear(weight: Tensor, bias: Tensor | None, quantization: Quantization = "none",
                   device: torch.device | str | None = None, *, pack: bool = True, bnb_4bit_type: str = "nf4",
                   dtype: torch.dtype | None = None) -> Linear:
    """The dense (out, in) ``weight`` (and (out,) ``bias``) in format ``quantization`` on ``device``
    (default: the weight's). ``pack``: oneDNN packing for "none" on a CPU (compiled blocks take dense
    weights). ``dtype``: the compute dtype (default ``compute_dtype``); the bias is stored in it."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} must be one of {', '.join(QUANTIZATIONS)}")
    device = torch.device(device) if device is not None else weight.device
    weight = weight.detach().to(device)
    dtype = dtype or compute_dtype(quantization, weight.dtype)
    bias = None if bias is None else bias.detach().to(device, dtype).contiguous()
    out, inn = weight.shape
    if quantization == "int4" and (out % _KERNEL_MULTIPLE or inn % INT4_GROUP):
        quantization = "int8"
    if quantization == "int8" and inn % _KERNEL_MULTIPLE:
        quantization, dtype = "none", weight.dtype
        bias = None if bias is None else bias.to(dtype)
    if quantization == "none":
        return _dense(weight.to(dtype), bias, pack)
    if quantization == "int8":
        return _int8(weight.float(), bias, dtype)
    if quantization == "int4":
        return _int4(weight.float(), bias, dtype)
    return _bnb(weight, bias, quantization, dtype, bnb_4bit_type)


def _dense(weight: Tensor, bias: Tensor | None, pack: bool) -> Dense:
    weight = weight.contiguous()
    if pack and weight.device.type == "cpu" and torch.backends.mkldnn.is_available():
        try:
            return Dense(torch.ops.mkldnn._reorder_linear_weight(weight, None), bias)
        except (RuntimeError, AttributeError):
            pass
    return Dense(weight, bias)


def _int8(w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Int8:
    scale = (w.abs().amax(1).clamp_min(1e-12) / 127).to(dtype)  # rounded: a value past ±127 is clamped
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8(q.contiguous(), scale, bias)


def _grid_steps(groups: Tensor, low: Tensor, high: Tensor, fit: float = 0.15) -> Tensor:
    """The levels each group spans: the fewest k in 1..15 such that every value sits within ``fit`` of a
    step of (high - low) / k from ``low`` (a group of weights that came from a 4-bit GGUF block lies on such
    a grid, up to the bf16 rounding of its dequantized values); 15 where none fits (ordinary weights)."""
    span = (high - low).clamp_min(1e-12)[..., None]
    steps = torch.full(low.shape, 15, dtype=torch.long, device=low.device)
    for k in range(14, 0, -1):  # a grid of k levels also fits every multiple of k: keep the fewest
        r = (groups - low[..., None]) * (k / span)
        steps = torch.where((r - r.round()).abs().amax(-1) < fit, k, steps)
    return steps


def _int4(w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Int4:
    """Groups of ``INT4_GROUP``: the scale from the group's range over its levels (15, or fewer when the
    group lies on a coarser grid: GGUF-born weights come back exactly), rounded to ``dtype`` (the kernel's);
    the zero refitted by least squares to the rounded scale."""
    out, inn = w.shape
    groups = w.reshape(out, inn // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / _grid_steps(groups, low, high)).clamp_min(1e-12).to(dtype)  # (out, G)
    s = scale.float()[..., None]
    zero = (low + 8 * scale.float()).to(dtype)  # torch's convention: W = (q - 8)·scale + zero
    for _ in range(2):
        q = torch.round((groups - zero.float()[..., None]) / s + 8).clamp(0, 15)
        zero = (groups - (q - 8) * s).mean(-1).to(dtype)
    q = torch.round((groups - zero.float()[..., None]) / s + 8).clamp(0, 15).reshape(out, inn).to(torch.int32)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, out, 2)
    if w.is_cuda:
        tiles = 8 if inn % 1024 == 0 else 4 if inn % 512 == 0 else 2
        packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        return Int4(packed, scales_zeros, INT4_GROUP, bias, tiles)
    return Int4(torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_zeros, INT4_GROUP, bias, 0)


class _CastNotice(logging.Filter):
    """bitsandbytes logs, at every LLM.int8 call whose input is not fp16, that it casts the input to fp16:
    that is how it always computes, and fp32 inputs measured faster on a CPU than fp16 ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def _bnb(w: Tensor, bias: Tensor | None, quantization: str, dtype: torch.dtype, bnb_4bit_type: str) -> Bnb:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # an optional extra
        raise ImportError(f"quantization={quantization!r} needs bitsandbytes: pip install 'onejump[bnb]'") from e
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _CastNotice) for f in notices.filters):
        notices.addFilter(_CastNotice())
    out, inn = w.shape
    module: Any
    if quantization == "bnb-8bit":
        module = bnb.nn.Linear8bitLt(inn, out, bias=bias is not None, has_fp16_weights=False,
                                     threshold=BNB_THRESHOLD, device="meta")
        module.weight = bnb.nn.Int8Params(w.to(dtype).cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        if bnb_4bit_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_type={bnb_4bit_type!r} must be nf4 or fp4")
        module = bnb.nn.Linear4bit(inn, out, bias=bias is not None, compute_dtype=dtype, quant_type=bnb_4bit_type,
                                   device="meta")
        module.weight = bnb.nn.Params4bit(w.to(dtype).cpu(), requires_grad=False, quant_type=bnb_4bit_type)
        if inn % module.weight.blocksize or out % 32:  # its CPU kernel's repacking needs whole blocks
            module.support_avx512bf16_for_cpu = False
    if bias is not None:
        module.bias = torch.nn.Parameter(bias.cpu(), requires_grad=False)
    module = module.to(w.device)  # bitsandbytes quantizes on the move to a device (the CPU included)
    return Bnb(module.eval().requires_grad_(False), quantization, dtype)
