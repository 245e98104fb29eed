"""Sentences in, hidden states out: every exit level and the final state at one random token
position per sentence, as in N-NJTC. States are cached on disk (float16 safetensors)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.errors import CorpusError


def read_corpus(path: str | Path) -> list[str]:
    """Sentences from a .jsonl file (one {"text": ...} per line) or a text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"corpus not found: {path} (run `onejump assets` for the Wikipedia sentences)")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        try:
            texts = [str(json.loads(ln)["text"]) for ln in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorpusError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from e
    else:
        texts = lines
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise CorpusError(f"corpus is empty: {path}")
    return texts


def sample_sentences(texts: list[str], n: int, seed: int) -> list[str]:
    if n <= 0:
        raise ValueError(f"the number of sentences must be positive; got {n=}")
    if n > len(texts):
        raise CorpusError(f"asked for {n} sentences but the corpus has only {len(texts)}")
    return random.Random(seed).sample(texts, n)


@dataclass
class StateSet:
    """Hidden states at one position per sentence. levels: (N, L-1, d) after blocks 1..L-1;
    final: (N, d) after block L, before the final norm."""

    levels: Tensor
    final: Tensor

    def __post_init__(self) -> None:
        if self.levels.shape[0] != self.final.shape[0] or self.levels.shape[-1] != self.final.shape[-1]:
            raise ValueError(f"shapes disagree: {tuple(self.levels.shape)=} {tuple(self.final.shape)=}")

    def __len__(self) -> int:
        return self.final.shape[0]

    @property
    def num_levels(self) -> int:
        return self.levels.shape[1]

    def by_level(self) -> Tensor:
        """(L-1, N, d): the layout jump banks take."""
        return self.levels.transpose(0, 1)

    def split(self, n_first: int) -> tuple[StateSet, StateSet]:
        return (StateSet(self.levels[:n_first], self.final[:n_first]),
                StateSet(self.levels[n_first:], self.final[n_first:]))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"levels": self.levels.half().contiguous(), "final": self.final.half().contiguous()}, str(path))

    @classmethod
    def load(cls, path: Path) -> StateSet:
        t = load_file(str(path))
        return cls(t["levels"].float(), t["final"].float())


def _positions(lengths: list[int], rng: random.Random, skip_first: int) -> list[int]:
    """One random position per sequence, after the first ``skip_first`` tokens when possible."""
    return [rng.randrange(min(skip_first, n - 1), n) for n in lengths]


def _layer_output(output: object) -> Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


@torch.inference_mode()
def block_outputs(lm: CausalLM, ids: list[list[int]]) -> list[Tensor]:
    """Each block's output (B, T, d) for a right-padded batch (padding sits after every real token,
    so a causal model's states at real positions do not see it)."""
    width = max(len(x) for x in ids)
    pad = lm.tokenizer.pad_token_id or 0
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=lm.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=lm.device)
    kept: list[Tensor] = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: kept.append(_layer_output(out))) for layer in lm.layers]
    try:
        lm.model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return kept


def _states_for_batch(lm: CausalLM, ids: list[list[int]], positions: list[int]) -> tuple[Tensor, Tensor]:
    """Run one right-padded batch, keep each sequence's states at its position."""
    rows, cols = torch.arange(len(ids), device=lm.device), torch.tensor(positions, device=lm.device)
    stacked = torch.stack([out[rows, cols].float() for out in block_outputs(lm, ids)], dim=1).cpu()  # (B, L, d)
    return stacked[:, :-1], stacked[:, -1]


def collect_states(lm: CausalLM, sentences: list[str], seed: int = 0, max_tokens: int = 64,
                   batch_size: int = 16, skip_first: int = 1, desc: str = "collect") -> StateSet:
    """States at one random position of each sentence (truncated there: the model is causal)."""
    rng = random.Random(seed)
    encoded = [lm.tokenizer(s, add_special_tokens=True)["input_ids"][:max_tokens] for s in sentences]
    encoded = [x for x in encoded if len(x) >= 2]
    if not encoded:
        raise CorpusError("no sentence has two or more tokens")
    positions = _positions([len(x) for x in encoded], rng, skip_first)
    truncated = [x[: p + 1] for x, p in zip(encoded, positions, strict=True)]
    order = sorted(range(len(truncated)), key=lambda i: len(truncated[i]))  # little padding
    levels, final = [], []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start : start + batch_size]
        lv, fn = _states_for_batch(lm, [truncated[i] for i in idx], [positions[i] for i in idx])
        levels.append(lv)
        final.append(fn)
    inverse = torch.argsort(torch.tensor(order))  # back to sentence order
    return StateSet(torch.cat(levels)[inverse], torch.cat(final)[inverse])


def cached_states(lm: CausalLM, sentences: list[str], cache_dir: Path | None, **kwargs: object) -> StateSet:
    """``collect_states`` with a disk cache keyed by the model, the sentences and the settings."""
    if cache_dir is None:
        return collect_states(lm, sentences, **kwargs)  # type: ignore[arg-type]
    key = json.dumps([lm.fingerprint(), sentences, sorted(kwargs.items(), key=str)], sort_keys=True, default=str)
    path = cache_dir / "states" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
    if path.exists():
        return StateSet.load(path)
    collect_states(lm, sentences, **kwargs).save(path)  # type: ignore[arg-type]
    return StateSet.load(path)  # the float16 round trip, so a cache hit gives the same numbers
