"""Prompt files, read one way by every command that takes ``--prompts`` (bench, agreement, calibrate).

A line is one prompt:

- a plain text line (any file), or in a ``.jsonl`` file
- ``{"text": "..."}``: a completion prompt, tokenized as is;
- ``{"messages": [{"role": "user", "content": "..."}, ...]}``: a chat request, rendered with the
  model's chat template and its generation prompt (``add_generation_prompt=True``), as a server
  renders ``/v1/chat/completions``; the rendered text holds the template's own special tokens, so it
  is tokenized without adding more.

Blank lines are skipped. Torch-free: the tokenizer does the work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from shortcuts.errors import CorpusError

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


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
        return row["text"]
    raise CorpusError(f"{where}: every line must be a JSON object with a 'text' string or a 'messages' list")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Every prompt of a file, in order (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"prompt file not found: {path}")
    out: list[Prompt] = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            p = parse_line(line, f"{path}:{k}")
            if isinstance(p, str) and not p.strip():
                continue
            out.append(p.strip() if isinstance(p, str) else p)
        else:
            out.append(line.strip())
    if not out:
        raise CorpusError(f"no prompts in {path}")
    return out


def encode(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of a prompt: a text as the tokenizer encodes it, a chat request through the model's
    chat template with its generation prompt."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError("a {\"messages\": ...} prompt needs a model with a chat template; this tokenizer has none")
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_file(tokenizer: Any, path: str | Path, n: int | None = None, max_tokens: int | None = None) -> list[list[int]]:
    """The first ``n`` prompts of a file, encoded; a text longer than ``max_tokens`` keeps its last
    tokens, a longer chat request is refused (cutting it would cut its template)."""
    out = []
    for prompt in read_prompt_file(path)[: n or None]:
        ids = encode(tokenizer, prompt)
        if max_tokens is not None and len(ids) > max_tokens:
            if not isinstance(prompt, str):
                raise CorpusError(f"{path}: a chat request of {len(ids)} tokens is longer than the {max_tokens} "
                                  "this command takes")
            ids = ids[-max_tokens:]
        if ids:
            out.append(ids)
    return out
