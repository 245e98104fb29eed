"""Decode-matched hidden states: the model's own greedy continuations of prompts, every level.

    python -m shortcuts.lab.traces --out runs/exits/smollm2 --fit 512 --val 128 --test 200 --ood 128

Training data that matches decoding. ``collect.collect_states`` keeps one random position of a
Wikipedia sentence; a decoder exits at positions inside its *own* continuation, where the text is
the model's and the states differ. Here each prompt is continued greedily by the full model
(``calibration.table.continuations``), one forward pass over prompt + continuation keeps, at every decode
step (the state fed token k-1 that predicts token k, k >= 1), the states of every level 0..L
(0 = the embedding, input of block 1; L = the final state before the final norm) as float16.

Splits are by *article*: fit and validation prompts come from disjoint articles of
``train.jsonl`` (one in ``val_every`` articles, by a hash of the title, goes to validation), test
prompts from ``test.jsonl`` (articles never in train), so no split shares an article with another.
The out-of-domain set is Python standard-library docstrings (``docstring_sentences``).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
import warnings
from pathlib import Path

import torch

from shortcuts.adapter import CausalLM
from shortcuts.assets import default_model_dir, is_clean, split_sentences, wiki_split
from shortcuts.calibration.traces import Traces, decode_traces, trace_states
from shortcuts.collect import cached_states, read_corpus, sample_sentences
from shortcuts.prompts import article_split, tokenize_prompts

__all__ = ["Traces", "build", "docstring_sentences", "trace_states", "val_test_prompts"]

OOD_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "hashlib",
    "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "inspect", "io", "ipaddress",
    "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes", "multiprocessing", "netrc",
    "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shlex", "shutil", "signal",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zoneinfo",
)


# --- prompts ---------------------------------------------------------------------------------------
def docstring_sentences(modules: tuple[str, ...] = OOD_MODULES) -> list[str]:
    """Clean sentences (``assets.is_clean``) from the docstrings of standard-library modules, their
    classes, functions and methods: technical English, a domain the jumps never saw."""
    seen: set[str] = set()
    out: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            objs = [mod, *[v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v)]]
            objs += [m for c in objs if inspect.isclass(c) for _, m in inspect.getmembers(c, inspect.isfunction)]
            for obj in objs:
                doc = inspect.getdoc(obj) or ""
                for para in doc.split("\n\n"):
                    for s in split_sentences(para):
                        if is_clean(s) and s not in seen:
                            seen.add(s)
                            out.append(s)
    return out


def val_test_prompts(lm: CausalLM, val: int, test: int) -> dict[str, list[list[int]]]:
    """Validation prompts (the validation articles of ``train.jsonl``, seed 1) and test prompts
    (``test.jsonl``'s articles, seed 2), as the traces split them: what a calibration chooses on and
    what reports its choice."""
    _, val_texts = article_split(wiki_split("train"))
    return {"val": tokenize_prompts(lm, val_texts, val, seed=1),
            "test": tokenize_prompts(lm, read_corpus(wiki_split("test")), test, seed=2)}


def split_args(p: argparse.ArgumentParser, val: int, test: int = 100, new_tokens: int = 24) -> None:
    """The arguments of a study over ``val_test_prompts``: sizes, new tokens, threads."""
    p.add_argument("--val", type=int, default=val)
    p.add_argument("--test", type=int, default=test)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--threads", type=int, default=1)


def parse_study(p: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path]:
    """Parse, set torch's threads, make the ``--out`` folder."""
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    return a, out


# --- traces (``shortcuts.calibration.traces``) ---------------------------------------------------------------
def build(lm: CausalLM, texts: list[str], n: int, new_tokens: int, seed: int, desc: str) -> tuple[Traces, dict]:
    prompts = tokenize_prompts(lm, texts, n, seed)
    traces, conts = decode_traces(lm, prompts, new_tokens, desc=desc)
    return traces, {"prompts": prompts, "continuations": conts}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.traces", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--out", required=True)
    for name, default in (("fit", 512), ("val", 128), ("test", 200), ("ood", 128), ("new_tokens", 24),
                          ("sentences", 2048), ("threads", 1)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = CausalLM.load(a.model)
    fit_texts, val_texts = article_split(wiki_split("train"))
    test_texts, ood_texts = read_corpus(wiki_split("test")), docstring_sentences()
    (out / "docstrings.txt").write_text("\n".join(ood_texts) + "\n")
    meta = {"model": a.model, "new_tokens": a.new_tokens, "sizes": {}, "timing_s": {}}
    for name, texts, n, seed in (("fit", fit_texts, a.fit, 0), ("val", val_texts, a.val, 1),
                                 ("test", test_texts, a.test, 2), ("ood", ood_texts, a.ood, 3)):
        t0 = time.perf_counter()
        traces, ids = build(lm, texts, n, a.new_tokens, seed, desc=name)
        traces.save(out / f"traces-{name}.safetensors")
        (out / f"prompts-{name}.json").write_text(json.dumps(ids))
        meta["sizes"][name] = {"prompts": n, "rows": len(traces)}
        meta["timing_s"][name] = round(time.perf_counter() - t0, 1)
    for name, texts, n, seed in (("fit", fit_texts, a.sentences, 10), ("test", test_texts, a.sentences // 2, 12),
                                 ("ood", ood_texts, min(a.sentences // 2, len(ood_texts)), 13)):
        cached_states(lm, sample_sentences(texts, n, seed), out, seed=seed, desc=f"sentences {name}").save(
            out / f"sentences-{name}.safetensors")
    (out / "traces.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
