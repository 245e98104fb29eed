"""Incremental detokenization with stop strings: text deltas that never show a partial stop
string or half a UTF-8 character.

The stop strings of a request are compiled once into an Aho-Corasick automaton (``StopMatcher``)
that every choice of the request shares; each choice feeds it only the characters that are new
since its last token. A token therefore costs its own characters, whatever the number of stop
strings: no stop string is searched again in the text already seen. What is held back from a
stream is exactly the partial match in progress (the automaton's depth), not the longest stop
string's length."""

from __future__ import annotations

from collections import deque
from typing import Any


class StopMatcher:
    """An Aho-Corasick automaton over characters: ``goto`` edges, ``fail`` links, and for every state
    the length of the longest stop string that ends there (``longest``, 0 for none)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.longest = [0]
        for s in self.stops:
            self._insert(s)
        self.fail = [0] * len(self.goto)
        self._link()
        self.max_len = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _insert(self, s: str) -> None:
        node = 0
        for ch in s:
            nxt = self.goto[node].get(ch)
            if nxt is None:
                nxt = len(self.goto)
                self.goto[node][ch] = nxt
                self.goto.append({})
                self.depth.append(self.depth[node] + 1)
                self.longest.append(0)
            node = nxt
        self.longest[node] = len(s)

    def _link(self) -> None:
        """Breadth first: a state's fail link is the longest proper suffix that is also a prefix."""
        todo = deque(self.goto[0].values())
        while todo:
            node = todo.popleft()
            for ch, child in self.goto[node].items():
                f = self.fail[node]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[child] = self.goto[f].get(ch, 0) if self.goto[f].get(ch, 0) != child else 0
                self.longest[child] = max(self.longest[child], self.longest[self.fail[child]])
                todo.append(child)

    def step(self, state: int, ch: str) -> int:
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)

    def feed(self, state: int, text: str, start: int, end: int) -> tuple[int, int | None]:
        """Feed ``text[start:end]`` from ``state``; the new state and the earliest start of a stop
        string that ends in those characters (None when none does)."""
        first: int | None = None
        for i in range(start, end):
            state = self.step(state, text[i])
            n = self.longest[state]
            if n and (first is None or i + 1 - n < first):
                first = i + 1 - n
        return state, first


class TextAssembler:
    """One choice's text: decoded from its token ids, cut before the first stop string."""

    def __init__(self, tokenizer: Any, stops: list[str] | StopMatcher):
        self.tokenizer = tokenizer
        self.matcher = stops if isinstance(stops, StopMatcher) else StopMatcher(stops)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False
        self.text = ""
        self._state = 0  # the automaton's state after text[:_fed]
        self._fed = 0

    def add(self, token_id: int) -> str:
        """Add one token; returns the new text that is safe to show (maybe empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        stable = len(text) - 1 if text.endswith("\ufffd") else len(text)  # a multi-byte character is incomplete
        if self.matcher and text[: self._fed] != self.text[: self._fed]:
            self._refeed(text)  # the decoder rewrote earlier text (e.g. cleaned-up spaces)
        self.text = text
        if not self.matcher:
            return self._flush(stable)
        if stable > self._fed:
            self._state, cut = self.matcher.feed(self._state, text, self._fed, stable)
            self._fed = stable
            if cut is not None:
                self.text, self.stopped = text[:cut], True
                return self._flush(cut)
        return self._flush(min(stable, self._fed - self.matcher.depth[self._state]))

    def _refeed(self, text: str) -> None:
        """The state for ``text[:_fed]``: only the last ``max_len - 1`` characters decide it."""
        same = 0
        while same < self._fed and same < len(text) and text[same] == self.text[same]:
            same += 1
        start = max(0, same - self.matcher.max_len)
        self._state, _ = self.matcher.feed(0, text, start, same)
        self._fed = same

    def finish(self) -> str:
        """The rest of the text, once generation is over."""
        return self._flush(len(self.text))

    def _flush(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta
