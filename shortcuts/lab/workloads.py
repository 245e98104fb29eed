"""Writes the workload set of ``evals/workloads/``: chat requests grounded in a text they carry, and open
generation, from text the project may ship (see ``evals/workloads/README.md``), deterministic (seeded).

    python -m shortcuts.lab.workloads            # rewrites evals/workloads/*.jsonl

Grounded requests (a passage or a function, then what to do with it):

- Wikipedia summaries (``.cache/onejump/data/summaries_en-us.json``, CC BY-SA 4.0, `onejump assets`):
  summarise, quote a sentence, answer "what is X" from the paragraph, rewrite as a list of facts;
- this project's own functions (``shortcuts/``, Apache-2.0): rename a variable, add the type hints
  (removed here), add a docstring (removed here).

Open generation: a story, a poem or an explanation of a topic with no text to copy, and plain
continuations of a Wikipedia sentence (``{"text": ...}``).

Splits never share a source: ``heldout`` takes the articles of the held-out Wikipedia split
(``wiki/test.jsonl``'s titles) and the modules whose name hashes into the held-out bucket; ``tune``
the rest. Tune draft policies on ``tune`` only; ``heldout`` reports.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import re
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "evals" / "workloads"
WIKI = Path(".cache/onejump/data/summaries_en-us.json")
TEST_TITLES = Path(".cache/onejump/data/wiki/test.jsonl")
CODE = ROOT / "shortcuts"
NEW_NAMES = ("value", "item", "result", "total", "count", "entry", "data", "current")
TOPICS = ("a lighthouse keeper", "a lost key", "the first day of spring", "a robot learning to cook", "a storm at sea",
          "an old library", "a journey by train", "a city at night", "a garden", "a letter never sent")


def chat(content: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


# --- grounded: Wikipedia ---------------------------------------------------------------------------------
def wiki_requests(article: dict[str, str], rng: random.Random) -> dict[str, Any]:
    title, text = article["title"], article["extract"].strip()
    sents = sentences(text)
    kind = rng.choice(("summarise", "quote", "what_is", "facts"))
    if kind == "summarise":
        task = f"{text}\n\nSummarise this passage in two sentences."
    elif kind == "quote":
        k = rng.randrange(len(sents))
        task = (f"{text}\n\nQuote sentence number {k + 1} of this passage exactly, then say in one sentence why it "
                "matters.")
    elif kind == "what_is":
        task = f"Read the paragraph and answer with its own words.\n\nParagraph: {text}\n\nQuestion: What is {title}?"
    else:
        task = f"{text}\n\nRewrite this passage as a bulleted list of its facts."
    return {**chat(task), "kind": f"wiki_{kind}", "source": f"wikipedia:{title}"}


# --- grounded: this project's functions --------------------------------------------------------------------
def functions(path: Path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and 8 <= (node.end_lineno or 0) - node.lineno + 1 <= 35:
            out.append(node)
    return out


def local_names(fn: ast.FunctionDef) -> list[str]:
    """Names assigned in the function (or its parameters), longer than two letters, not dunder."""
    names = {a.arg for a in fn.args.args + fn.args.kwonlyargs if a.arg not in ("self", "cls")}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return sorted(n for n in names if len(n) > 2 and not n.startswith("_"))


def without_hints(fn: ast.FunctionDef) -> str:
    fn = ast.parse(ast.unparse(fn)).body[0]  # type: ignore[assignment]
    for a in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs:
        a.annotation = None
    for extra in (fn.args.vararg, fn.args.kwarg):
        if extra is not None:
            extra.annotation = None
    fn.returns = None
    return ast.unparse(fn)


def without_docstring(fn: ast.FunctionDef) -> str | None:
    fn = ast.parse(ast.unparse(fn)).body[0]  # type: ignore[assignment]
    if not (fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)):
        return None
    fn.body = fn.body[1:] or [ast.Pass()]
    return ast.unparse(fn)


def code_request(path: Path, fn: ast.FunctionDef, rng: random.Random) -> dict[str, Any] | None:
    segment = ast.get_source_segment(path.read_text(encoding="utf-8"), fn, padded=True)
    source = textwrap.dedent(segment or ast.unparse(fn))  # as written (comments kept) where it is renamed
    kind = rng.choice(("rename", "type_hints", "docstring"))
    if kind == "rename":
        names = local_names(fn)
        if not names:
            return None
        old = rng.choice(names)
        new = rng.choice([n for n in NEW_NAMES if n not in names])
        task = (f"Rename the variable `{old}` to `{new}` in this Python function. Reply with the whole function.\n\n"
                f"```python\n{source}\n```")
    elif kind == "type_hints":
        task = ("Add type hints to this Python function. Reply with the whole function.\n\n"
                f"```python\n{without_hints(fn)}\n```")
    else:
        bare = without_docstring(fn)
        if bare is None:
            return None
        task = f"Add a docstring to this Python function. Reply with the whole function.\n\n```python\n{bare}\n```"
    rel = path.relative_to(ROOT)
    return {**chat(task), "kind": f"code_{kind}", "source": f"onejump:{rel}:{fn.name}"}


# --- open generation -------------------------------------------------------------------------------------
def open_request(article: dict[str, str], rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(("story", "poem", "explain", "continue"))
    title = article["title"]
    if kind == "story":
        return {**chat(f"Write a short story about {rng.choice(TOPICS)}."), "kind": "open_story", "source": "-"}
    if kind == "poem":
        return {**chat(f"Write a poem about {title}."), "kind": "open_poem", "source": f"wikipedia-title:{title}"}
    if kind == "explain":
        return {**chat(f"Explain {title} to a ten-year-old."), "kind": "open_explain",
                "source": f"wikipedia-title:{title}"}
    return {"text": sentences(article["extract"])[0], "kind": "open_continue", "source": f"wikipedia:{title}"}


# --- splits ----------------------------------------------------------------------------------------------
def heldout_module(path: Path) -> bool:
    return int(hashlib.sha1(str(path.relative_to(ROOT)).encode()).hexdigest(), 16) % 3 == 0


def build(n_grounded: int, n_open: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    articles = [a for a in json.loads(WIKI.read_text(encoding="utf-8")).values()
                if 60 <= len(a["extract"].split()) <= 150]
    test = {json.loads(ln)["title"] for ln in TEST_TITLES.read_text(encoding="utf-8").splitlines()}
    modules = sorted(p for p in CODE.rglob("*.py") if "lab" not in p.parts)
    out: dict[str, list[dict[str, Any]]] = {}
    for split in ("tune", "heldout"):
        rng = random.Random(f"{seed}:{split}")
        held = split == "heldout"
        pool = sorted((a for a in articles if (a["title"] in test) == held), key=lambda a: a["title"])
        rng.shuffle(pool)
        fns = [(p, f) for p in modules if heldout_module(p) == held for f in functions(p)]
        rng.shuffle(fns)
        n_code = n_grounded // 3
        code = [r for r in (code_request(p, f, rng) for p, f in fns) if r is not None][:n_code]
        wiki = [wiki_requests(a, rng) for a in pool[: n_grounded - len(code)]]
        grounded = wiki + code
        rng.shuffle(grounded)
        out[f"grounded-{split}"] = grounded
        out[f"open-{split}"] = [open_request(a, rng) for a in pool[n_grounded : n_grounded + n_open]]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.workloads", description=__doc__.split("\n\n")[0])
    p.add_argument("--grounded", type=int, default=36, help="grounded requests per split")
    p.add_argument("--open", type=int, default=24, help="open-generation prompts per split")
    p.add_argument("--seed", type=int, default=19)
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build(a.grounded, a.open, a.seed).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
        print(f"{name}: {len(rows)} prompts ({', '.join(sorted({r['kind'] for r in rows}))})")


if __name__ == "__main__":
    main()
