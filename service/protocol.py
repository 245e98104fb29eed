"""OpenAI-compatible request and response bodies, plus onejump's ``early_exit`` extension."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SEED_LIMIT = 2**63  # seeds are below it: OpenAI's seed is an int64 (and 2**63 is exact in the JSON schema)


def _unicode(value: str, what: str) -> str:
    """A JSON string may hold a lone UTF-16 surrogate (``"\\ud800"``): no tokenizer can take it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}; "
                         "send valid Unicode text") from None
    return value


class EarlyExit(BaseModel):
    """Per-request exit settings; every field left out takes the server's default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # no "threshold": false

    mode: Literal["off", "approximate", "exact"] | None = None
    gate: Literal["confidence", "entropy", "patience", "learned"] | None = None
    threshold: float | None = Field(None, ge=0.0)
    min_layer: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)


class _Sampling(BaseModel):
    # OpenAI clients send fields we do not use (user, ...); strict: "stream": "yes" or "max_tokens": true is a 400,
    # not a silent coercion
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")
    early_exit: EarlyExit | None = None

    @field_validator("stop")
    @classmethod
    def _stop_unicode(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else (v or []):
            _unicode(s, "stop")
        return v

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt must not be empty")
        return _unicode(v, "prompt")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_unicode(cls, v: str) -> str:
        return _unicode(v, "content")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ExitReport(BaseModel):
    """The extension field: how deep each generated token went (the openai client ignores it)."""

    mode: str
    num_layers: int
    exit_layers: list[int]
    mean_exit_layer: float
    layers_computed: int
    layers_skipped: int
    acceptance_rate: float | None = None


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class _Response(BaseModel):
    """Fields every completion body shares; subclasses set ``id``'s prefix, ``object`` and ``choices``."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    usage: Usage | None = None
    early_exit: ExitReport | None = None


class CompletionResponse(_Response):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "onejump"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody
