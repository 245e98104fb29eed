"""The one place the service reads its configuration: ``ONEJUMP_*`` environment variables and CLI flags."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shortcuts.engine.settings import DEFAULT_MODE, DraftPolicy, Gate, Mode, Quantization

if TYPE_CHECKING:
    from shortcuts.placement import DeviceMap

DEFAULT_MODEL = ".cache/onejump/models/smollm2-135m-instruct"
DEFAULT_JUMP = "docs/results/smollm2-135m/jump.safetensors"
CHECKOUT = Path(__file__).resolve().parents[1]  # the repository (or the installed packages' folder)


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only (127.0.0.0/8, ::1, localhost); a name is not."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _default_model(v: str) -> str:
    """The default model as the CLI finds it (``shortcuts.assets.default_model_dir``: $ONEJUMP_CACHE,
    else ./.cache/onejump, else the checkout's), so ``python -m service`` works from any folder."""
    if v != DEFAULT_MODEL:
        return v
    from shortcuts.assets import default_model_dir  # no torch: paths only

    return str(default_model_dir())


def _default_jump(v: str | None) -> str | None:
    """The default jump from the working folder, else the checkout's."""
    if v != DEFAULT_JUMP or Path(v).exists() or not (CHECKOUT / v).exists():
        return v
    return str(CHECKOUT / v)


class Settings(BaseSettings):
    """Invalid values stop start-up with a message naming the variable."""

    model_config = SettingsConfigDict(env_prefix="ONEJUMP_", extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="hub id, local folder or .gguf file (the default is found from "
                       "any working folder, as the onejump command finds it)")
    jump: str | None = Field(DEFAULT_JUMP, description="jump artifact (.safetensors); empty: identity exit head (the "
                             "default: from the working folder, else the checkout's)")
    served_model_name: str | None = Field(None, description="name in /v1/models (default: the model's folder name)")
    served_model_aliases: str = Field("", description="comma-separated names also accepted as 'model' (any "
                                      "other name gets 404)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    device_map: str | None = Field(None, description="one model over several devices (replaces device): "
                                   "cuda:0,cuda:1 splits the blocks evenly over those devices, in order; or "
                                   "auto, balanced, balanced_low_0, sequential (accelerate's); or a JSON object "
                                   "module -> device. Offloading to disk/meta is refused")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bf16 on CUDA")
    quantization: Quantization = Field(
        "none", description="the engine's weight format, quantized at load from the dense weights: none (the "
        "model's dtype), int8 (per output channel), int4 (groups of 32; the head int8), bnb-8bit (LLM.int8), "
        "bnb-4bit (nf4 or fp4, the head bnb-8bit); bitsandbytes runs on CPU and CUDA (docs/quantization.md)")
    bnb_4bit_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes' 4-bit data type (bnb-4bit)")
    exit_mode: Mode = Field(DEFAULT_MODE, description="the mode of a request that names none")
    exit_gate: Gate | None = Field(
        None, description="default: the artifact's calibrated gate, else confidence")
    exit_threshold: float | None = Field(None, description="default: the artifact's calibrated value, else 0.9")
    exit_stride: int | None = Field(None, ge=1, description="check every stride-th level; default: the artifact's "
                                    "calibrated value, else 1")
    exit_min_layer: int | None = Field(None, ge=1, description="first exit level; default: the artifact's "
                                       "calibrated value, else 1")
    exit_draft: DraftPolicy | None = Field(None, description="exact mode's draft source (auto, ngram, exit, none); "
                                           "default: the artifact's calibrated policy, else auto")
    exit_max_draft: int | None = Field(None, ge=1, le=16, description="exact mode: most drafts verified at once; "
                                       "default: the artifact's calibrated value, else 8")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens when a request names none (OpenAI: 16)")
    default_temperature: float = Field(0.0, ge=0.0, description="0 = greedy")
    max_prompt_tokens: int = Field(2048, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    queue_size: int = Field(16, ge=1, description="requests waiting beyond this get 429")
    max_batch_size: int = Field(8, ge=1, description="requests decoded together (continuous batching); 1: one at a "
                                "time")
    compile: bool = Field(False, description="run the decoder blocks under torch.compile (compiled at start-up, "
                          "cached on disk)")
    request_timeout_s: float = Field(120.0, gt=0, description="a request still queued after this gets 504 (at once)")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies get 413 before they are read")
    prefill_chunk_tokens: int | None = Field(None, ge=1, description="prompt tokens per forward pass in prefill "
                                             "and prompt scoring; a client that leaves (or a shutdown) stops the "
                                             "work between two chunks. Default: 64 on a CPU (a chunk of SmolLM2 "
                                             "takes well under a second), 512 on a GPU")
    shutdown_timeout_s: int = Field(30, ge=0, description="on SIGTERM the server keeps listening: new requests get "
                                      "503, running ones get this long to finish, then are cancelled; then it exits")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="every route but /health and /metrics needs 'Authorization: "
                                      "Bearer <key>'; empty or unset: no key")
    api_key_file: Path | None = Field(None, description="a file holding the key (a compose or Kubernetes secret), "
                                      "instead of api_key; surrounding whitespace is dropped")
    allow_unauthenticated: bool = Field(False, description="serve without a key on a host beyond loopback (refused "
                                        "otherwise)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: object) -> object:
        """An empty ONEJUMP_API_KEY (compose passes one when the variable is unset) means no auth,
        never auth with the empty key."""
        if isinstance(v, SecretStr):
            v = v.get_secret_value()
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("api_key_file", mode="before")
    @classmethod
    def _empty_file_is_none(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("model", mode="after")
    @classmethod
    def _found_model(cls, v: str) -> str:
        return _default_model(v)

    @field_validator("jump", mode="after")
    @classmethod
    def _found_jump(cls, v: str | None) -> str | None:
        return _default_jump(v)

    @field_validator("device_map", mode="before")
    @classmethod
    def _valid_map(cls, v: object) -> object:
        """Empty is no map; anything else must parse (``device_map_value``) and offload nothing."""
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        from shortcuts.placement import parse_device_map  # torch: only when a map is set

        parse_device_map(str(v))
        return str(v).strip()

    @property
    def device_map_value(self) -> DeviceMap | None:
        """``device_map`` as ``CausalLM.load`` takes it (a strategy, a device list or a dict)."""
        from shortcuts.placement import parse_device_map

        return None if self.device_map is None else parse_device_map(self.device_map)

    @model_validator(mode="after")
    def _key(self) -> Settings:
        """The key from ``api_key_file`` (one of the two, never both); an empty key is no key. A host
        beyond loopback without a key is refused unless ``allow_unauthenticated`` says so."""
        if self.api_key_file is not None:
            if self.api_key is not None:
                raise ValueError("give the API key in api_key or in api_key_file, not both")
            try:
                key = self.api_key_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"api_key_file {self.api_key_file} cannot be read: {e.strerror}") from None
            self.api_key = SecretStr(key) if key else None
        if self.api_key is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(f"host={self.host!r} is reachable beyond this machine and no API key is set: set "
                             "ONEJUMP_API_KEY_FILE (or ONEJUMP_API_KEY), or ONEJUMP_ALLOW_UNAUTHENTICATED=true to "
                             "serve without a key")
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.quantization.startswith("bnb") and self.compile:
            raise ValueError(f"quantization={self.quantization!r} does not compile (bitsandbytes' layers); "
                             "use int8/int4 with compile, or compile=false")
        bounded = self.exit_gate in (None, "confidence", "learned")
        if self.exit_threshold is not None and bounded and not 0 <= self.exit_threshold <= 1:
            raise ValueError(f"exit_threshold={self.exit_threshold} must be in [0, 1] for the "
                             f"{self.exit_gate or 'confidence'} gate")
        if self.default_max_tokens > self.max_new_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} exceeds max_new_tokens="
                             f"{self.max_new_tokens}")
        return self

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.rstrip("/").split("/")[-1]

    @property
    def served_names(self) -> list[str]:
        """The names a request's ``model`` may take: the served name, then the aliases."""
        return [self.model_name, *(a.strip() for a in self.served_model_aliases.split(",") if a.strip())]


def describe_error(e: ValidationError) -> str:
    """One line per bad setting, named as the user sets it (flag and variable), no pydantic internals."""
    lines = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        where = f"--{name.replace('_', '-')} / ONEJUMP_{name.upper()}: " if name else ""
        got = f" (got {err['input']!r})" if name and name != "api_key" and not isinstance(err["input"], dict) else ""
        lines.append(f"  {where}{str(err['msg']).removeprefix('Value error, ')}{got}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    """CLI flags (``--exit-threshold 0.8``) override ``ONEJUMP_*`` variables, which override defaults."""
    parser = argparse.ArgumentParser(prog="python -m service",
                                     description="onejump: an OpenAI-compatible early-exit server")
    for name, field in Settings.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                            help=f"{field.description or ''} (env ONEJUMP_{name.upper()}, default {field.default!r})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Settings(**given)
