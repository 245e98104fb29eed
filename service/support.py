"""OpenAI request fields this server declares but cannot honour: each one is refused with a 400
that names it unless its value asks for nothing (an empty tool list, ``response_format`` text, ...).
Nothing a client sends is silently dropped: unknown fields are refused by the request models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service.errors import BadRequestError
from service.protocol import ChatCompletionRequest, CompletionRequest


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


# field -> (whether the value asks for nothing, why it is refused otherwise)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "suffix": (_empty, "suffix (fill-in-the-middle) is not supported"),
    "tools": (_empty, "tools (function calling) are not supported: this server has no tool-call parser"),
    "functions": (_empty, "functions (function calling) are not supported"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "tool_choice other than 'none' or 'auto' is not "
                    "supported: no tools can be called"),
    "function_call": (lambda v: v in (None, "none", "auto"), "function_call is not supported"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "response_format other than {'type': 'text'} is not supported (no constrained decoding)"),
    "modalities": (lambda v: v is None or v == ["text"], "modalities other than ['text'] are not supported"),
    "audio": (_empty, "audio output is not supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "web_search_options": (_empty, "web search is not supported"),
    "reasoning_effort": (_empty, "reasoning_effort is not supported (not a reasoning model)"),
    "verbosity": (_empty, "verbosity is not supported"),
    "store": (lambda v: not v, "store=true is not supported: nothing is stored"),
    "metadata": (_empty, "metadata is only for stored completions (store), which are not supported"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "service_tier other than 'auto' or 'default' "
                     "is not supported"),
}


def check_supported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """400 naming the first field whose value this server cannot honour."""
    for name, (fine, why) in REFUSED.items():
        if name in req.model_fields_set and not fine(getattr(req, name)):
            raise BadRequestError(f"{name}: {why}", name)
    if req.best_of is not None and req.best_of != req.n:
        raise BadRequestError(f"best_of: best_of={req.best_of} > n={req.n} is not supported (no reranking); "
                              "give best_of equal to n or leave it out", "best_of")
    if isinstance(req, ChatCompletionRequest) and req.top_logprobs is not None and not req.logprobs:
        raise BadRequestError("top_logprobs needs logprobs=true", "top_logprobs")
