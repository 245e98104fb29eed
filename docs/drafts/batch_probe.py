"""Where exact mode's time goes in a batch of 8 (SmolLM2, 16 grounded held-out prompts, 48 new tokens): full
depth, exact `auto` x4, fixed n-gram drafts x4 and x2, and exact without drafts, arms interleaved batch by
batch, one thread; prints the decoder's timed step costs first. Run from the repository root:

    PYTHONPATH=$PWD python docs/drafts/batch_probe.py 48
"""

import sys
import time

import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.assets import default_model_dir
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.prompts import read_prompts

torch.set_num_threads(1)
lm = CausalLM.load(default_model_dir())
dec = EarlyExitDecoder(lm, JumpArtifact.load("docs/results/smollm2-135m/jump.safetensors").jump)
print("costs", dec.step_costs.as_dict(), flush=True)
prompts = read_prompts(lm, "evals/workloads/grounded-heldout.jsonl", 16, max_tokens=1500)
bd = dec.batch(8)
arms = {"off": ExitSettings(mode="off"), "auto4": ExitSettings(mode="exact", draft="auto", max_draft=4),
        "ngram4": ExitSettings(mode="exact", draft="ngram", max_draft=4),
        "ngram2": ExitSettings(mode="exact", draft="ngram", max_draft=2),
        "none": ExitSettings(mode="exact", draft="none")}
new_tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 48
seconds = dict.fromkeys(arms, 0.0)
tokens = dict.fromkeys(arms, 0)
passes = dict.fromkeys(arms, 0)
for batch in (prompts[:8], prompts[8:16]):
    for name, exits in arms.items():
        s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=exits)
        t0 = time.perf_counter()
        gens = bd.generate(batch, s)
        seconds[name] += time.perf_counter() - t0
        tokens[name] += sum(len(g.tokens) for g in gens)
        passes[name] += sum(g.stats.verifications for g in gens)
for name in arms:
    rate = tokens[name] / seconds[name]
    print(f"{name}: {rate:.2f} tok/s, {rate / (tokens['off'] / seconds['off']):.3f}x off, {passes[name]} verifications")
