"""The early-exit decoder: one token at a time, leaving the forward pass when the jump is confident.

Each generated token is fed through blocks 1, 2, ...; after the blocks listed by the exit
settings the exit head (head of the jump's estimate of the final state) is checked by a gate.

- mode "off": every block, the model's own head (plain decoding, for reference).
- mode "approximate": a token that exits at level l is predicted by the exit head.
- mode "exact": drafts come from the exit head (exits only draft tokens) or from the prompt and output
  (n-gram lookup), as ``ExitSettings.draft`` says (``drafts``); a full-depth pass over the drafted chunk
  verifies them, keeps the longest prefix the full model agrees with plus the full model's next token,
  and crops the caches past it (speculative decoding; the same tokens as "off", greedy or seeded).

Skipped layers (kv_policy): with "catchup" a token that exits at level l waits in ``pending``
with its level-l state; the next token that goes deeper than l carries it through the skipped
blocks in the same chunk (FREE / EE-LLM). Its keys/values are therefore exactly the full
model's, only computed later, and exact mode's verification pass is just that catch-up run to
the top. Pending levels never increase with position, so every layer's cache stays a
contiguous prefix. With "copy" the skipped layers' keys/values are filled at once from the
exit state (CALM's state propagation); nothing waits, but those keys/values are approximate.

The rules live once, in ``sequence.SequenceRun`` (per sequence) and ``batch.BatchDecoder``
(tensors for several sequences); this class is the model-facing half (runner, exit head, prompt
checks) and decodes a single sequence as a batch of one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shortcuts.adapter import CausalLM
from shortcuts.engine.batch import PREFILL_CHUNK, BatchDecoder, Stop
from shortcuts.engine.drafts import DraftStats, StepCosts
from shortcuts.engine.exit_head import ExitHead
from shortcuts.engine.runner import LayerRunner, SelfCheck
from shortcuts.engine.sampling import TopLogprobs
from shortcuts.engine.sequence import Generation, SequenceRun, Stats, TokenTrace
from shortcuts.engine.settings import GenerationSettings, Quantization
from shortcuts.errors import Cancelled
from shortcuts.jump import LowRankJumps

if TYPE_CHECKING:
    from shortcuts.engine.learned_gate import LearnedGate

__all__ = ["EarlyExitDecoder", "Generation", "Stats", "TokenTrace"]

DEFAULT_MAX_SEQ_LEN = 2048


class EarlyExitDecoder:
    """Greedy or sampled decoding of a ``CausalLM`` with early exits through a low-rank jump.

    ``jump`` None uses the identity shortcut (the logit lens) as exit head. ``max_seq_len`` caps
    the positions the static KV caches hold (default: the model's context, at most 2048).
    ``check`` compares the layer-by-layer pass with the model's own logits first (``LayerRunner.self_check``,
    its figures in ``self_check``); ``compile`` runs the blocks under ``torch.compile``
    (``runner.compiled_block``), compiled here; ``graphs`` runs runs of blocks at static shapes, as CUDA
    graphs on a GPU (``graphs.SegmentGraphs``; "auto": on a GPU only). ``quantization``: the weight format
    of every matrix (``weights``; the exit head's included); ``dtype``: the blocks' activations and KV cache
    (default: the model's). ``release``: free the model's own copies of the matrices the engine holds
    (``LayerRunner.release_model_weights``): the model's ``forward`` no longer works after."""

    def __init__(self, lm: CausalLM, jump: LowRankJumps | None = None, max_seq_len: int | None = None,
                 check: bool = True, compile: bool = False, learned_gate: LearnedGate | None = None,
                 graphs: bool | str = "auto", quantization: Quantization = "none", release: bool = False,
                 bnb_4bit_type: str = "nf4", dtype: torch.dtype | None = None):
        self.lm = lm
        if learned_gate is not None and learned_gate.num_layers != lm.num_layers:
            raise ValueError(f"the learned gate is for {learned_gate.num_layers} layers, the model has {lm.num_layers}")
        self.learned_gate = learned_gate
        self.runner = LayerRunner(lm, max_seq_len or DEFAULT_MAX_SEQ_LEN, compile=compile, quantization=quantization,
                                  dtype=dtype, bnb_4bit_type=bnb_4bit_type)
        self.compile_seconds = self.runner.warm_up() if compile else 0.0
        self.self_check: SelfCheck | None = self.runner.self_check() if check else None
        if graphs is True or (graphs == "auto" and lm.device.type == "cuda" and not compile):
            self.runner.use_graphs(max_rows=64)
        self.num_layers = lm.num_layers
        self.exit_head = ExitHead(lm, jump, self.runner)
        if release:
            self.runner.release_model_weights()
        eos = lm.config.eos_token_id
        self.eos_ids: tuple[int, ...] = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        self._single: BatchDecoder | None = None
        self._step_costs: StepCosts | None = None
        self.draft_stats = DraftStats()  # what exact mode's rows learned about their drafts (the auto policy)

    @property
    def step_costs(self) -> StepCosts:
        """The measured cost of full-depth steps by chunk size, which exact mode's ``auto`` draft
        policy weighs drafts with: timed on first use (``StepCosts.measure``, about 30 passes of the
        model; a server times it at start-up), or set."""
        if self._step_costs is None:
            self._step_costs = StepCosts.measure(self)
        return self._step_costs

    @step_costs.setter
    def step_costs(self, costs: StepCosts) -> None:
        self._step_costs = costs

    @property
    def single(self) -> BatchDecoder:
        """The batch of one that ``generate`` and ``follow`` decode in (its cache is made on first use)."""
        if self._single is None:
            self._single = BatchDecoder(self, 1)
        return self._single

    def batch(self, max_batch_size: int) -> BatchDecoder:
        """A continuous batch of up to ``max_batch_size`` sequences with its own static KV cache."""
        return BatchDecoder(self, max_batch_size)

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generated) the decoder's caches hold."""
        return self.runner.context_length

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def quantization(self) -> Quantization:
        return self.runner.quantization

    def weights_report(self) -> dict[str, Any]:
        """The weight format, the megabytes of the engine's matrices (blocks and head) and the self-check's
        figures (``runner.SelfCheck``; None when it did not run)."""
        return {"quantization": self.quantization, "weights_mb": round(self.runner.weights_bytes / 2**20, 3),
                "self_check": None if self.self_check is None else self.self_check.to_dict()}

    # --- public API ------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], settings: GenerationSettings | None = None) -> Generation:
        """Continue ``prompt_ids``; see ``GenerationSettings`` and ``ExitSettings``. (To see tokens as
        they come, or to stop early: ``batch`` and its ``step`` outputs, as the server does.)"""
        return self._alone(self.single.add(prompt_ids, settings)).generation

    def _alone(self, seq: SequenceRun) -> SequenceRun:
        """Step the batch of one until ``seq``'s finish is reported."""
        while not any(out.finish is not None for out in self.single.step()):
            pass
        return seq

    def follow(self, prompt_ids: list[int], continuation: list[int],
               settings: GenerationSettings | None = None) -> list[TokenTrace]:
        """Teacher forcing: feed ``continuation`` (e.g. the full model's own output) token by token
        and return, for tokens 1.., what the decoder would have picked there and at which level.
        Measures per-token agreement under a KV policy without letting errors compound."""
        settings = settings or GenerationSettings()
        if settings.exit.mode == "exact":
            raise ValueError("follow() replays modes 'off' and 'approximate'; exact mode always agrees")
        self.check_prompt(prompt_ids + continuation[:-1])
        return self._alone(self.single.add(prompt_ids, settings, forced=list(continuation))).picked[1:]

    @torch.inference_mode()
    def score(self, prompt_ids: list[int], top_n: int = 0, stop: Stop | None = None,
              chunk: int = PREFILL_CHUNK) -> list[tuple[float, TopLogprobs]]:
        """The full model's log-probability of each token of ``prompt_ids`` after the first, given the
        tokens before it, with the ``top_n`` most likely (token, logprob) there: a forward pass in a
        cache of its own (prompt scoring, OpenAI's ``echo`` with ``max_tokens`` 0), ``chunk`` tokens at a
        time; ``stop`` is asked before each chunk (``Cancelled`` when it says so)."""
        self.check_prompt(prompt_ids)
        ids = torch.tensor([prompt_ids])
        n = len(prompt_ids)
        cache = self.runner.new_cache(1, capacity=n)
        out: list[tuple[float, TopLogprobs]] = []
        for a in range(0, n - 1, max(chunk, 1)):
            if stop is not None and stop():
                raise Cancelled(f"scoring stopped after {a} of {n} tokens")
            b = min(a + max(chunk, 1), n - 1)  # positions a..b-1 predict tokens a+1..b
            logits = self.runner.forward(ids[:, a:b], cache, start=a)  # (1, b-a, V)
            lp = torch.log_softmax(logits[0].float(), dim=-1)  # (b-a, V)
            targets = ids[0, a + 1 : b + 1].to(lp.device)
            chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
            if not top_n:
                out += [(c, ()) for c in chosen]
                continue
            top = lp.topk(min(top_n, lp.shape[-1]), dim=-1)
            pairs = [tuple(zip(i, v, strict=True)) for i, v in zip(top.indices.tolist(), top.values.tolist(),
                                                                    strict=True)]
            out += list(zip(chosen, pairs, strict=True))
        return out

    def check_settings(self, settings: GenerationSettings) -> None:
        """ValueError for settings this decoder cannot honour: exit levels outside the model, a
        learned gate it does not have."""
        exits = settings.exit
        exits.check_levels(self.num_layers)
        if exits.mode != "off" and exits.gate == "learned" and self.learned_gate is None:
            raise ValueError("gate='learned' needs a jump artifact with a learned gate (onejump calibrate --gates "
                             "learned); this server's has none")

    def check_prompt(self, prompt_ids: list[int]) -> None:
        """ValueError for a prompt that cannot be decoded: empty, filling the context, unknown ids."""
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS token)")
        n, vocab = len(prompt_ids), self.lm.vocab_size
        if n >= self.runner.context_length:
            raise ValueError(f"the prompt has {n} tokens; the model's context is {self.runner.context_length}, "
                             "which leaves no room to generate")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
