"""Settings of the early-exit decoder: plain dataclasses, validated on construction, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["off", "approximate", "exact"]
Gate = Literal["confidence", "entropy", "patience", "learned"]
KVPolicy = Literal["catchup", "copy"]
DraftPolicy = Literal["auto", "ngram", "exit", "none"]
DraftSource = Literal["ngram", "exit"]  # where a draft came from (the policies that draft by themselves)
Quantization = Literal["none", "int8", "int4", "bnb-8bit", "bnb-4bit"]

MODES = ("off", "approximate", "exact")
GATES = ("confidence", "entropy", "patience", "learned")
KV_POLICIES = ("catchup", "copy")
DRAFT_POLICIES = ("auto", "ngram", "exit", "none")
DRAFT_SOURCES: tuple[DraftSource, ...] = ("ngram", "exit")
# weight formats of the engine's block math: dense (the model's dtype), torch's CPU weight-only int8 (per output
# channel) and int4 (groupwise), bitsandbytes LLM.int8 and 4-bit (nf4)
QUANTIZATIONS = ("none", "int8", "int4", "bnb-8bit", "bnb-4bit")
DEFAULT_MODE: Mode = "exact"  # what a request (and ``ExitSettings()``) runs when it names no mode (docs/drafts.md)


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(choices)}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        raise ValueError(f"{name}={value!r} must be a number in [{low:g}, {high:g}]")


@dataclass(frozen=True)
class ExitSettings:
    """When a token may leave the forward pass early, and what happens to the layers it skips.

    mode: "off" runs every block (plain decoding); "approximate" takes the jump's prediction when
        the gate fires; "exact" drafts with early exits and verifies the drafts with the full
        model (self-speculative decoding: same output as "off" under greedy decoding, and the
        same distribution under sampling).
    gate: "confidence" exits when the exit head's softmax max-probability >= threshold (a
        threshold of 1.0 never exits); "entropy" when its entropy (nats) <= threshold;
        "patience" when the exit head's top-1 token is the same for ``patience`` checks in a row;
        "learned" when the artifact's learned gate (``learned_gate.LearnedGate``: a logistic model on
        the check's free features) scores >= threshold (1.0 never exits).
    min_layer, stride: the gate is checked after blocks min_layer, min_layer + stride, ... < L.
    kv_policy: "catchup" keeps the exit state of a token and runs it through the layers it
        skipped together with the next token that goes deeper (exact keys/values, delayed);
        "copy" fills the skipped layers' keys/values at once from the exit state.
    max_draft: in exact mode, the most drafted tokens verified by one full-depth pass.
    draft: in exact mode, where drafts come from (``drafts``): "exit" (the exit head, self-speculation),
        "ngram" (the longest suffix match in the prompt and output, prompt lookup), "auto" (per step and
        per row, the source predicted to yield the most tokens per second, or none), "none" (never
        draft: full depth).
    ngram_min, ngram_max: the suffix lengths the n-gram lookup matches, longest first.
    """

    mode: Mode = DEFAULT_MODE
    gate: Gate = "confidence"
    threshold: float = 0.9
    patience: int = 2
    min_layer: int = 1
    stride: int = 1
    kv_policy: KVPolicy = "catchup"
    max_draft: int = 8
    draft: DraftPolicy = "auto"
    ngram_min: int = 1
    ngram_max: int = 4

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("draft", self.draft, DRAFT_POLICIES)
        _check_choice("gate", self.gate, GATES)
        _check_choice("kv_policy", self.kv_policy, KV_POLICIES)
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"{threshold=} must be a finite number")
        if self.gate in ("confidence", "learned") and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{threshold=} must be in [0, 1] for the {self.gate} gate")
        if self.gate == "entropy" and threshold < 0.0:
            raise ValueError(f"{threshold=} must be >= 0 (nats) for the entropy gate")
        _check_int("patience", self.patience, 1)
        _check_int("min_layer", self.min_layer, 1)
        _check_int("stride", self.stride, 1)
        _check_int("max_draft", self.max_draft, 1)
        _check_int("ngram_min", self.ngram_min, 1)
        _check_int("ngram_max", self.ngram_max, self.ngram_min)
        if self.mode == "exact" and self.kv_policy != "catchup":
            raise ValueError(f"mode='exact' needs kv_policy='catchup' (verification recomputes the skipped "
                             f"layers exactly); got kv_policy={self.kv_policy!r}")

    def check_levels(self, num_layers: int) -> list[int]:
        """The levels (1..L-1) where the gate is checked, none when it cannot fire (a confidence
        threshold of 1.0); fails if min_layer is out of range."""
        if not 1 <= self.min_layer <= num_layers - 1:
            raise ValueError(f"min_layer={self.min_layer} must be in [1, {num_layers - 1}] for a model with "
                             f"{num_layers} layers")
        if self.gate in ("confidence", "learned") and self.threshold >= 1.0:
            return []
        return list(range(self.min_layer, num_layers, self.stride))


@dataclass(frozen=True)
class GenerationSettings:
    """How many tokens, how to pick them, when to stop; ``exit`` says how tokens leave early.

    temperature 0 is greedy decoding; otherwise tokens are sampled from softmax(logits / T)
    restricted to the smallest top-p set, with a ``torch.Generator`` seeded by ``seed``.
    stop_token_ids None stops at the model's EOS token(s); an empty tuple never stops early.

    Logits processors (vLLM's meaning, applied to the deciding head's logits before a token is
    picked, in exact mode to the draft's and the full model's alike): ``repetition_penalty`` divides
    the positive logits (multiplies the negative ones) of every token in the prompt or the output;
    ``frequency_penalty`` subtracts its value times each token's count in the output,
    ``presence_penalty`` its value once per token present; ``logit_bias`` adds (token id, bias);
    ``top_k`` keeps the k most likely tokens (0: all), ``min_p`` those with at least min_p times the
    top probability. ``logprobs``: each token also reports its log-probability under the head that
    decided it and that head's ``logprobs`` most likely tokens (None: nothing is computed).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    exit: ExitSettings = field(default_factory=ExitSettings)

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r} must be a finite number >= 0 (0 = greedy)")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p={p!r} must be in (0, 1]")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, tuple):
                object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
            for t_id in self.stop_token_ids:  # type: ignore[union-attr]
                _check_int("stop_token_ids entry", t_id, 0)
        self._check_processors()
        if not isinstance(self.exit, ExitSettings):
            raise ValueError(f"exit must be an ExitSettings; got {type(self.exit).__name__}")

    def _check_processors(self) -> None:
        _check_int("top_k", self.top_k, 0)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 1e-6, math.inf)
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        object.__setattr__(self, "logit_bias", tuple((t, b) for t, b in self.logit_bias))
        for t_id, bias in self.logit_bias:
            _check_int("logit_bias token id", t_id, 0)
            _check_number(f"logit_bias[{t_id}]", bias, -100.0, 100.0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether the logits change before a token is picked (penalties or a bias)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))
