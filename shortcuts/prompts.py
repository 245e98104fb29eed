"""Prompts as token ids: a prompt file read in order, or sentences of a corpus shuffled, tokenized and
cut, and the split of a titled corpus by article (so no two splits share an article).

One reader for every command that takes a prompt file (``onejump bench --prompts``, ``agreement
--prompts``, ``calibrate --corpus``). A line is one prompt:

- a plain text line (any file), or in a ``.jsonl`` file
- ``{"text": "..."}``: a completion prompt, tokenized as is;
- ``{"messages": [{"role": "user", "content": "..."}, ...]}``: a chat request, rendered with the
  model's chat template and its generation prompt (``add_generation_prompt=True``), as the server
  renders ``/v1/chat/completions`` (a model without a template: plain "User: ... Assistant:" turns,
  ``plain_chat``). A chat request is never cut (cutting it would cut its template).

Blank lines are skipped. Torch-free: the tokenizer does the work.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from shortcuts.errors import CorpusError

Messages = list[dict[str, str]]
Prompt = str | Messages


def parse_line(line: str, where: str) -> Prompt:
    """One .jsonl line: a text prompt or a chat request; CorpusError naming ``where`` otherwise."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not JSON ({e})") from e
    if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        if not ok:
            raise CorpusError(f"{where}: 'messages' must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"].strip()
    raise CorpusError(f"{where}: every line must be a JSON object with a 'text' string or a 'messages' list")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Every prompt of a file, in order (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path} (a prompt file: text lines or .jsonl)")
    out: list[Prompt] = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        p = parse_line(line, f"{path}:{k}") if path.suffix == ".jsonl" else line.strip()
        if p:
            out.append(p)
    if not out:
        raise CorpusError(f"no prompts in {path}")
    return out


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a text as the tokenizer encodes it; a chat request through the model's
    chat template with its generation prompt, as the server tokenizes it. A model without a chat
    template (a base model, such as the converted Gemma-3-270m) gets the messages as plain turns,
    ``"User: ...\n\nAssistant:"`` (``plain_chat``), which the server does not do (it refuses chat there)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(plain_chat(prompt))["input_ids"])
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def plain_chat(messages: Messages) -> str:
    """Chat turns as text for a model without a template: one "Role: content" paragraph per message,
    then "Assistant:"."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


def read_prompts(lm: Any, path: str | Path, n: int | None = None, max_tokens: int = 64) -> list[list[int]]:
    """The first ``n`` prompts of a file, in order, as token ids; a text keeps its last ``max_tokens``
    tokens, a longer chat request is refused. ``lm``: anything with a ``tokenizer``."""
    out = []
    for prompt in read_prompt_file(path)[: n or None]:
        ids = encode(lm.tokenizer, prompt)
        if len(ids) > max_tokens:
            if not isinstance(prompt, str):
                raise CorpusError(f"{path}: a chat request of {len(ids)} tokens is longer than the {max_tokens} "
                                  "this command takes")
            ids = ids[-max_tokens:]
        if ids:
            out.append(ids)
    return out


def first_usable(lm: Any, texts: list[str] | list[Prompt], n: int, min_tokens: int,
                 max_tokens: int) -> list[list[int]]:
    """The first ``n`` prompts (in order) with at least ``min_tokens`` tokens, texts cut to ``max_tokens``
    (chat requests whole), fewer when the prompts run out."""
    out: list[list[int]] = []
    for prompt in texts:
        ids = encode(lm.tokenizer, prompt)
        if isinstance(prompt, str):
            ids = ids[:max_tokens]
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
    """``n`` prompts of a prompt file (texts or chat requests, see the module docstring), shuffled with
    ``seed``, skipping the first ``offset`` (so calibration and sweep use disjoint slices), tokenized."""
    prompts = read_prompt_file(corpus)
    random.Random(seed).shuffle(prompts)
    out = first_usable(lm, prompts[offset:], n, min_tokens, max_tokens)
    if len(out) == n:
        return out
    raise ValueError(f"{corpus} has only {len(out)} usable prompts after offset {offset}; {n} asked")


def article_split(path: Path, val_every: int = 10) -> tuple[list[str], list[str]]:
    """Sentences of a ``{"text", "title"}`` .jsonl split by article: (fit, validation)."""
    fit: list[str] = []
    val: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        bucket = int(hashlib.sha1(("val:" + row["title"]).encode()).hexdigest(), 16) % val_every
        (val if bucket == 0 else fit).append(row["text"])
    return fit, val
