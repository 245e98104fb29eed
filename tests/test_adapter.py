"""Tier 2: the adapter, collection and artifact on tiny random configs of each architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.models import build_tiny, tiny_artifact

from shortcuts.adapter import CausalLM
from shortcuts.architectures import ARCHITECTURES, arch_spec
from shortcuts.artifact import JumpArtifact
from shortcuts.collect import StateSet, collect_states, read_corpus, sample_sentences
from shortcuts.errors import ArtifactError, CorpusError, UnsupportedModelError
from shortcuts.heads import HeadContext


def _hf_run(lm: CausalLM, text: str):
    ids = lm.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return ids["input_ids"], lm.model(**ids, output_hidden_states=True)


def test_final_state_is_pre_norm_and_head_matches_model(tiny_lm: CausalLM) -> None:
    """The jump's target (output of the last block, before the final norm) through the head
    gives exactly the model's logits; HeadContext's tensor copy of the head agrees."""
    ids, out = _hf_run(tiny_lm, "the king of the north city was old")
    states = collect_states(tiny_lm, ["the king of the north city was old"], skip_first=10**6)
    position = ids.shape[1] - 1  # skip_first past the end: the last token is chosen
    logits = out.logits[0, position]
    assert torch.allclose(tiny_lm.head(states.final[0]), logits, atol=1e-4)
    assert torch.allclose(HeadContext.from_model(tiny_lm).full(states.final[0]), logits, atol=1e-4)
    # and it is not the post-norm state that HF may report last
    assert not torch.allclose(tiny_lm.head(tiny_lm.norm(states.final[0])), logits, atol=1e-3)


def test_levels_match_hf_hidden_states(tiny_lm: CausalLM) -> None:
    text = "the river city"
    ids, out = _hf_run(tiny_lm, text)
    states = collect_states(tiny_lm, [text], skip_first=10**6)
    p = ids.shape[1] - 1
    assert states.levels.shape == (1, tiny_lm.num_layers - 1, tiny_lm.hidden_size)
    for level in tiny_lm.exit_levels:
        assert torch.allclose(states.levels[0, level - 1], out.hidden_states[level][0, p], atol=1e-5), level
    assert tiny_lm.exit_levels == [1, 2, 3]


def test_batched_padded_collection_equals_one_by_one(tiny_lm: CausalLM) -> None:
    texts = ["the city", "a great old river of the south and the west", "war music film", "king of the world"]
    batched = collect_states(tiny_lm, texts, seed=3, batch_size=4)  # right-padded, sorted by length
    alone = collect_states(tiny_lm, texts, seed=3, batch_size=1)  # same seed: same random positions
    assert torch.allclose(batched.levels, alone.levels, atol=1e-4)
    assert torch.allclose(batched.final, alone.final, atol=1e-4)


def test_norm_spec_matches_the_norm_module(tiny_lm: CausalLM) -> None:
    x = torch.randn(3, tiny_lm.hidden_size)
    ctx = HeadContext.from_model(tiny_lm)
    assert torch.allclose(ctx.normalize(x), tiny_lm.norm(x), atol=1e-5)


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="not supported"):
        arch_spec("bert")
    from transformers import AutoConfig

    AutoConfig.for_model("opt", hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                         word_embed_proj_dim=16, vocab_size=50).save_pretrained(tmp_path / "opt")
    with pytest.raises(UnsupportedModelError, match="'opt' is not supported"):
        CausalLM.load(tmp_path / "opt")  # refused from the config, before any weights are read
    assert set(ARCHITECTURES) >= {"llama", "qwen2", "gemma3_text", "gpt2"}


def test_load_folder(tiny_folder: Path) -> None:
    lm = CausalLM.load(tiny_folder)
    assert lm.num_layers == 4
    assert lm.hidden_size == 32
    assert lm.fingerprint() == build_tiny("llama").fingerprint()
    with pytest.raises(FileNotFoundError):
        CausalLM.load(tiny_folder / "missing.gguf")


def test_read_corpus_errors(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not found"):
        read_corpus(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(CorpusError, match="empty"):
        read_corpus(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(CorpusError, match="'text' field"):
        read_corpus(tmp_path / "bad.jsonl")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"text": "a b"}) + "\n")
    assert read_corpus(tmp_path / "ok.jsonl") == ["a b"]
    with pytest.raises(CorpusError, match="only 1"):
        sample_sentences(["a"], 2, seed=0)


def test_state_cache_round_trip(tmp_path: Path, make_tiny) -> None:
    from shortcuts.collect import cached_states

    lm = make_tiny("qwen2")
    texts = ["the city of the king", "a war film of the year"]
    first = cached_states(lm, texts, tmp_path, seed=0)
    again = cached_states(lm, texts, tmp_path, seed=0)
    assert len(list((tmp_path / "states").iterdir())) == 1
    assert torch.equal(first.levels, again.levels)
    assert isinstance(first, StateSet)
    assert len(first) == 2


def test_artifact_round_trip_and_checks(tmp_path: Path, make_tiny) -> None:
    lm = make_tiny("llama")
    art = tiny_artifact(lm)
    path = art.save(tmp_path / "jump.safetensors")
    loaded = JumpArtifact.load(path)
    x = torch.randn(2, 5, lm.hidden_size)
    assert torch.allclose(loaded.jump(x), art.jump(x))
    assert loaded.metadata() == art.metadata()
    loaded.check_model(lm)  # same model: fine
    with pytest.raises(ArtifactError, match="weights differ"):
        loaded.check_model(make_tiny("llama", seed=1))
    with pytest.raises(ArtifactError, match="has d=32, L=2"):
        loaded.check_model(make_tiny("llama", layers=2))
    with pytest.raises(ArtifactError, match="configuration differs"):
        loaded.check_model(make_tiny("qwen2"))


def test_corrupt_artifacts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not found"):
        JumpArtifact.load(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ArtifactError, match="cannot read"):
        JumpArtifact.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="no onejump metadata"):
        JumpArtifact.load(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "old.safetensors"), metadata={"onejump": '{"format": "v0"}'})
    with pytest.raises(ArtifactError, match="format"):
        JumpArtifact.load(tmp_path / "old.safetensors")
    meta = {"format": "onejump.jump/1", "variant": "pure-mse", "hidden_size": 8, "rank": 2}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "half.safetensors"), metadata={"onejump": json.dumps(meta)})
    with pytest.raises(ArtifactError, match="not a valid"):
        JumpArtifact.load(tmp_path / "half.safetensors")
