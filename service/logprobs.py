"""Token log-probabilities as vLLM serves them (completions: tokens, token_logprobs, top_logprobs,
text_offset; chat: content[] with top_logprobs), each with the layer whose head decided the token,
so that an early exit's logprobs are not taken for the full model's."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from service.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from shortcuts.engine.api import TokenTrace, TopLogprobs


@functools.lru_cache(maxsize=1 << 16)
def _piece(tokenizer: Any, token: int) -> str:
    """One token's text; cached: a long echo with top logprobs decodes the same ids again and again."""
    return str(tokenizer.decode([token]))


def _top(tokenizer: Any, pairs: Sequence[tuple[int, float]] | None) -> dict[str, float] | None:
    return None if pairs is None else {_piece(tokenizer, t): lp for t, lp in pairs}


def completion_logprobs(tokenizer: Any, traces: Sequence[TokenTrace], prompt_ids: Sequence[int] | None,
                        scores: Sequence[tuple[float, TopLogprobs]] | None, offset: int,
                        num_layers: int) -> CompletionLogprobs:
    """The generated tokens' logprobs (their text starting at character ``offset``), after the echoed
    prompt's when ``prompt_ids`` are given (scored by the full model; the first token has none)."""
    out = CompletionLogprobs()
    pos = 0
    for i, token in enumerate(prompt_ids or ()):
        piece = _piece(tokenizer, token)
        lp, top = scores[i - 1] if scores and i else (None, None)
        out.tokens.append(piece)
        out.token_logprobs.append(lp)
        out.top_logprobs.append(_top(tokenizer, top))
        out.text_offset.append(pos)
        out.exit_layers.append(num_layers if i else None)
        pos += len(piece)
    for t in traces:
        piece = _piece(tokenizer, t.token)
        out.tokens.append(piece)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append(_top(tokenizer, t.top_logprobs))
        out.text_offset.append(offset)
        out.exit_layers.append(t.exit_layer)
        offset += len(piece)
    return out


def chat_logprobs(tokenizer: Any, traces: Sequence[TokenTrace]) -> ChatLogprobs:
    content = []
    for t in traces:
        piece = _piece(tokenizer, t.token)
        tops = [TopLogprob(token=(s := _piece(tokenizer, i)), logprob=lp, bytes=list(s.encode()))
                for i, lp in t.top_logprobs or ()]
        content.append(TokenLogprob(token=piece, logprob=t.logprob if t.logprob is not None else 0.0,
                                    bytes=list(piece.encode()), top_logprobs=tops, exit_layer=t.exit_layer))
    return ChatLogprobs(content=content)
