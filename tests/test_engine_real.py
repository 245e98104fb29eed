"""The early-exit engine on the real SmolLM2-135M-Instruct (30 layers): the layer runner and
every decoding mode against Hugging Face."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import LowRankJumps

pytestmark = [pytest.mark.real, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]
PROMPT = "The capital of France is Paris. The capital of Germany is"
ARTIFACT = Path(__file__).resolve().parents[1] / "docs" / "results" / "smollm2-135m" / "jump-pure-mse.safetensors"


@pytest.fixture(scope="module")
def hf_greedy(smollm2: CausalLM) -> tuple[list[int], list[int]]:
    ids = smollm2.tokenizer(PROMPT).input_ids
    with torch.no_grad():
        out = smollm2.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, max_new_tokens=20)
    return ids, out[0, len(ids):].tolist()


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to fp32 rounding: oneDNN's packed products sum in another order than nn.Linear's, so
    the difference is measured against the logits' scale (1e-5 of it, ~3e-4 here), not absolutely."""
    return float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


def test_real_runner_reproduces_hf_logits(smollm2: CausalLM) -> None:
    ids = torch.tensor([smollm2.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        ref = smollm2.model(ids).logits
    runner = LayerRunner(smollm2)
    assert _close(runner.forward(ids, runner.new_cache()), ref)
    cache = runner.new_cache()
    steps = [runner.forward(ids[:, :5], cache)] + [runner.forward(ids[:, t : t + 1], cache) for t in range(5, 12)]
    assert _close(torch.cat(steps, dim=1), ref)


def test_real_mode_off_matches_hf_generate(smollm2: CausalLM, hf_greedy: tuple[list[int], list[int]]) -> None:
    ids, ref = hf_greedy
    gen = EarlyExitDecoder(smollm2).generate(ids, GenerationSettings(max_new_tokens=20, exit=ExitSettings(mode="off")))
    assert gen.tokens == ref
    assert smollm2.tokenizer.decode(gen.tokens).strip().startswith("Berlin")


def test_real_exact_mode_with_the_logit_lens_equals_hf(smollm2: CausalLM,
                                                      hf_greedy: tuple[list[int], list[int]]) -> None:
    """Exact mode stays lossless even with a poor drafter (the identity shortcut)."""
    ids, ref = hf_greedy
    dec = EarlyExitDecoder(smollm2)
    drafted = rejected = 0
    for threshold, min_layer in ((0.5, 15), (0.9, 20)):
        s = GenerationSettings(max_new_tokens=20, exit=ExitSettings(mode="exact", threshold=threshold,
                                                                    min_layer=min_layer))
        gen = dec.generate(ids, s)
        assert gen.tokens == ref, threshold
        drafted += gen.stats.drafted
        rejected += gen.stats.drafted - gen.stats.accepted
    assert 0 < rejected < drafted


@pytest.fixture(scope="module")
def trained_jump(smollm2: CausalLM) -> LowRankJumps:
    if not ARTIFACT.is_file():
        pytest.fail(f"the committed SmolLM2 jump is missing at {ARTIFACT}")
    artifact = JumpArtifact.load(ARTIFACT)
    artifact.check_model(smollm2)
    return artifact.jump


def test_real_fused_exit_head_equals_head_of_jump(smollm2: CausalLM, trained_jump: LowRankJumps) -> None:
    ids = torch.tensor([smollm2.tokenizer(PROMPT).input_ids])
    with torch.no_grad():
        states = smollm2.model(ids, output_hidden_states=True).hidden_states
    head = ExitHead(smollm2, trained_jump)
    assert head.kind == "fused"
    for level in (5, 15, 25):
        h = states[level][0]  # (T, d)
        with torch.no_grad():
            ref = smollm2.head(trained_jump(h[None])[0])
        assert torch.allclose(head(h, level), ref, atol=2e-4)


def test_real_exact_mode_with_the_trained_jump_equals_hf(smollm2: CausalLM, trained_jump: LowRankJumps,
                                                        hf_greedy: tuple[list[int], list[int]]) -> None:
    ids, ref = hf_greedy
    dec = EarlyExitDecoder(smollm2, trained_jump)
    accepted = 0
    for threshold in (0.6, 0.9):
        s = GenerationSettings(max_new_tokens=20, exit=ExitSettings(mode="exact", threshold=threshold, min_layer=10))
        gen = dec.generate(ids, s)
        assert gen.tokens == ref, threshold
        accepted += gen.stats.accepted
    assert accepted > 0


def test_real_approximate_mode_exits_where_allowed(smollm2: CausalLM, trained_jump: LowRankJumps,
                                                  hf_greedy: tuple[list[int], list[int]]) -> None:
    ids, _ = hf_greedy
    dec = EarlyExitDecoder(smollm2, trained_jump)
    s = GenerationSettings(max_new_tokens=20, exit=ExitSettings(mode="approximate", threshold=0.8, min_layer=10,
                                                                stride=4))
    gen = dec.generate(ids, s)
    exited = [t for t in gen.trace if t.kind == "exited"]
    assert exited
    assert all(t.exit_layer in (10, 14, 18, 22, 26) and t.confidence >= 0.8 for t in exited)
    assert gen.stats.layers_skipped == sum(30 - t.exit_layer for t in gen.trace[1:])
