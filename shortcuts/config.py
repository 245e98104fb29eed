"""Settings of the library's pipelines: plain dataclasses, no torch, so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("pure-mse", "residual-mse", "pure-kl", "residual-kl")
FIT_GATES = ("confidence", "entropy", "learned", "patience")  # the gate kinds ``onejump fit`` calibrates
PAPER_VARIANT = "pure-mse"  # N-NJTC as published: B·A·BN(h) + b, trained with MSE


@dataclass
class StudyConfig:
    """``onejump fit --study``: the paper's comparison (``shortcuts.study``)."""

    model: str
    corpus: str
    eval_corpus: str
    out_dir: str
    n_train: int = 9000
    n_test: int = 3000
    val_fraction: float = 0.1
    rank: int = 32
    variants: tuple[str, ...] = ("pure-mse", "residual-mse", "pure-kl")
    epochs: int = 20
    kl_epochs: int = 2
    kl_samples: int = 3000  # KL variants fine-tune the MSE jumps on at most this many samples
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    max_tokens: int = 64
    collect_batch: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    cache: str | None = None
    default_variant: str | None = None  # None: the variant with the best predicted speed at ``target``
    target: float = 0.95  # greedy agreement the default variant's exits must keep (lower bound)
    select_prompts: int = 32  # validation prompts continued greedily to predict each variant's speed
    select_new_tokens: int = 24
    quantization: str = "none"  # the engine's weight format the default variant's speed is predicted at
    plots: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        if PAPER_VARIANT not in self.variants:
            raise ValueError(f"variants must include the paper's {PAPER_VARIANT!r}; got {self.variants}")
        for v in (*self.variants, self.default_variant or PAPER_VARIANT):
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction=}")
        if self.n_train < 20 or self.n_test < 1:
            raise ValueError(f"need n_train >= 20 and n_test >= 1; got {self.n_train=}, {self.n_test=}")


@dataclass
class FitConfig:
    """``onejump fit``: the recipe that works (``shortcuts.fit``). Prompts are corpus sentences cut to 32
    tokens, each continued greedily by the model for ``new_tokens`` (decode-matched states)."""

    model: str
    corpus: str
    eval_corpus: str
    out_dir: str
    fit_prompts: int = 256  # the jump trains on ``per_prompt`` decode steps of each
    val_prompts: int = 96  # calibration (other articles than the fit prompts' when the corpus has titles)
    test_prompts: int = 64  # the report: precision, ceiling and the stored setting replayed (eval corpus)
    gate_prompts: int = 32  # the first fit prompts, every step: the learned gate's training table
    new_tokens: int = 24
    per_prompt: int = 8
    batch_size: int = 32  # prompts continued at once
    rank: int = 32
    mse_epochs: int = 4
    kl_epochs: int = 1
    lr: float = 1e-3
    seed: int = 0
    target: float = 0.95  # greedy agreement (95% lower bound over prompts) the stored setting keeps
    gates: tuple[str, ...] = FIT_GATES
    strides: tuple[int, ...] = (1, 2, 3, 4)
    min_layers: tuple[int, ...] = ()  # () = 1 and every sixth of the depth
    lens: bool = True  # the logit lens at the levels where it predicts better, if that calibrates faster
    all_level: bool = False  # also train one jump per level on the same data, for the comparison
    threads: int | None = None  # None: torch's, or 1 when the machine is already busy (load >= cores)
    quantization: str = "none"  # the recipe calibrates the dense model; other formats: `onejump calibrate` after
    device: str = "cpu"
    dtype: str = "float32"
    plots: bool = True

    def __post_init__(self) -> None:
        self.gates, self.strides, self.min_layers = tuple(self.gates), tuple(self.strides), tuple(self.min_layers)
        counts = {k: getattr(self, k) for k in ("fit_prompts", "val_prompts", "test_prompts", "per_prompt")}
        if bad := {k: v for k, v in counts.items() if v < 2}:
            raise ValueError(f"{bad} must be >= 2")
        if self.new_tokens < 3 or self.gate_prompts < 0 or self.mse_epochs < 0 or self.kl_epochs < 0:
            raise ValueError(f"new_tokens={self.new_tokens} must be >= 3; gate_prompts, mse_epochs, kl_epochs >= 0")
        if self.mse_epochs + self.kl_epochs == 0:
            raise ValueError("mse_epochs + kl_epochs must be >= 1")
        if unknown := [g for g in self.gates if g not in FIT_GATES]:
            raise ValueError(f"gates {unknown} cannot be calibrated; use {', '.join(FIT_GATES)}")
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target={self.target} must be in (0, 1]")
        if self.quantization != "none":
            raise ValueError(f"fit calibrates the dense model; for quantization={self.quantization!r} run `onejump "
                             f"calibrate --jump <its jump.safetensors> --quantization {self.quantization}` after it")
