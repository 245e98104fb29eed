"""OpenAI-compatible request and response bodies, plus onejump's ``early_exit`` extension."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shortcuts.engine.settings import Gate, Mode

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

    mode: Mode | None = None
    gate: Gate | None = None
    threshold: float | None = Field(None, ge=0.0)
    min_layer: int | None = Field(None, ge=1)
    stride: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)
    max_draft: int | None = Field(None, ge=1, le=16, description="exact mode: most drafts verified at once")


MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class _Sampling(BaseModel):
    """Every field of OpenAI's request is declared: each one works or is refused with a 400 naming it
    (``Serving.check_supported``); an unknown field is a 400 too, never silently dropped. Strict:
    "stream": "yes" or "max_tokens": true is a 400, not a silent coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (prompt scoring)")
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16, description="choices per prompt; with a seed, choice i uses seed + i")
    best_of: int | None = Field(None, ge=1, le=16, description="only equal to n (no reranking)")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    user: str | None = Field(None, description="recorded nowhere; accepted for compatibility")
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, description="vLLM: -1 or 0 = all tokens")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")
    early_exit: EarlyExit | None = None

    @field_validator("stop")
    @classmethod
    def _stop_unicode(cls, v: str | list[str] | None) -> str | list[str] | None:
        for s in [v] if isinstance(v, str) else (v or []):
            _unicode(s, "stop")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias[{key}]={bias} must be in [-100, 100]")
        return v

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def top_n(self) -> int | None:
        """How many top logprobs each token reports; None when logprobs were not asked for."""
        raise NotImplementedError


TokenId = Annotated[int, Field(ge=0)]
Prompt = str | list[TokenId] | list[str] | list[list[TokenId]]


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="refused unless empty (no fill-in-the-middle)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Prompt) -> Prompt:
        items: list = [v] if isinstance(v, str) or (v and isinstance(v[0], int)) else list(v)
        if not items:
            raise ValueError("prompt must not be empty")
        for item in items:
            if not item:
                raise ValueError("prompt must not be empty")
            if isinstance(item, str):
                _unicode(item, "prompt")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or token-id list each."""
        v = self.prompt
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]  # type: ignore[list-item]
        return list(v)  # type: ignore[arg-type]

    @property
    def top_n(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text_unicode(cls, v: str) -> str:
        return _unicode(v, "content")


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_unicode(cls, v: str | list[TextPart] | None) -> str | list[TextPart] | None:
        return _unicode(v, "content") if isinstance(v, str) else v

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates take it: content as one string, tool calls as dicts."""
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # OpenAI fields this server refuses unless they ask for nothing (Serving.check_supported)
    tools: list[dict[str, Any]] | None = Field(None, description="refused unless empty (no tool calling)")
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none' or 'auto' without tools")
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'}")
    functions: list[dict[str, Any]] | None = Field(None, description="refused unless empty")
    function_call: str | dict[str, Any] | None = Field(None, description="only 'none'")
    modalities: list[str] | None = Field(None, description="only ['text']")
    audio: dict[str, Any] | None = Field(None, description="refused")
    prediction: dict[str, Any] | None = Field(None, description="refused")
    web_search_options: dict[str, Any] | None = Field(None, description="refused")
    reasoning_effort: str | None = Field(None, description="refused (no reasoning model)")
    verbosity: str | None = Field(None, description="refused")
    store: bool | None = Field(None, description="only false (nothing is stored)")
    metadata: dict[str, str] | None = Field(None, description="accepted only without store")
    service_tier: str | None = Field(None, description="only 'auto' or 'default'")
    prompt_cache_key: str | None = Field(None, description="accepted; prompts are not cached across requests")
    safety_identifier: str | None = Field(None, description="recorded nowhere; accepted for compatibility")

    @property
    def top_n(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


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


class CompletionLogprobs(BaseModel):
    """vLLM's completions logprobs, plus the layer whose head decided each token (None: a prompt
    token scored by the full model, or the first one, which has no logprob)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)
    exit_layers: list[int | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    exit_layer: int = Field(description="the layer whose head decided the token (num_layers: the full model)")


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


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
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "onejump"
    root: str | None = None
    max_model_len: int | None = None
    early_exit: dict[str, dict[str, Any]] | None = Field(
        None, description="onejump: the exit setting a request in each mode runs when its early_exit names no "
        "field (mode -> setting, where it came from and the precision it was measured at); null while loading")
    weights: dict[str, Any] | None = Field(
        None, description="onejump: the engine's weight format (quantization), the bytes of its matrices (weights_mb) "
        "and the load-time self-check (self_check: its logits against the model run with the same weights, "
        "'math', and against the dense model, 'error', as shares of the logits' scale); null while loading")


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


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
