"""The engine's boundary, as the server sees it: what it may call and what it gets back.

``service`` types its worker against these protocols (mypy checks both sides), so a change to the
engine that would break the server fails type checking, not a request. ``EarlyExitDecoder`` and
``BatchDecoder`` implement them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shortcuts.engine.sampling import TopLogprobs
from shortcuts.engine.sequence import Generation, OnToken
from shortcuts.engine.settings import GenerationSettings


class SequenceHandle(Protocol):
    """One sequence in a running batch."""

    @property
    def done(self) -> bool: ...

    @property
    def generation(self) -> Generation: ...


class Batch(Protocol):
    """A continuous batch: admit, step, cancel."""

    @property
    def free_slots(self) -> int: ...

    def add(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None,
            on_token: OnToken | None = None, *, stop: Callable[[], bool] | None = None, chunk: int = ...) -> Any:
        """Prefill ``chunk`` tokens at a time; ``stop`` (asked between chunks) raises ``Cancelled``."""

    def step(self) -> Sequence[Any]: ...

    def cancel(self, seq: Any) -> None: ...

    def kv_usage(self) -> float: ...


class Engine(Protocol):
    """A loaded model with its exit head, ready to decode."""

    @property
    def num_layers(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...

    def batch(self, max_batch_size: int) -> Batch: ...

    def check_settings(self, settings: GenerationSettings) -> None: ...

    def score(self, prompt_ids: list[int], top_n: int = 0, stop: Callable[[], bool] | None = None,
              chunk: int = ...) -> list[tuple[float, TopLogprobs]]:
        """Prompt logprobs, ``chunk`` tokens a pass; ``stop`` (asked between chunks) raises ``Cancelled``."""
