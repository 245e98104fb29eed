"""The engine's boundary, as the server sees it: what it may call and what it gets back.

``service`` types its worker against these protocols (mypy checks both sides), so a change to the
engine that would break the server fails type checking, not a request. ``EarlyExitDecoder`` and
``BatchDecoder`` implement them.

A sequence is added to a batch (``Batch.add`` returns its handle, a ``SequenceRun``); its tokens and its
finish arrive by one route, the ``SequenceOutput``s that ``Batch.step`` returns; ``Batch.cancel``
stops it (then nothing more of it is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from shortcuts.engine.sampling import TopLogprobs
from shortcuts.engine.sequence import FinishReason, Generation, SequenceOutput, SequenceRun, TokenTrace
from shortcuts.engine.settings import GenerationSettings

SequenceHandle = SequenceRun

__all__ = ["Batch", "Engine", "FinishReason", "Generation", "SequenceHandle", "SequenceOutput", "TokenTrace",
           "TopLogprobs"]


class Batch(Protocol):
    """A continuous batch: admit, step, cancel."""

    @property
    def free_slots(self) -> int: ...

    def add(self, prompt_ids: Sequence[int], settings: GenerationSettings | None = None, *,
            stop: Callable[[], bool] | None = None, chunk: int = ...) -> SequenceHandle:
        """Prefill ``chunk`` tokens at a time; ``stop`` (asked between chunks) raises ``Cancelled``."""

    def step(self) -> list[SequenceOutput]: ...

    def cancel(self, seq: SequenceHandle) -> None: ...

    def kv_usage(self) -> float: ...


class Engine(Protocol):
    """A loaded model with its exit head, ready to decode."""

    @property
    def num_layers(self) -> int: ...

    @property
    def context_length(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...  # the model's Hugging Face tokenizer

    def batch(self, max_batch_size: int) -> Batch: ...

    def check_settings(self, settings: GenerationSettings) -> None: ...

    def score(self, prompt_ids: list[int], top_n: int = 0, stop: Callable[[], bool] | None = None,
              chunk: int = ...) -> list[tuple[float, TopLogprobs]]:
        """Prompt logprobs, ``chunk`` tokens a pass; ``stop`` (asked between chunks) raises ``Cancelled``."""

    def weights_report(self) -> dict[str, Any]: ...  # the weight format, its size, the load-time self-check
