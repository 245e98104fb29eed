"""Writes the two small lm-evaluation-harness tasks of evals/wiki/ from the held-out Wikipedia
sentences (``.cache/onejump/data/wiki/test.jsonl``, `onejump assets`):

- ``onejump_wiki_lastword`` (loglikelihood, multiple choice): a sentence without its last word; the
  choices are that word and three last words of other sentences; accuracy.
- ``onejump_wiki_continue`` (generate_until): the first half of a sentence; the target is its next
  four words; exact match on the first four words generated.

``python evals/build_wiki_tasks.py [--n 100]`` rewrites ``evals/wiki/*.jsonl`` (deterministic)."""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent / "wiki"
SOURCE = Path(".cache/onejump/data/wiki/test.jsonl")
WORD = re.compile(r"^[A-Za-z]+$")


def sentences(path: Path) -> list[list[str]]:
    out = []
    for line in path.read_text().splitlines():
        words = json.loads(line)["text"].rstrip(".").split()
        if 8 <= len(words) <= 30 and WORD.match(words[-1]) and WORD.match(words[len(words) // 2]):
            out.append(words)
    return out


def build(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    pool = sentences(SOURCE)
    rng.shuffle(pool)
    last = pool[:n]
    words = sorted({s[-1] for s in pool})
    lastword = []
    for s in last:
        others = rng.sample([w for w in words if w != s[-1]], 3)
        choices = [s[-1], *others]
        rng.shuffle(choices)
        lastword.append({"context": " ".join(s[:-1]), "choices": choices, "label": choices.index(s[-1])})
    cont = [{"context": " ".join(s[: len(s) // 2]), "target": " ".join(s[len(s) // 2 : len(s) // 2 + 4])}
            for s in pool[n : 2 * n]]
    return lastword, cont


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    for name, rows in zip(("lastword", "continue"), build(args.n), strict=True):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
