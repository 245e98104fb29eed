"""One view over Hugging Face causal LMs: embeddings, decoder blocks, final norm, LM head.

Vocabulary used throughout onejump:

- *level l* (1 ≤ l < L): the residual stream after decoder block l (``hidden_states[l]`` in HF terms).
- *final state*: the residual stream after the last block L, **before** the final norm. This is
  what a jump predicts, for every architecture; the model's head is ``lm_head(final_norm(·))``.
  ``CausalLM.head`` applies exactly that (plus Gemma-2 style soft-capping where configured),
  so ``head(final_state)`` equals the model's own logits (tested per architecture).
- *identity shortcut*: ``head(h_l)``, the logit lens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from shortcuts.architectures import arch_spec
from shortcuts.errors import UnsupportedModelError
from shortcuts.placement import DeviceMap, Placement, refuse_offload, resolve_map


@dataclass(frozen=True)
class NormSpec:
    """The final norm as plain tensors: y = (x - mean?) / scale * weight + bias."""

    kind: Literal["rms", "layer"]
    weight: Tensor  # effective per-dimension gain, (d,)
    bias: Tensor | None  # (d,) for LayerNorm
    eps: float


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _split_spec(spec: str | Path) -> tuple[str, dict[str, str]]:
    """A hub id or folder loads as is; a path to a ``.gguf`` file loads with ``gguf_file=``."""
    path = Path(spec)
    if (path.is_absolute() or str(spec).startswith(".")) and not path.exists():
        raise FileNotFoundError(f"model path not found: {path}")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(path.parent), {"gguf_file": path.name}
    return str(spec), {}


def _gguf_dense(extra: dict[str, str]) -> dict[str, Any]:
    """GGUF weights are dequantized into plain tensors: early exit needs the real matrices."""
    if "gguf_file" not in extra:
        return {}
    from transformers import GgufConfig

    return {"quantization_config": GgufConfig(dequantize=True)}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but torch sees no CUDA device")
    return device


class CausalLM:
    """A loaded causal LM with its tokenizer, cut into the parts early exit needs."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        # HF modules are typed loosely (attribute access yields Tensor | Module): keep them Any
        hf: Any = model
        self.model: Any = hf.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config: Any = hf.config
        self.spec = arch_spec(self.config.model_type)
        self.layers: Any = _get(model, self.spec.layers)  # nn.ModuleList
        self.decoder: Any = _get(model, self.spec.layers.rpartition(".")[0])  # the stack: rotary, positions
        self.norm: Any = _get(model, self.spec.norm)
        self.embed_tokens: Any = _get(model, self.spec.embed)
        self.lm_head: Any = self.model.get_output_embeddings()
        self._vocab_size = int(self.lm_head.weight.shape[0])  # read once: the engine may free the head's weight
        self.softcap: float | None = getattr(self.config, "final_logit_softcapping", None)

    @staticmethod
    def load_config(spec: str | Path) -> Any:
        """The model's configuration alone (no weights); refuses unknown architectures."""
        from transformers import AutoConfig

        source, extra = _split_spec(spec)
        config = AutoConfig.from_pretrained(source, **extra)
        arch_spec(getattr(config, "model_type", "?"))
        return config

    @classmethod
    def load(cls, spec: str | Path, dtype: str = "float32", device: str = "cpu",
             device_map: DeviceMap | None = None) -> CausalLM:
        """Load a hub id, a local folder or a ``.gguf`` file, dense (the engine quantizes the weights itself:
        ``engine.weights``); refuse unknown architectures early.
        ``device_map`` (``shortcuts.placement``) spreads the modules over several devices instead of
        putting the model on ``device``: a strategy ("auto", "balanced", "sequential"), a device list
        ("cuda:0,cuda:1": the blocks split evenly) or a dict; offloading to disk or meta is refused."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = cls.load_config(spec)  # fail before loading any weights
        source, extra = _split_spec(spec)
        device = resolve_device(device) if device_map is None else "cuda"  # a map places every module itself
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), **extra, **_gguf_dense(extra)}
        if device_map is not None:
            kwargs["device_map"] = resolve_map(device_map, config)
        model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if device_map is not None:
            refuse_offload(getattr(model, "hf_device_map", None) or {},
                           [n for n, p in model.named_parameters() if p.device.type == "meta"])
        else:
            model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer, name=str(spec))

    # --- sizes ---------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def block_devices(self) -> list[torch.device]:
        """The device of each decoder block (its weights'), in order."""
        return [next(layer.parameters()).device for layer in self.layers]

    def placement(self) -> Placement:
        """Where the engine runs each block, each exit check and the full head (``shortcuts.placement``)."""
        return Placement(tuple(self.block_devices()), self.device)

    @property
    def exit_levels(self) -> list[int]:
        """Levels a token may leave at: after blocks 1..L-1 (level L is the full model)."""
        return list(range(1, self.num_layers))

    # --- the head ------------------------------------------------------------------------------
    def norm_spec(self) -> NormSpec:
        weight = self.norm.weight.detach().float() + self.spec.norm_offset
        bias = getattr(self.norm, "bias", None)
        eps = getattr(self.norm, "eps", None) or getattr(self.norm, "variance_epsilon", None)
        if eps is None:
            raise UnsupportedModelError(f"cannot find the epsilon of {type(self.norm).__name__}")
        return NormSpec(self.spec.norm_kind, weight, None if bias is None else bias.detach().float(), float(eps))

    def unembedding(self) -> Tensor:
        """W_U, (V, d), in float32."""
        return self.lm_head.weight.detach().float()

    def head(self, h: Tensor) -> Tensor:
        """Logits from a final-state estimate: lm_head(final_norm(h)). (..., d) -> (..., V)."""
        x = self.norm(h.to(self.norm.weight.device, self.lm_head.weight.dtype))
        logits = self.lm_head(x.to(self.lm_head.weight.device))  # norm and head may sit on two devices
        return soft_cap(logits, self.softcap)

    # --- identity of the weights ---------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """A config hash plus weight statistics that survive dtype changes and 8/4-bit loads."""
        conf_hash = config_fingerprint(self.config)
        emb = self.embed_tokens.weight.detach().float()
        rows = torch.linspace(0, emb.shape[0] - 1, 8).long()
        return {
            "config_sha256": conf_hash,
            "embed_norm": round(float(emb.norm()), 4),
            "embed_rows": [round(float(v), 4) for v in emb[rows].sum(-1)],
            "final_norm_sum": round(float(self.norm.weight.detach().float().sum()), 4),
        }


def config_fingerprint(config: Any) -> str:
    """The configuration half of ``CausalLM.fingerprint`` (architecture, width, depth, vocabulary, heads):
    a jump artifact's model can be checked from its config alone, before any weight loads."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "n_embd", "n_layer", "n_head")
    conf = {k: getattr(config, k, None) for k in keys}
    return hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest()[:16]


def soft_cap(logits: Tensor, cap: float | None) -> Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any], rtol: float = 2e-2) -> str | None:
    """None when two fingerprints describe the same model; else a sentence saying what differs."""
    if expected.get("config_sha256") != actual.get("config_sha256"):
        return "the model configuration differs (layers, width, vocabulary or heads)"
    for key in ("embed_norm", "final_norm_sum"):
        a, b = float(expected[key]), float(actual[key])
        if abs(a - b) > rtol * max(abs(a), abs(b), 1e-6):
            return f"the weights differ ({key}: artifact {a} vs model {b})"
    for a, b in zip(expected["embed_rows"], actual["embed_rows"], strict=True):
        if abs(a - b) > rtol * max(abs(a), abs(b), 1.0):
            return "the weights differ (embedding rows)"
    return None
