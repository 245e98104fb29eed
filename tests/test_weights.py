"""The engine's weight formats (``shortcuts.engine.weights``) on small matrices: each multiplies by the
matrix it says it holds, stays within its format's error of the dense one, packs what the kernels take and
falls back where they cannot; torch.compile keeps int8's activations in float32."""

from __future__ import annotations

import pytest
import torch

from shortcuts.engine.settings import QUANTIZATIONS
from shortcuts.engine.weights import INT4_GROUP, Bnb, Dense, Int4, Int8, head_format, linear_tensors, prepare_linear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# relative error of the dequantized weight (norm) for a Gaussian matrix, and of the product against it
WEIGHT_ERROR = {"none": 1e-7, "int8": 0.02, "int4": 0.15, "bnb-8bit": 0.02, "bnb-4bit": 0.15}
PRODUCT_ERROR = {"none": 1e-5, "int8": 1e-2, "int4": 1e-2, "bnb-8bit": 0.05, "bnb-4bit": 1e-2}  # bf16, LLM.int8


def _matrix(out: int = 64, inn: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inn, generator=g) * 0.05, torch.randn(out, generator=g) * 0.1


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_each_format_multiplies_by_the_matrix_it_holds(quantization: str) -> None:
    w, b = _matrix()
    lin = prepare_linear(w, b, quantization)  # type: ignore[arg-type]
    assert lin.format == quantization
    deq = w if quantization == "none" else lin.dequantized()
    assert deq.shape == w.shape
    assert _rel(deq, w) < WEIGHT_ERROR[quantization]
    for shape in ((128,), (5, 128), (2, 3, 128)):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
        y = lin(x)
        assert y.shape == (*shape[:-1], 64)
        assert y.dtype == x.dtype
        assert _rel(y, x @ deq.T + b) < PRODUCT_ERROR[quantization], shape


def test_sizes_follow_the_bits() -> None:
    w, _ = _matrix(256, 512)
    dense, int8, int4 = (prepare_linear(w, None, q, pack=False) for q in ("none", "int8", "int4"))  # type: ignore[arg-type]
    assert dense.nbytes == 256 * 512 * 4
    assert int8.nbytes == 256 * 512 + 256 * 2  # a bf16 scale per output channel
    assert int4.nbytes == 256 * 512 // 2 + 256 * (512 // INT4_GROUP) * 2 * 2  # a bf16 scale and zero per group
    assert all(t.numel() for t in linear_tensors(int4))


def test_int4_gives_back_weights_that_lie_on_a_4bit_grid() -> None:
    """A group of 32 on a grid of 16 levels (or fewer: here 12) comes back up to the bf16 rounding of its
    scale: what a GGUF 4-bit block dequantized holds. Random weights lose ~10%."""
    g = torch.Generator().manual_seed(1)
    groups = 64 * 128 // 32
    step = (torch.rand(groups, 1, generator=g) + 0.5) * 1e-2
    low = -torch.rand(groups, 1, generator=g) * 0.05
    levels = torch.randint(0, 12, (groups, 32), generator=g).float()
    w = (low + step * levels).reshape(64, 128)
    assert _rel(prepare_linear(w, None, "int4").dequantized(), w) < 5e-3
    noise, _ = _matrix()
    assert _rel(prepare_linear(noise, None, "int4").dequantized(), noise) > 0.05


def test_formats_fall_back_where_the_kernels_cannot_take_the_matrix() -> None:
    odd_out, _ = _matrix(10, 64)  # int4's CPU kernel packs 16 output channels at a time
    assert isinstance(prepare_linear(odd_out, None, "int4"), Int8)
    odd_in, _ = _matrix(64, 24)  # int8's kernel reads 16 input channels at a time
    assert isinstance(prepare_linear(odd_in, None, "int8"), Dense)
    assert isinstance(prepare_linear(odd_in, None, "int4"), Dense)
    with pytest.raises(ValueError, match="quantization='8bit' must be one of"):
        prepare_linear(odd_in, None, "8bit")  # type: ignore[arg-type]


def test_the_head_takes_the_8bit_sibling_of_a_4bit_format() -> None:
    assert [head_format(q) for q in QUANTIZATIONS] == ["none", "int8", "int8", "bnb-8bit", "bnb-8bit"]


def test_bitsandbytes_4bit_types_are_selectable() -> None:
    w, _ = _matrix()
    nf4, fp4 = (prepare_linear(w, None, "bnb-4bit", bnb_4bit_type=t) for t in ("nf4", "fp4"))
    assert isinstance(nf4, Bnb)
    assert nf4.module.weight.quant_type == "nf4"
    assert fp4.module.weight.quant_type == "fp4"  # type: ignore[union-attr]
    assert not torch.equal(nf4.dequantized(), fp4.dequantized())
    with pytest.raises(ValueError, match="nf4 or fp4"):
        prepare_linear(w, None, "bnb-4bit", bnb_4bit_type="int4")


@pytest.mark.slow
def test_compiled_int8_keeps_float32_activations() -> None:
    """Eagerly, torch's int8 kernel rounds x to bf16; traced by torch.compile, one row is a float32 reduction
    over the int8 weight (no bf16 rounding) and several rows a dequantized float32 product."""
    w, b = _matrix(64, 256)
    lin = prepare_linear(w, b, "int8", pack=False)
    assert isinstance(lin, Int8)
    ref = lambda x: x @ lin.dequantized().T + b  # noqa: E731
    compiled = torch.compile(lambda x, lin: lin(x), fullgraph=True)
    for rows in (1, 3):
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)) * 10
        assert _rel(compiled(x, lin), ref(x)) < 1e-4
        assert _rel(lin(x), ref(x)) > 5e-4  # eager: bf16 activations


@pytest.mark.slow
def test_compiled_dense_and_int4_match_eager() -> None:
    """Compiled, the dense format's one-row product is a float32 reduction (as exact as oneDNN's); int4 keeps
    torch's kernel (bf16 activations either way)."""
    w, b = _matrix(64, 256)
    for q, tol in (("none", 1e-5), ("int4", 1e-2)):
        lin = prepare_linear(w, b, q, pack=False)  # type: ignore[arg-type]
        assert isinstance(lin, (Dense, Int4))
        deq = w if q == "none" else lin.dequantized()
        ref = lambda x, deq=deq: x @ deq.T + b  # noqa: E731
        compiled = torch.compile(lambda x, lin: lin(x), fullgraph=True)
        for rows in (1, 3):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
            assert _rel(compiled(x, lin), ref(x)) < tol
            assert _rel(lin(x), ref(x)) < tol
