"""Prompts as token ids: a prompt file read in order, or sentences of a corpus shuffled, tokenized and
cut, and the split of a titled corpus by article (so no two splits share an article)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from shortcuts.collect import read_corpus


def read_prompts(lm: Any, path: str | Path, n: int | None = None, max_tokens: int = 64) -> list[list[int]]:
    """Prompts from a .jsonl (``{"text": ...}`` per line) or a text file (one prompt per line), in order;
    each keeps its last ``max_tokens`` tokens. ``lm``: anything with a ``tokenizer``."""
    texts = read_corpus(path)[: n or None]
    out = [lm.tokenizer(t)["input_ids"][-max_tokens:] for t in texts]
    return [ids for ids in out if ids]


def first_usable(lm: Any, texts: list[str], n: int, min_tokens: int, max_tokens: int) -> list[list[int]]:
    """The first ``n`` texts (in order) with at least ``min_tokens`` tokens, cut to ``max_tokens``
    (fewer when the texts run out)."""
    out: list[list[int]] = []
    for text in texts:
        ids = lm.tokenizer(text)["input_ids"][:max_tokens]
        if len(ids) >= min_tokens:
            out.append(ids)
        if len(out) == n:
            break
    return out


def tokenize_prompts(lm: Any, texts: list[str], n: int, seed: int, min_tokens: int = 8,
                     max_tokens: int = 32) -> list[list[int]]:
    """``n`` shuffled texts, tokenized and cut to ``max_tokens``; shorter than ``min_tokens`` skipped."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    out = first_usable(lm, texts, n, min_tokens, max_tokens)
    if len(out) < n:
        raise ValueError(f"only {len(out)} usable texts; {n} asked")
    return out


def held_out_prompts(lm: Any, corpus: str | Path, n: int, offset: int = 0, seed: int = 0,
                     min_tokens: int = 8, max_tokens: int = 48) -> list[list[int]]:
    """``n`` sentences of a corpus (.jsonl or .txt, see ``collect.read_corpus``), shuffled with
    ``seed``, skipping the first ``offset`` (so calibration and sweep use disjoint slices), tokenized."""
    texts = read_corpus(corpus)
    random.Random(seed).shuffle(texts)
    out = first_usable(lm, texts[offset:], n, min_tokens, max_tokens)
    if len(out) == n:
        return out
    raise ValueError(f"{corpus} has only {len(out)} usable sentences after offset {offset}; {n} asked")


def article_split(path: Path, val_every: int = 10) -> tuple[list[str], list[str]]:
    """Sentences of a ``{"text", "title"}`` .jsonl split by article: (fit, validation)."""
    fit: list[str] = []
    val: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        bucket = int(hashlib.sha1(("val:" + row["title"]).encode()).hexdigest(), 16) % val_every
        (val if bucket == 0 else fit).append(row["text"])
    return fit, val
