"""Old (per-entry Python loop, as on main before issue 22) vs new (one dense row, prepared per request) logit_bias,
on one (V,) row of SmolLM2's vocabulary size; arms interleaved in one run, one thread."""
import statistics
import time

import torch

from shortcuts.engine.sampling import Processors
from shortcuts.engine.settings import GenerationSettings

torch.set_num_threads(1)
V = 49152
def old(logits, s, prompt, output):
    logits = logits.float().clone()
    for token, bias in s.logit_bias:
        if token < V:
            logits[token] += bias
    return logits
g = torch.Generator().manual_seed(0)
row = torch.randn(V, generator=g)
for n in (16, 1024):
    s = GenerationSettings(logit_bias=tuple((i * 37 % V, 1.0) for i in range(n)))
    new = Processors(s, [])
    assert torch.allclose(old(row, s, [], []), new(row, []))
    t_old, t_new = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        old(row, s, [], [])
        t_old.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new(row, [])
        t_new.append(time.perf_counter() - t0)
    mo, mn = statistics.median(t_old), statistics.median(t_new)
    print(f"{n} entries: old {mo*1e3:.3f} ms, new {mn*1e3:.3f} ms per head call, ratio old/new {mo/mn:.1f}x")
