"""Prompts: the Wikipedia test sentences (``{"text": ...}`` per line), chat requests (``{"messages": [...]}``
per line, sent to /v1/chat/completions) or a plain file, one prompt a line."""

from __future__ import annotations

import json
import random
from pathlib import Path

from loadtest.records import LoadtestError, Prompt

DEFAULT_PROMPTS = Path(".cache/onejump/data/wiki/test.jsonl")


def _line_text(line: str, path: Path, number: int) -> Prompt:
    if not line.startswith("{"):
        return line
    try:
        row = json.loads(line)
        if "messages" in row:
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]]
            if not messages:
                raise ValueError("no messages")
            return messages
        text = row["text"]
    except (ValueError, KeyError, TypeError):
        raise LoadtestError(f"{path}:{number}: expected a JSON object with a \"text\" field or a \"messages\" "
                            "list") from None
    return str(text).strip()


def load_prompts(path: Path, seed: int) -> list[Prompt]:
    """All non-empty prompts of ``path`` in a seeded random order."""
    if not path.is_file():
        hint = " (run `onejump assets` or pass --prompts)" if path == DEFAULT_PROMPTS else ""
        raise LoadtestError(f"prompts file not found: {path}{hint}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LoadtestError(f"cannot read prompts file {path}: {e}") from None
    texts = [t for n, line in enumerate(lines, 1) if line.strip() and (t := _line_text(line.strip(), path, n))]
    if not texts:
        raise LoadtestError(f"prompts file {path} has no prompts")
    random.Random(seed).shuffle(texts)
    return texts
