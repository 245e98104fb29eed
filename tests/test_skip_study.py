"""The layer-skipping study's replay against step-by-step decoding with the same blocks skipped."""

from __future__ import annotations

import pytest
import torch
from support.models import build_tiny, prompt_ids, sharpen

from shortcuts.calibration.table import continuations
from shortcuts.engine.cache import RowCall
from shortcuts.engine.runner import LayerRunner
from shortcuts.lab.skip_study import SkipBench, oracles

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _step_by_step(runner: LayerRunner, prompt: list[int], cont: list[int], skip: set[int]) -> list[int]:
    """Prefill every block, then feed the continuation one token at a time through the blocks not in ``skip``."""
    cache = runner.new_cache(1, len(prompt) + len(cont) + 1)
    h = runner.embed_rows(torch.tensor([prompt]), torch.arange(len(prompt)).unsqueeze(0))
    call = RowCall([0], [0], [len(prompt)], len(prompt), h.device)
    for i in range(runner.num_layers):
        h = runner.block(i, h, call, cache)
    tops = []
    for k, token in enumerate(cont[:-1]):
        pos = len(prompt) + k
        h = runner.embed_rows(torch.tensor([[token]]), torch.tensor([[pos]]))
        call = RowCall([0], [pos], [1], 1, h.device)
        for i in range(runner.num_layers):
            if i in skip:
                cache.lengths[i][0] = pos + 1  # a skipped block holds nothing for this token; nothing reads it
            else:
                h = runner.block(i, h, call, cache)
        tops.append(int(runner.full_logits(h[0, -1]).argmax()))
    return tops


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_skip_table_equals_step_by_step_decoding_with_the_blocks_skipped(arch: str) -> None:
    lm = sharpen(build_tiny(arch))
    runner = LayerRunner(lm)
    base = prompt_ids(lm)
    prompts = [base, base[2:9]]
    conts = continuations(lm, prompts, new_tokens=8)
    bench = SkipBench(runner, prompts, conts)
    assert bool(bench.table(frozenset()).agree.all())
    disagreements = 0
    for skip in ({1}, {0, 2}):
        table = bench.table(frozenset(skip))
        full = [_step_by_step(runner, p, c, set()) for p, c in zip(prompts, conts, strict=True)]
        ours = [_step_by_step(runner, p, c, skip) for p, c in zip(prompts, conts, strict=True)]
        expected = [a == b for f, o in zip(full, ours, strict=True) for a, b in zip(f, o, strict=True)]
        assert table.agree.tolist() == expected
        disagreements += expected.count(False)
    assert disagreements > 0  # the skipped blocks changed something: the comparison can fail


def test_oracles_over_nested_sets() -> None:
    from shortcuts.lab.skip_study import SkipTable

    prompt = torch.tensor([0, 0, 1, 1])
    step = torch.tensor([1, 2, 1, 2])
    tables = [SkipTable(torch.ones(4, dtype=torch.bool), prompt, step),
              SkipTable(torch.tensor([True, True, True, False]), prompt, step),
              SkipTable(torch.tensor([True, True, False, False]), prompt, step)]
    o = oracles(tables, num_layers=10)
    assert o["per_sequence_blocks"] == pytest.approx(1 - (2 + 0) / 2 / 10)  # prompt 0 survives 2 skips, prompt 1 none
    assert o["per_token_blocks"] == pytest.approx(1 - (2 + 2 + 1 + 0) / 4 / 10)
