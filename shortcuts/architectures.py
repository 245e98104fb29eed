"""The architectures onejump knows and where each keeps its parts (attribute paths from the Hugging Face
model). Torch-free: placement and the adapter both read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shortcuts.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its parts, as attribute paths from the CausalLM module."""

    layers: str
    norm: str
    embed: str
    norm_kind: Literal["rms", "layer"]
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight)


_DECODER: dict[str, Any] = {"layers": "model.layers", "norm": "model.norm", "embed": "model.embed_tokens"}
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec(**_DECODER, norm_kind="rms"),
    "mistral": ArchSpec(**_DECODER, norm_kind="rms"),
    "qwen2": ArchSpec(**_DECODER, norm_kind="rms"),
    "qwen3": ArchSpec(**_DECODER, norm_kind="rms"),
    "gemma3_text": ArchSpec(**_DECODER, norm_kind="rms", norm_offset=1.0),
    "gpt2": ArchSpec(layers="transformer.h", norm="transformer.ln_f", embed="transformer.wte", norm_kind="layer"),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; onejump knows {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]
