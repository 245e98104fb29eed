"""Decode-matched hidden states: the model's own greedy continuations of prompts, at every level.

A decoder exits at positions inside its *own* continuation, where the text is the model's and the
states differ from those of a corpus sentence. So each prompt is continued greedily by the full model
and, at every decode step (the state fed token k-1 that predicts token k, k >= 1), the states of every
level 0..L (0 = the embedding, input of block 1; L = the final state before the final norm) are kept as
float16 while it generates (``decode_traces``; ``trace_states`` reads the same states in a second pass over
prompt + continuation).
What ``onejump fit`` trains and calibrates on; ``shortcuts.lab.traces`` writes them to disk for studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.calibration.table import all_levels


@dataclass
class Traces:
    """States at every decode step of every prompt. states: (N, L+1, d) float16, level 0 = embedding;
    prompt: (N,) prompt index; step: (N,) decode step k (1..K-1) in its prompt's continuation."""

    states: Tensor
    prompt: Tensor
    step: Tensor

    def __len__(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def num_layers(self) -> int:
        return self.states.shape[1] - 1

    def levels(self, rows: Tensor | slice = slice(None)) -> Tensor:
        """Exit-level states (L-1, n, d) float32 of the chosen rows (levels 1..L-1)."""
        return self.states[rows, 1:-1].float().transpose(0, 1)

    def final(self, rows: Tensor | slice = slice(None)) -> Tensor:
        return self.states[rows, -1].float()

    def sample(self, per_prompt: int, seed: int = 0) -> Tensor:
        """Row indices: up to ``per_prompt`` random steps of each prompt."""
        g = torch.Generator().manual_seed(seed)
        rows = []
        for p in range(int(self.prompt.max()) + 1):
            idx = torch.nonzero(self.prompt == p).flatten()
            rows.append(idx[torch.randperm(len(idx), generator=g)[:per_prompt]])
        return torch.cat(rows).sort().values

    def first_prompts(self, n: int) -> Traces:
        """The rows of the first ``n`` prompts."""
        keep = self.prompt < n
        return Traces(self.states[keep], self.prompt[keep], self.step[keep])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"states": self.states.contiguous(), "prompt": self.prompt, "step": self.step}, str(path))

    @classmethod
    def load(cls, path: Path) -> Traces:
        t = load_file(str(path))
        return cls(t["states"], t["prompt"], t["step"])


def trace_states(lm: CausalLM, prompts: list[list[int]], conts: list[list[int]], batch_size: int = 16,
                 desc: str = "trace") -> Traces:
    """Every decode step k >= 1 of each continuation: the state at position len(prompt)+k-1."""
    states, prompt_ix, steps = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        ps, cs = prompts[start : start + batch_size], conts[start : start + batch_size]
        out = all_levels(lm, [p + c for p, c in zip(ps, cs, strict=True)])
        for i, (p, c) in enumerate(zip(ps, cs, strict=True)):
            cols = torch.arange(len(p), len(p) + len(c) - 1)
            states.append(out[i, cols].half().cpu())
            prompt_ix.append(torch.full((len(cols),), start + i))
            steps.append(torch.arange(1, len(c)))
        del out
    return Traces(torch.cat(states), torch.cat(prompt_ix), torch.cat(steps))


@torch.inference_mode()
def generate_keeping_states(lm: CausalLM, batch: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Tensor]:
    """Greedy continuations of a left-padded batch (EOS suppressed) and, at each decode step k = 1..K-1 (the
    forward call fed token k-1), every level's state of every row: (B, K-1, L+1, d) float16. Forward hooks
    read the states as ``generate`` runs, so no second pass over prompt + continuation is needed."""
    pad = lm.tokenizer.pad_token_id or 0
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=lm.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=lm.device)
    step: list[Tensor] = []  # the current call's states, level by level
    steps: list[Tensor] = []

    def first(_m: object, args: tuple, kwargs: dict) -> None:
        step.clear()
        h = args[0] if args else kwargs["hidden_states"]
        if h.shape[1] == 1:  # a decode step (the prefill is step 0: always full depth, left out)
            step.append(h[:, 0])

    def after(_m: object, _i: object, out: object) -> None:
        if step:
            step.append((out[0] if isinstance(out, tuple) else out)[:, -1])  # type: ignore[index]
            if len(step) == lm.num_layers + 1:
                steps.append(torch.stack(step, dim=1).half().cpu())

    hooks = [lm.layers[0].register_forward_pre_hook(first, with_kwargs=True)]
    hooks += [layer.register_forward_hook(after) for layer in lm.layers]
    try:
        gen = lm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=pad)
    finally:
        for h in hooks:
            h.remove()
    return gen[:, width:].tolist(), torch.stack(steps, dim=1)


def decode_traces(lm: CausalLM, prompts: list[list[int]], new_tokens: int, desc: str = "trace",
                  batch_size: int = 16) -> tuple[Traces, list[list[int]]]:
    """The full model continues ``prompts`` greedily for ``new_tokens``; the traces of those steps (read while
    it generates) and the continuations."""
    conts: list[list[int]] = []
    states, prompt_ix, steps = [], [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = prompts[start : start + batch_size]
        c, st = generate_keeping_states(lm, batch, new_tokens)
        conts += c
        k = st.shape[1]
        states.append(st.reshape(-1, *st.shape[2:]))
        prompt_ix.append(torch.arange(start, start + len(batch)).repeat_interleave(k))
        steps.append(torch.arange(1, k + 1).repeat(len(batch)))
    return Traces(torch.cat(states), torch.cat(prompt_ix), torch.cat(steps)), conts
