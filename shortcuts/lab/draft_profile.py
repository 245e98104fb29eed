"""The host work drafting adds to a step: a tiny random Llama (so the blocks cost almost nothing and the
host's Python is what is timed), steps of plain full depth against exact mode's auto policy with its
n-gram index, after a short and a 2,000-token prompt, and the drafter alone.

    python -m shortcuts.lab.draft_profile [--json docs/drafts/profile.json]

Prints milliseconds per step of each arm (interleaved, median of repeats) and microseconds of one
``Drafter.plan`` + index update, and of indexing the prompt once.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.drafts import Drafter, NgramIndex, StepCosts
from shortcuts.engine.settings import ExitSettings, GenerationSettings


def tiny_llama(context: int = 4096) -> CausalLM:
    """A 2-layer random Llama (d = 64) whose blocks cost far less than the host work around them."""
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")))
    return CausalLM(model, tok, name="tiny-llama-profile")


def per_step(dec: EarlyExitDecoder, prompt: list[int], settings: GenerationSettings, repeats: int) -> float:
    """Median milliseconds per step of generating from ``prompt``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = dec.generate(prompt, settings)
        times.append((time.perf_counter() - t0) / g.stats.steps)
    return statistics.median(times) * 1e3


def drafter_us(prompt: tuple[int, ...], steps: int = 5000) -> dict[str, float]:
    costs = StepCosts((1, 2, 4, 8, 16, 32, 64), (1.0, 1.01, 1.02, 1.1, 1.4, 2.5, 5.0), (0.2,) * 7, 0.01, 30)
    t0 = time.perf_counter()
    NgramIndex(prompt, 1, 4)
    index_ms = (time.perf_counter() - t0) * 1e3
    d = Drafter(ExitSettings(mode="exact", draft="auto", max_draft=8), prompt, False, costs)
    t0 = time.perf_counter()
    for i in range(steps):
        d.plan(20, {2}, 2000 + i)
        d.append(prompt[i % 500])
    per_step = (time.perf_counter() - t0) / steps
    return {"index_prompt_ms": round(index_ms, 3), "plan_and_update_us": round(per_step * 1e6, 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.draft_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(0)
    dec = EarlyExitDecoder(tiny_llama(), check=False)
    dec.step_costs = StepCosts.flat(dec.num_layers)  # drafts always pay: the drafting path runs every step
    out: dict[str, Any] = {"drafter": drafter_us(tuple(rng.randrange(4, 512) for _ in range(2000)))}
    arms = {"off": ExitSettings(mode="off"), "exact auto": ExitSettings(mode="exact", draft="auto", threshold=1.0),
            "exact none": ExitSettings(mode="exact", draft="none")}
    for length in (50, 2000):
        prompt = [rng.randrange(4, 512) for _ in range(length)]
        row: dict[str, float] = {}
        for name, exits in arms.items():
            s = GenerationSettings(max_new_tokens=64, stop_token_ids=(), exit=exits)
            row[name] = round(per_step(dec, prompt, s, a.repeats), 3)
        out[f"ms_per_step_prompt_{length}"] = row
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
