"""Decode-matched hidden states: the model's own greedy continuations of prompts, every level.

    python -m shortcuts.lab.traces --out runs/exits/smollm2 --fit 512 --val 128 --test 200 --ood 128

Training data that matches decoding. ``collect.collect_states`` keeps one random position of a
Wikipedia sentence; a decoder exits at positions inside its *own* continuation, where the text is
the model's and the states differ. Here each prompt is continued greedily by the full model
(``agreement.continuations``), one forward pass over prompt + continuation keeps, at every decode
step (the state fed token k-1 that predicts token k, k >= 1), the states of every level 0..L
(0 = the embedding, input of block 1; L = the final state before the final norm) as float16.

Splits are by *article*: fit and validation prompts come from disjoint articles of
``train.jsonl`` (one in ``val_every`` articles, by a hash of the title, goes to validation), test
prompts from ``test.jsonl`` (articles never in train), so no split shares an article with another.
The out-of-domain set is Python standard-library docstrings (``docstring_sentences``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM

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
def article_split(path: Path, val_every: int = 10) -> tuple[list[str], list[str]]:
    """Sentences of a ``{"text", "title"}`` .jsonl split by article: (fit, validation)."""
    fit: list[str] = []
    val: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        bucket = int(hashlib.sha1(("val:" + row["title"]).encode()).hexdigest(), 16) % val_every
        (val if bucket == 0 else fit).append(row["text"])
    return fit, val


def docstring_sentences(modules: tuple[str, ...] = OOD_MODULES) -> list[str]:
    """Clean sentences (``assets.is_clean``) from the docstrings of standard-library modules, their
    classes, functions and methods: technical English, a domain the jumps never saw."""
    import importlib
    import inspect
    import warnings

    from shortcuts.assets import is_clean, split_sentences

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


def tokenize_prompts(lm: CausalLM, texts: list[str], n: int, seed: int, min_tokens: int = 8,
                     max_tokens: int = 32) -> list[list[int]]:
    """``n`` shuffled texts, tokenized and cut to ``max_tokens``; shorter than ``min_tokens`` skipped."""
    texts = list(texts)
    random.Random(seed).shuffle(texts)
    out = first_usable(lm, texts, n, min_tokens, max_tokens)
    if len(out) < n:
        raise ValueError(f"only {len(out)} usable texts; {n} asked")
    return out


def first_usable(lm: CausalLM, texts: list[str], n: int, min_tokens: int, max_tokens: int) -> list[list[int]]:
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


def val_test_prompts(lm: CausalLM, val: int, test: int) -> dict[str, list[list[int]]]:
    """Validation prompts (the validation articles of ``train.jsonl``, seed 1) and test prompts
    (``test.jsonl``'s articles, seed 2), as the traces split them: what a calibration chooses on and
    what reports its choice."""
    from shortcuts.assets import wiki_split
    from shortcuts.collect import read_corpus

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


def read_prompts(lm: CausalLM, path: str | Path, n: int | None = None, max_tokens: int = 64) -> list[list[int]]:
    """Prompts from a .jsonl (``{"text": ...}`` per line) or a text file (one prompt per line), in order."""
    from shortcuts.collect import read_corpus

    texts = read_corpus(path)[: n or None]
    out = [lm.tokenizer(t)["input_ids"][-max_tokens:] for t in texts]
    return [ids for ids in out if ids]


# --- traces ------------------------------------------------------------------------------------------
@dataclass
class Traces:
    """States at every decode step of every prompt. states: (N, L+1, d) float16, level 0 = embedding;
    prompt: (N,) prompt index; step: (N,) decode step k (1..K-1) in its prompt's continuation."""

    states: Tensor
    prompt: Tensor
    step: Tensor

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def num_layers(self) -> int:
        return self.states.shape[1] - 1

    def levels(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """Exit-level states (L-1, n, d) float32 of the chosen rows (levels 1..L-1)."""
        return self.states[rows, 1:-1].float().transpose(0, 1)

    def final(self, rows: Tensor | slice = slice(None)) -> Tensor:
        return self.states[rows, -1].float()

    def sample(self, per_prompt: int, seed: int = 0) -> Tensor:
        """Row indices: up to ``per_prompt`` random steps of each prompt."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for p in range(int(self.prompt.max()) + 1):
            idx = torch.nonzero(self.prompt == p).flatten()
            rows.append(idx[torch.randperm(len(idx), generator=g)[:per_prompt]])
        return torch.cat(rows).sort().values

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"states": self.states.contiguous(), "prompt": self.prompt, "step": self.step}, str(path))

    @classmethod
    def load(cls, path: Path) -> Traces:
        t = load_file(str(path))
        return cls(t["states"], t["prompt"], t["step"])


@torch.inference_mode()
def all_levels(lm: CausalLM, ids: list[list[int]]) -> Tensor:
    """(B, T, L+1, d) states of a right-padded batch: the embedding (block 1's input) and each block's output."""
    from shortcuts.collect import block_outputs

    first: list[Tensor] = []

    def grab(_m: object, args: tuple, kwargs: dict) -> None:
        first.append(args[0] if args else kwargs["hidden_states"])

    hook = lm.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        outs = block_outputs(lm, ids)
    finally:
        hook.remove()
    return torch.stack([first[0], *outs], dim=2)


def trace_states(lm: CausalLM, prompts: list[list[int]], conts: list[list[int]], batch_size: int = 16,
                 desc: str = "trace") -> Traces:
    """Every decode step k >= 1 of each continuation: the state at position len(prompt)+k-1."""
    states, prompt_ix, steps = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        ps, cs = prompts[start : start + batch_size], conts[start : start + batch_size]
        out = all_levels(lm, [p + c for p, c in zip(ps, cs, strict=True)])
        for i, (p, c) in enumerate(zip(ps, cs, strict=True)):
            cols = torch.arange(len(p), len(p) + len(c) - 1)
            states.append(out[i, cols].half().cpu())
            prompt_ix.append(torch.full((len(cols),), start + i))
            steps.append(torch.arange(1, len(c)))
    return Traces(torch.cat(states), torch.cat(prompt_ix), torch.cat(steps))


def build(lm: CausalLM, texts: list[str], n: int, new_tokens: int, seed: int, desc: str) -> tuple[Traces, dict]:
    from shortcuts.lab.agreement import continuations

    prompts = tokenize_prompts(lm, texts, n, seed)
    conts = continuations(lm, prompts, new_tokens)
    return trace_states(lm, prompts, conts, desc=desc), {"prompts": prompts, "continuations": conts}


def main(argv: list[str] | None = None) -> None:
    from shortcuts.assets import default_model_dir, wiki_split
    from shortcuts.collect import cached_states, read_corpus, sample_sentences

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
