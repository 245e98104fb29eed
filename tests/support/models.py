"""Shared test helpers for models: tiny random Hugging Face models of every supported architecture with
a real (word-level) tokenizer, made confident (``sharpen``) and given a jump fitted to their own states
(``fitted_jump``), and a small jump artifact (``tiny_artifact``).

The tiny models are random, so their heads are near uniform (max-prob ~1/64) and the identity
shortcut never looks confident. ``sharpen`` scales the final norm (which only feeds the head) so
the model makes confident predictions, and ``fitted_jump`` fits a real low-rank jump to the
model's own states by least squares, so exits are a mix of right and wrong."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from shortcuts.adapter import CausalLM
from shortcuts.artifact import JumpArtifact
from shortcuts.engine.cache import KVCache, RowCall
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.runner import LayerRunner
from shortcuts.engine.sequence import Generation, SequenceRun
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.jump import JumpConfig, LowRankJumps

WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "on", "for", "with", "by", "at", "from", "as", "his",
    "her", "city", "river", "king", "music", "film", "war", "first", "new", "old", "great", "small", "large",
    "north", "south", "east", "west", "year", "years", "people", "world", "state", "time", "road", "sea",
    "island", "church", "school", "army", "band", "song", "book", "game", "team", "house", "language", "art",
    "law", "power", "water", "land", "gold", "iron", "stone",
)  # 60 words + 4 special tokens: every id of the tiny models' 64-token vocabulary decodes to text


ARCHS = ("llama", "qwen2", "gemma3_text", "gpt2")



def word_tokenizer(add_bos: bool = False):
    """A real fast tokenizer with a tiny word-level vocabulary (ids 0..3 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_config(arch: str, layers: int = 4):
    from transformers import AutoConfig

    common = {"vocab_size": 64, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128, **common}
    if arch == "gemma3_text":
        kw.update(head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    return AutoConfig.for_model(arch, **kw)


def build_tiny(arch: str, seed: int = 0, layers: int = 4) -> CausalLM:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    with torch.no_grad():  # random norms, so the head's gain and bias matter in the tests
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return CausalLM(model, word_tokenizer(add_bos=arch == "gemma3_text"), name=f"tiny-{arch}-{seed}")


def save_tiny(folder: Path) -> Path:
    """A tiny Llama saved as an ordinary model folder (config, safetensors, tokenizer)."""
    lm = build_tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


PROMPT = "the king of the north city was old and the river of the south"


def sharpen(lm: CausalLM, factor: float = 20.0) -> CausalLM:
    """Multiply the final norm's gain (and bias) by ``factor``: logits scale by it, nothing else changes."""
    with torch.no_grad():
        w = lm.norm.weight
        w.copy_((w + lm.spec.norm_offset) * factor - lm.spec.norm_offset)
        if getattr(lm.norm, "bias", None) is not None:
            lm.norm.bias.mul_(factor)
    return lm


def level_states(lm: CausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """States after every block (levels 1..L, pre-norm), each (B, T, d), via the layer runner."""
    runner = LayerRunner(lm)
    cache = runner.new_cache(ids.shape[0])
    chunk, states = runner.embed(ids, 0), []
    for i in range(lm.num_layers):
        states.append(runner.layer(i, chunk, cache).h)
    return states


_FITTED: dict[tuple[object, ...], LowRankJumps] = {}


def fitted_jump(lm: CausalLM, rank: int = 24, seed: int = 0) -> LowRankJumps:
    """One pure jump for all levels, fitted by least squares (h_l -> h_L) and cut to ``rank``; fitted once
    per model weights (keyed by the model and a checksum of its parameters) and handed out as a copy."""
    with torch.no_grad():
        key = (lm.name, rank, seed, float(sum(p.double().sum() for p in lm.model.parameters())))
    if key not in _FITTED:
        _FITTED[key] = _fit_jump(lm, rank, seed)
    return copy.deepcopy(_FITTED[key])


def _fit_jump(lm: CausalLM, rank: int, seed: int) -> LowRankJumps:
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for _ in range(24):
        states = level_states(lm, torch.randint(4, lm.vocab_size, (1, 24), generator=g))
        xs += [s[0] for s in states[:-1]]
        ys += [states[-1][0]] * (len(states) - 1)
    X, Y = torch.cat(xs), torch.cat(ys)
    sol = torch.linalg.lstsq(torch.cat([X, torch.ones(len(X), 1)], 1), Y).solution  # (d+1, d)
    U, S, Vh = torch.linalg.svd(sol[:-1].T)
    jump = LowRankJumps(JumpConfig(lm.hidden_size, rank), n=1).eval()
    with torch.no_grad():
        jump.lora_B.copy_((U[:, :rank] * S[:rank])[None])
        jump.lora_A.copy_(Vh[:rank][None])
        jump.bias.copy_(sol[-1][None])
    return jump


def settings(n: int = 24, **exit_kw) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=n, stop_token_ids=(), exit=ExitSettings(**exit_kw))


def prompt_ids(lm: CausalLM) -> list[int]:
    return lm.tokenizer(PROMPT).input_ids


def randomized(bank: LowRankJumps, seed: int = 0) -> LowRankJumps:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (bank.lora_B, bank.bias, bank.bn_weight, bank.bn_bias):
            p.copy_(torch.randn(p.shape, generator=g))
        bank.running_mean.copy_(torch.randn(bank.running_mean.shape, generator=g))
        bank.running_var.copy_(torch.rand(bank.running_var.shape, generator=g) + 0.5)
    return bank.eval()


def tiny_artifact(lm: CausalLM) -> JumpArtifact:
    torch.manual_seed(0)
    bank = LowRankJumps(JumpConfig(lm.hidden_size, 4), n=1)
    with torch.no_grad():
        bank.lora_B.normal_()
    return JumpArtifact(bank.eval(), lm.name, lm.fingerprint(), lm.num_layers, 2, [1.0, 3.0, 2.0], "words.txt")


def check_catchup_invariants(cache: KVCache, seq: SequenceRun, num_layers: int) -> None:
    """Pending levels never increase with position, and every layer of the sequence's row holds the
    keys/values of all its fed tokens but the pending ones."""
    levels = [p.level for p in seq.pending]
    assert levels == sorted(levels, reverse=True)
    for i in range(num_layers):
        assert cache.length(i, seq.row) == seq.length - seq.missing(i)


@torch.inference_mode()
def catch_up(runner: LayerRunner, cache: KVCache, seq: SequenceRun) -> None:
    """A reference for the tests, written apart from ``BatchDecoder``'s catch-up: run every pending token
    of a finished sequence through the blocks it skipped, so that all layers of its row cover all its
    tokens (then a full prefill of the same tokens must give the same keys/values)."""
    pending = seq.pending
    if not pending:
        return
    h: torch.Tensor | None = None
    joined = 0  # the last ``joined`` pending tokens are in h
    for i in range(pending[-1].level, runner.num_layers):
        k = len(pending) - joined
        while k and pending[k - 1].level == i:  # levels never increase with position: a suffix joins
            k -= 1
        if k < len(pending) - joined:
            new = torch.cat([p.h for p in pending[k : len(pending) - joined]]).unsqueeze(0)  # (1, m, d)
            h = new if h is None else torch.cat([new, h], dim=1)
            joined = len(pending) - k
        assert h is not None
        call = RowCall([seq.row], [seq.length - joined], [joined], joined, h.device)
        h = runner.block(i, h, call, cache)
    pending.clear()


def decode_alone(dec: EarlyExitDecoder, ids: list[int],
                 s: GenerationSettings) -> tuple[Generation, KVCache, SequenceRun]:
    """Decode in a batch of one; the generation, and the batch's cache and sequence to inspect."""
    batch = dec.batch(1)
    seq = batch.add(ids, s)
    while not seq.done:
        batch.step()
    return seq.generation, batch.cache, seq


def arch_params(fast: tuple[str, ...] = ("llama", "gpt2")) -> list[object]:
    """Every architecture as a test parameter: ``fast`` ones (rotary + RMSNorm, and learned positions +
    LayerNorm) in every tier, the others marked slow, so ``make test-fast`` stays short and ``make test``
    runs all four."""
    return [a if a in fast else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS]
