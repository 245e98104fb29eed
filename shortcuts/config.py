"""Settings of the library's pipelines: plain dataclasses, no torch, so the CLI starts fast."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("pure-mse", "residual-mse", "pure-kl", "residual-kl")
PAPER_VARIANT = "pure-mse"  # N-NJTC as published: B·A·BN(h) + b, trained with MSE


@dataclass
class FitConfig:
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
