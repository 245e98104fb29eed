"""Incremental detokenization with stop strings: text deltas that never show a partial stop
string or half a UTF-8 character."""

from __future__ import annotations

from typing import Any


class TextAssembler:
    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False
        self.text = ""

    def add(self, token_id: int) -> str:
        """Add one token; returns the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self._flush(len(self.text))
        safe = len(self.text) - self.hold
        if self.text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            safe = min(safe, len(self.text) - 1)
        return self._flush(safe)

    def finish(self) -> str:
        """The rest of the text, once generation is over."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
