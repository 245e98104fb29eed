"""The options of ``onejump calibrate`` and ``onejump agreement``: plain dataclasses, torch-free, so the
command's parser reads its defaults without loading the engine."""

from __future__ import annotations

from dataclasses import dataclass

from shortcuts.engine.settings import Gate, Quantization

CALIBRATED_GATES: tuple[Gate, ...] = ("confidence", "entropy", "learned", "patience")  # the gate kinds a search ranks


@dataclass
class CalibrateConfig:
    jump: str
    model: str
    corpus: str
    out: str | None = None  # default: rewrite the jump artifact in place
    target: float = 0.95
    confidence: float = 0.95
    prompts: int = 200
    new_tokens: int = 64
    offset: int = 1000  # skip the first sentences of the shuffled corpus: the sweep's prompts
    gates: tuple[str, ...] = ("confidence",)  # of confidence, entropy, learned
    min_layers: tuple[int, ...] = ()  # first exit levels to try; () = 1 and every sixth of the depth
    stride: int = 1
    strides: tuple[int, ...] = ()  # check every stride-th level; () = (stride,)
    gate_corpus: str | None = None  # training prompts of the learned gate (.jsonl with titles: fit articles)
    gate_prompts: int = 100
    lens: bool = True  # also search the logit lens as the exit head where it predicts better
    exact_prompts: tuple[str, ...] = ()  # prompt files exact mode's draft policy is timed on (the first: grounded)
    exact_max_prompts: int = 12  # prompts of each file
    exact_only: bool = False  # keep approximate mode's stored setting, calibrate exact mode's draft policy
    device: str = "cpu"
    dtype: str = "float32"
    quantization: Quantization = "none"  # the engine's weight format the setting is calibrated (and stored) for
    compile: bool = False  # the engine's blocks compiled (int8 then keeps float32 activations)


@dataclass
class AgreementConfig:
    jump: str
    prompts: str
    model: str | None = None  # None: the artifact's base model if it is a folder here, else the SmolLM2 asset
    max_prompts: int = 50
    new_tokens: int = 32
    gate: str | None = None  # flags given override the stored setting (``calibration.resolve``)
    threshold: float | None = None
    min_layer: int | None = None
    stride: int | None = None
    costs: str = "measured"  # measured | flops
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    quantization: Quantization = "none"  # the weight format replayed (and whose stored setting resolves)
    compile: bool = False
