"""The engine at every weight format (``ONEJUMP_QUANTIZATION``), on tiny random models of every family and
on the real SmolLM2: the load-time self-check, exact mode equal to the same format's full depth, exits,
continuous batches, the exit head in the same format, the model's copies freed, and the server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, build_tiny
from support.models import fitted_jump, prompt_ids, settings, sharpen
from support.server import client, running_server, tiny_settings

from shortcuts.adapter import CausalLM
from shortcuts.engine.decoder import EarlyExitDecoder, Generation
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.engine.weights import Bnb, Dense, Int4, Int8
from shortcuts.errors import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORMATS = ("int8", "int4", "bnb-8bit", "bnb-4bit")
KIND = {"int8": Int8, "int4": Int4, "bnb-8bit": Bnb, "bnb-4bit": Bnb}


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest) -> tuple[CausalLM, torch.nn.Module]:
    lm = sharpen(build_tiny(request.param))
    return lm, fitted_jump(lm, rank=16)  # the fused head's (V, r) matrix: r a multiple of 16 for the kernels


@pytest.mark.parametrize("quantization", FORMATS)
def test_every_family_decodes_at_every_format(tiny: tuple[CausalLM, torch.nn.Module], quantization: str) -> None:
    """The self-check passes (and reports its figures); exact mode gives the format's own full-depth tokens,
    alone and in a batch; approximate mode exits; the matrices, the head and the exit head's big matrix are
    in the format (the head a 4-bit format's 8-bit sibling)."""
    lm, jump = tiny
    dec = EarlyExitDecoder(lm, jump, quantization=quantization)  # type: ignore[arg-type]
    check = dec.self_check
    assert check is not None
    assert check.quantization == quantization
    assert check.held <= check.tolerance
    assert check.error_rms > 1e-4  # the weights did change
    w = dec.runner.blocks.weights[0]
    assert all(isinstance(lin, KIND[quantization]) for lin in (w.qkv, w.o, w.up, w.down))
    head_kind = Int8 if quantization == "int4" else KIND[quantization]
    assert isinstance(dec.runner.head, head_kind)
    assert isinstance(dec.exit_head.levels[1].M, head_kind)
    ids = prompt_ids(lm)
    off = dec.generate(ids, settings(16, mode="off"))
    exact = dec.generate(ids, settings(16, mode="exact", threshold=0.3))
    assert exact.tokens == off.tokens
    approx = dec.generate(ids, settings(16, mode="approximate", threshold=0.3))
    assert min(t.exit_layer for t in approx.trace) < lm.num_layers
    batch = dec.batch(3).generate([ids, ids[:5], ids[:9]], settings(16, mode="exact", threshold=0.3))
    assert [g.tokens for g in batch] == [dec.generate(p, settings(16, mode="off")).tokens
                                         for p in (ids, ids[:5], ids[:9])]
    assert dec.weights_report()["quantization"] == quantization


def test_the_formats_shrink_the_engines_matrices(make_tiny: Callable[..., CausalLM]) -> None:
    lm = make_tiny("llama")
    sizes = {q: EarlyExitDecoder(lm, None, quantization=q).runner.weights_bytes  # type: ignore[arg-type]
             for q in ("none", "int8", "int4")}
    assert sizes["int8"] < sizes["none"] / 3
    assert sizes["int4"] < sizes["int8"]


def test_release_frees_the_models_matrices_and_decodes_the_same(make_tiny: Callable[..., CausalLM]) -> None:
    """After the self-check and the exit head are built, the model's copies of the packed matrices (and of
    an untied head) are freed; the embedding stays (the engine reads it); decoding does not change."""
    lm = make_tiny("llama")  # the tiny Llama's head is not tied to its embedding
    assert lm.lm_head.weight is not lm.embed_tokens.weight
    ref = EarlyExitDecoder(lm, None, quantization="int8")
    ids = prompt_ids(lm)
    before = ref.generate(ids, settings(12, mode="off")).tokens
    dec = EarlyExitDecoder(lm, None, quantization="int8", release=True)
    assert lm.layers[0].mlp.down_proj.weight.numel() == 0
    assert lm.lm_head.weight.numel() == 0
    assert lm.embed_tokens.weight.numel() > 0
    assert lm.vocab_size == 64
    assert lm.device.type == "cpu"
    assert dec.generate(ids, settings(12, mode="off")).tokens == before
    assert ref.generate(ids, settings(12, mode="off")).tokens == before  # the other decoder holds its own copies
    with pytest.raises(RuntimeError, match="freed"):
        dec.runner.self_check()


def test_release_keeps_a_head_tied_to_the_embedding(make_tiny: Callable[..., CausalLM]) -> None:
    lm = make_tiny("gpt2")  # GPT-2 ties its head to the token embedding
    assert lm.lm_head.weight is lm.embed_tokens.weight
    dec = EarlyExitDecoder(lm, None, release=True)
    assert lm.embed_tokens.weight.numel() > 0
    assert lm.layers[0].attn.c_attn.weight.numel() == 0
    assert isinstance(dec.runner.head, Dense)
    assert len(dec.generate(prompt_ids(lm), settings(6, mode="off")).tokens) == 6


def test_a_wrong_kernel_is_refused_at_load(make_tiny: Callable[..., CausalLM], monkeypatch: pytest.MonkeyPatch) -> None:
    """The self-check holds the engine to the model run with the very weights it multiplies by: a kernel that
    multiplies by something else (here: int8 ignoring its scales) is refused, not served."""
    lm = make_tiny("qwen2")
    LayerRunner(lm, quantization="int8").self_check()
    monkeypatch.setattr(Int8, "__call__", lambda self, x: (x @ self.q.T.to(x.dtype)))
    with pytest.raises(UnsupportedModelError, match="does not reproduce.*weights int8"):
        LayerRunner(lm, quantization="int8").self_check()


def test_bitsandbytes_does_not_compile(make_tiny: Callable[..., CausalLM]) -> None:
    with pytest.raises(ValueError, match="does not take quantization='bnb-8bit'"):
        LayerRunner(make_tiny("llama"), compile=True, quantization="bnb-8bit")


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_compiled_blocks_at_int8_and_int4(quantization: str) -> None:
    """Compiled, int8's products keep float32 activations (the self-check's figure drops to float rounding);
    exact mode still equals full depth, alone and in a batch."""
    lm = sharpen(build_tiny("gemma3_text"))
    dec = EarlyExitDecoder(lm, fitted_jump(lm), quantization=quantization, compile=True)  # type: ignore[arg-type]
    assert dec.self_check is not None
    if quantization == "int8":
        assert dec.self_check.math_rms < 1e-4
    ids = prompt_ids(lm)
    off = dec.generate(ids, settings(16, mode="off"))
    assert dec.generate(ids, settings(16, mode="exact", threshold=0.3)).tokens == off.tokens
    batch = dec.batch(2).generate([ids, ids[:6]], settings(16, mode="exact", threshold=0.3))
    assert batch[0].tokens == off.tokens


def test_the_server_serves_bitsandbytes_4bit_on_a_cpu(tiny_model_dir: Path) -> None:
    """ONEJUMP_QUANTIZATION=bnb-4bit on a CPU: /v1/models reports the format and its self-check; completions
    exit early; exact mode's text equals full depth's."""
    with running_server(tiny_settings(tiny_model_dir, quantization="bnb-4bit", bnb_4bit_type="fp4")) as url:
        c = client(url)
        card = c.models.retrieve("tiny-llama").model_extra
        assert card["weights"]["quantization"] == "bnb-4bit"
        assert card["weights"]["self_check"]["metric"] == "rms"
        assert card["weights"]["weights_mb"] > 0
        body = {"model": "tiny-llama", "prompt": "the king of the river", "max_tokens": 10}
        off = c.completions.create(**body, extra_body={"early_exit": {"mode": "off"}})  # type: ignore[call-overload]
        exact = c.completions.create(**body, extra_body={"early_exit": {"mode": "exact", "threshold": 0.0}})  # type: ignore[call-overload]
        approx = c.completions.create(**body, extra_body={"early_exit": {"mode": "approximate", "threshold": 0.0}})  # type: ignore[call-overload]
    assert exact.choices[0].text == off.choices[0].text
    assert min(approx.model_extra["early_exit"]["exit_layers"]) < 4


def assert_exact_up_to_ties(tokens: list[int], off: Generation, tie: float) -> None:
    """Exact mode's ``tokens`` are full depth's, up to the first step where full depth's two best tokens lie
    within ``tie`` (log-probability) of each other and exact mode took the other one. A verification of k rows
    rounds its attention sums in another order than k one-row steps; in float32 that moves logits by ~1e-5,
    but a bf16-activation format (int8, int4) rounds each block's input to 8 bits of mantissa and lets it
    grow to ~0.1-0.5 logit (docs/quantization.md, "Exact mode at 16-bit activations")."""
    for i, (got, trace) in enumerate(zip(tokens, off.trace, strict=True)):
        if got == off.tokens[i]:
            continue
        top2 = dict(trace.top_logprobs[:2])
        assert got in top2, f"step {i}: {got} where full depth has {off.tokens[i]} (top two: {top2})"
        gap = abs(top2[got] - top2[off.tokens[i]])
        assert gap <= tie, f"step {i}: {got} where full depth has {off.tokens[i]} by {gap:.3f}"
        return


# --- the real SmolLM2 ------------------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.parametrize("quantization", FORMATS)
def test_real_smollm2_at_every_format(smollm2: CausalLM, quantization: str) -> None:
    """Each format loads (self-check within tolerance), exact mode equals the format's full depth with the
    shipped jump, and the model's copies of the matrices are released from a model of its own."""
    from shortcuts.artifact import JumpArtifact
    from shortcuts.assets import default_model_dir

    jump = JumpArtifact.load("docs/results/smollm2-135m/jump.safetensors").jump
    dec = EarlyExitDecoder(smollm2, jump, quantization=quantization)  # type: ignore[arg-type]
    assert dec.self_check is not None
    assert dec.self_check.held <= dec.self_check.tolerance
    ids = smollm2.tokenizer("The history of the city of Paris begins").input_ids
    off = dec.generate(ids, GenerationSettings(max_new_tokens=16, stop_token_ids=(), logprobs=2,
                                               exit=ExitSettings(mode="off")))
    for draft in ("exit", "ngram"):
        exact = dec.generate(ids, settings(16, mode="exact", threshold=0.8, min_layer=10, draft=draft))
        assert_exact_up_to_ties(exact.tokens, off, tie=0.0 if quantization == "none" else 0.5)
    if quantization == "int8":
        own = CausalLM.load(default_model_dir())
        released = EarlyExitDecoder(own, jump, quantization="int8", release=True)
        assert own.layers[5].mlp.up_proj.weight.numel() == 0
        assert released.generate(ids, settings(16, mode="off")).tokens == off.tokens


# --- the commands ----------------------------------------------------------------------------------------
class FakeLlama:
    """llama-cpp-python's ``Llama`` as the bench uses it (the real one is an optional extra, not installed
    in CI): greedy continuation of token ids, a token stream that the caller stops."""

    made: list[FakeLlama] = []

    def __init__(self, model_path: str, n_ctx: int, n_threads: int, n_threads_batch: int, verbose: bool):
        self.model_path, self.n_threads, self.calls = model_path, n_threads, []
        FakeLlama.made.append(self)

    def generate(self, tokens: list[int], top_k: int, top_p: float, temp: float, repeat_penalty: float,
                 reset: bool):
        assert (top_k, temp, repeat_penalty, reset) == (1, 0.0, 1.0, True)  # greedy, from a fresh context
        self.calls.append(list(tokens))
        t = tokens[-1]
        while True:  # never ends by itself: the arm takes exactly new_tokens
            t = (t * 7 + 3) % 64
            yield t


def test_bench_times_every_format_and_llama_cpp_in_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import sys
    import types

    from support.models import PROMPT, tiny_artifact

    from shortcuts.cli import main

    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    jump = tiny_artifact(lm).save(tmp_path / "jump.safetensors")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\nthe city of the river\n")
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(2048))
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    args = ["bench", "--model", str(tmp_path / "tiny"), "--jump", str(jump), "--prompts", str(tmp_path / "prompts.txt"),
            "--new-tokens", "5", "--threads", "1", "--quantization", "int4,int8", "--llama-cpp", str(gguf), "--json"]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"off", "off@int8", "off@int4", "approximate@int8", "exact@int4", "llama_cpp"} <= set(r["tok_s"])
    q = r["quantization"]
    assert list(q) == ["none", "int4", "int8"]  # the dense model first, then the order given
    assert q["none"]["same_as_none"] == 1.0
    assert q["int8"]["weights_mb"] < q["none"]["weights_mb"] / 3
    assert all(0.0 <= e["same_as_none"] <= 1.0 and e["tok_s"] > 0 for e in q.values())
    assert q["int4"]["self_check"]["quantization"] == "int4"
    assert set(q["int8"]["exits_vs_full_depth"]) == {"approximate", "exact"}
    assert r["llama_cpp"]["gguf"] == str(gguf)
    fake = FakeLlama.made[-1]
    assert fake.n_threads == 1
    assert len(fake.calls) == 3  # the warm-up prompt, then each prompt once, interleaved with the other arms
    assert fake.calls[1] == lm.tokenizer(PROMPT).input_ids
    assert main([*args[:-3], "--quantization", "int3"]) == 2
    assert "int3 not among" in capsys.readouterr().err


def test_calibrate_stores_a_setting_per_precision(tiny_folder: Path, word_corpus: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``calibrate --quantization int8`` reads its table from the engine at int8 and stores the setting for
    int8 beside the dense model's; the server at int8 then runs it, at none the dense one."""
    from support.models import tiny_artifact

    from service.config import Settings
    from service.loading import load_decoder
    from shortcuts.artifact import JumpArtifact
    from shortcuts.calibration.setting import StoredCalibration
    from shortcuts.cli import main

    jump = tiny_artifact(build_tiny("llama")).save(tmp_path / "jump.safetensors")
    base = ["calibrate", "--model", str(tiny_folder), "--jump", str(jump), "--corpus", str(word_corpus),
            "--prompts", "10", "--new-tokens", "8", "--offset", "0", "--target", "0.5"]
    assert main(base) == 0
    assert main([*base, "--quantization", "int8"]) == 0
    capsys.readouterr()
    stored = StoredCalibration.from_extra(JumpArtifact.load(jump).extra)
    assert set(stored.by_precision) == {"none", "int8"}
    int8 = stored.lookup("int8")[0]
    assert int8 is not None
    assert int8.approximate is not None
    assert "costs_ms" in int8.approximate.measured
    for q in ("none", "int8", "int4"):
        _, policy = load_decoder(Settings(model=str(tiny_folder), jump=str(jump), quantization=q))
        resolved = policy.resolve()
        assert (resolved.precision, resolved.source) == (q, "calibration")
        assert resolved.measured_at == ("none" if q == "int4" else q)  # int4: none stored, the dense one


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])  # tied heads: a plain embedding, Gemma's scaled one
def test_an_int8_head_tied_to_the_embedding_serves_both(arch: str) -> None:
    """At int8 (and int4, whose head is int8) a head tied to the embedding gives the token rows too
    (dequantized, Gemma's scale applied): the float embedding is freed with the rest, tokens unchanged."""
    lm = build_tiny(arch)
    assert lm.lm_head.weight is lm.embed_tokens.weight
    ids = prompt_ids(lm)
    before = EarlyExitDecoder(lm, None, quantization="int8").generate(ids, settings(10, mode="off")).tokens
    dec = EarlyExitDecoder(lm, None, quantization="int8", release=True)
    assert dec.runner.embedding_from_head
    assert lm.embed_tokens.weight.numel() == 0
    assert dec.generate(ids, settings(10, mode="off")).tokens == before
