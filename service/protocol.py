"""OpenAI-compatible request and response bodies, plus onejump's ``early_exit`` extension.

Two checks are written once and shared by every route: ``Text`` (any string a request carries must be
valid Unicode: a JSON string may hold a lone UTF-16 surrogate that no tokenizer takes) and
``parse_token_id`` (a ``logit_bias`` key is a token id in decimal ASCII digits). The published schema
states the limits (stop strings, ``logit_bias`` entries) so that a schema-valid body is served."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
        ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from shortcuts.engine.settings import DraftPolicy, Gate, Mode

SEED_LIMIT = 2**63  # seeds are below it: OpenAI's seed is an int64 (and 2**63 is exact in the JSON schema)
MAX_STOP_STRINGS = 64  # stop strings per request, each at most MAX_STOP_CHARS characters
MAX_STOP_CHARS = 256  # 64 x 256 characters: the automaton builds in 0.15 s on 2 cores at load 9 (64 x 1024: 0.9 s)
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
TOKEN_ID_DIGITS = 9  # a logit_bias key: a token id below 10**9, decimal, no sign, no leading zero
TOKEN_ID_PATTERN = rf"^(0|[1-9][0-9]{{0,{TOKEN_ID_DIGITS - 1}}})$"


def check_text(value: str) -> str:
    """Refuses a string that is not valid Unicode: a JSON string may hold a lone UTF-16 surrogate
    (``"\\ud800"``), which no tokenizer can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the text holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}; "
                         "send valid Unicode text") from None
    return value


Text = Annotated[str, AfterValidator(check_text)]  # every string of a request that may reach the tokenizer


def integral(v: object) -> object:
    """JSON Schema's integer: a number with no fraction (``0.0``, ``1e3``) is one; strict pydantic would
    refuse it. Booleans and strings stay refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed", "n", "best_of", "top_k")


def parse_token_id(key: object) -> int:
    """A token id written as a JSON object key: decimal ASCII digits, no sign, no leading zero, at most
    ``TOKEN_ID_DIGITS`` digits. ``str.isdigit`` is not enough: it takes "²" and "①", which ``int``
    refuses, and ``int`` of a 5,000-digit key raises too."""
    if not isinstance(key, str) or not 0 < len(key) <= TOKEN_ID_DIGITS or not key.isascii() or not key.isdigit():
        shown = repr(key) if len(repr(key)) <= 40 else repr(key)[:37] + "..."
        raise ValueError(f"keys are token ids in decimal digits (at most {TOKEN_ID_DIGITS}); got {shown}")
    if len(key) > 1 and key[0] == "0":
        raise ValueError(f"keys are token ids without leading zeros; got {key!r}")
    return int(key)


def _logit_bias(v: object) -> object:
    """Keys parsed by ``parse_token_id``, values numbers in [-100, 100], at most MAX_LOGIT_BIAS entries:
    each refusal says which (pydantic's own wording would name a pattern)."""
    if not isinstance(v, dict):
        return v  # pydantic says it is not an object
    if len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"{len(v)} entries; this server takes at most {MAX_LOGIT_BIAS}")
    for key, bias in v.items():
        parse_token_id(key)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100.0 <= bias <= 100.0:
            raise ValueError(f"logit_bias[{key}]={bias!r} must be a number in [-100, 100]")
    return v


LogitBias = Annotated[
    dict[str, float],
    WithJsonSchema({"type": "object", "maxProperties": MAX_LOGIT_BIAS, "propertyNames": {"pattern": TOKEN_ID_PATTERN},
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                    "description": f"token id (decimal, as a string) -> bias in [-100, 100]; at most {MAX_LOGIT_BIAS} "
                                   "entries; ids at or beyond the vocabulary size get 400"}),
]
StopString = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


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
    draft: DraftPolicy | None = Field(None, description="exact mode: where drafts come from: auto (per step, the "
                                      "source that pays, or none), ngram (prompt lookup), exit (the exit head), "
                                      "none")
    ngram_min: int | None = Field(None, ge=1, le=16, description="exact mode: the shortest suffix the n-gram "
                                  "lookup matches")
    ngram_max: int | None = Field(None, ge=1, le=16, description="exact mode: the longest suffix it matches")

    @field_validator("min_layer", "stride", "patience", "max_draft", "ngram_min", "ngram_max", mode="before")
    @classmethod
    def _integers(cls, v: object) -> object:
        return integral(v)


MAX_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = None


class _Sampling(BaseModel):
    """Every field of OpenAI's request is declared: each one works or is refused with a 400 naming it
    (``Serving.check_supported``); an unknown field is a 400 too, never silently dropped. Strict:
    "stream": "yes" or "max_tokens": true is a 400, not a silent coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: Text | None = Field(None, description="the served name or an alias (another name gets 404)")
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo (prompt scoring); at most the "
                                       "server's ONEJUMP_MAX_NEW_TOKENS (400 beyond)")
    max_completion_tokens: int | None = Field(None, ge=1, description="as max_tokens, which it replaces")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Stop | None = Field(None, description=f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} "
                              "characters; the text ends before the first one generated")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16, description="choices per prompt; with a seed, choice i uses seed + i; prompts "
                       "x n at most the server's ONEJUMP_QUEUE_SIZE (400 beyond)")
    best_of: int | None = Field(None, ge=1, le=16, description="only equal to n (no reranking)")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: LogitBias | None = None
    user: Text | None = Field(None, description="recorded nowhere; accepted for compatibility")
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, description="vLLM: -1 or 0 = all tokens")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens even past EOS")
    early_exit: EarlyExit | None = Field(None, description="onejump's exit settings; levels the model does not have, "
                                         "or a learned gate the artifact lacks, get 400")

    @field_validator(*INT_FIELDS, mode="before")
    @classmethod
    def _integers(cls, v: object) -> object:
        return integral(v)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias(cls, v: object) -> object:
        return _logit_bias(v)

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs."""
        return tuple((parse_token_id(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]

    @property
    def top_n(self) -> int | None:
        """How many top logprobs each token reports; None when logprobs were not asked for."""
        raise NotImplementedError


TokenId = Annotated[int, Field(ge=0)]
PromptText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Prompt = PromptText | TokenIds | Annotated[list[PromptText], Field(min_length=1)] | Annotated[list[TokenIds],
                                                                                          Field(min_length=1)]
PROMPT_FORMS = "a string, a list of token ids, a list of strings or a list of token-id lists"


def _kind(item: object) -> str:
    if isinstance(item, str):
        return "strings"
    if isinstance(integral(item), int) and not isinstance(item, bool):
        return "token ids"
    if isinstance(item, list):
        return "token-id lists"
    return type(item).__name__ if item is not None else "null"


def _check_ids(ids: list[Any], where: str) -> list[int]:
    """The ids as ints (JSON Schema's integers: 5.0 is one), or a ValueError naming the first that is not."""
    out = [integral(t) for t in ids]
    for i, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{where}item {i}: token ids are integers >= 0; got {ids[i]!r}")
    return out  # type: ignore[return-value]


def check_prompt(v: object) -> object:
    """The prompt's form, checked in one place with messages that say which form was meant: a
    non-empty string, or a non-empty list of token ids, of strings or of token-id lists, never mixed."""
    if isinstance(v, str):
        if not v:
            raise ValueError("the prompt must not be empty")
        return check_text(v)
    if not isinstance(v, list) or not v:
        got = "an empty list" if v == [] else _kind(v)
        raise ValueError(f"the prompt must be {PROMPT_FORMS}, not empty; got {got}")
    kinds = {_kind(x) for x in v}
    if len(kinds) > 1:
        raise ValueError(f"a list of prompts must be all token ids, all strings or all token-id lists; this one mixes "
                         f"{' and '.join(sorted(kinds))}")
    (kind,) = kinds
    if kind == "token ids":
        return _check_ids(v, "")
    if kind == "strings":
        for i, text in enumerate(v):
            if not text:
                raise ValueError(f"item {i}: a prompt must not be empty")
            check_text(text)
    elif kind == "token-id lists":
        for i, ids in enumerate(v):
            if not ids:
                raise ValueError(f"item {i}: a prompt must not be empty")
        return [_check_ids(ids, f"item {i}: ") for i, ids in enumerate(v)]
    else:
        raise ValueError(f"the prompt must be {PROMPT_FORMS}; got a list of {kind}")
    return v


class CompletionRequest(_Sampling):
    prompt: Prompt = Field(description=f"{PROMPT_FORMS}; token ids below the vocabulary size; each prompt at most "
                       "ONEJUMP_MAX_PROMPT_TOKENS tokens (400 beyond, or when a text makes no token)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Text | None = Field(None, description="refused unless empty (no fill-in-the-middle)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompts(cls, v: object) -> object:
        return check_prompt(v)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _integer(cls, v: object) -> object:
        return integral(v)

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
    text: Text


class ToolFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Text
    arguments: Text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: Text
    type: Literal["function"] = "function"
    function: ToolFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = Field(None, description="null only in an assistant message with "
                                                  "tool_calls")
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

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
    messages: list[ChatMessage] = Field(min_length=1, description="content may be null only in an assistant message "
                                        "with tool_calls; 400 when the model has no chat template or it cannot "
                                        "render these messages (e.g. roles out of order), or when they render "
                                        "to no token or beyond ONEJUMP_MAX_PROMPT_TOKENS")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="needs logprobs=true")

    @field_validator("top_logprobs", mode="before")
    @classmethod
    def _integer(cls, v: object) -> object:
        return integral(v)
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
    layers_computed: int = Field(description="decoder-layer evaluations after the prompt, catch-up and "
                                 "verification included")
    layers_skipped: int = Field(description="evaluations generated tokens did not run in their own step (exits); "
                                "catch-up may run them later")
    layers_saved: int = Field(0, description="evaluations never run: layers x tokens fed - layers_computed")
    acceptance_rate: float | None = None
    drafted: dict[str, int] | None = Field(None, description="exact mode: drafted tokens by source (ngram, exit)")
    accepted: dict[str, int] | None = Field(None, description="exact mode: drafted tokens the full model kept, by "
                                            "source")
    verifications: int | None = Field(None, description="exact mode: full-depth passes (tokens per pass = "
                                      "tokens / verifications)")


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
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template (exactly one of them)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})

    model: Text | SkipJsonSchema[None] = Field(None, description="the served name or an alias (another name gets "
                                               "404)")
    prompt: Text | SkipJsonSchema[None] = Field(None, description="give prompt or messages, not both")
    messages: list[ChatMessage] | SkipJsonSchema[None] = Field(
        None, description="rendered by the model's chat template; 400 when the model has none or the template "
        "cannot render these messages")
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | SkipJsonSchema[None] = Field(None, description="the served name or an alias (another name gets "
                                               "404)")
    tokens: list[TokenId] = Field(description="token ids below the vocabulary size (400 otherwise)")

    @field_validator("tokens", mode="before")
    @classmethod
    def _integers(cls, v: object) -> object:
        return [integral(t) for t in v] if isinstance(v, list) else v


class DetokenizeResponse(BaseModel):
    prompt: str
