"""Layer skipping beside early exit (Glavas et al. 2024), measured on our models.

    python -m shortcuts.lab.skip_study --out runs/skip/smollm2 --val 48 --test 100 --new-tokens 24

Every decoded token runs the blocks *not* in a set S (the prompt runs them all); the question is
how large S can be at a given agreement with the full model, and whether drafts that skip S
(verified by the full model: exact mode) pay. Teacher-forced, like ``onejump agreement``: the
prompt is prefilled once per row of one ``KVCache``; the full model's greedy continuation is fed
as one chunk per row, so at decode step k the skipped model predicts token k from the full
model's tokens 0..k-1, with keys/values of the blocks after S computed from its own states
(what a decoder skipping S would hold).

- greedy search on validation prompts: S grows one block at a time, each round adding the block
  whose removal keeps the most agreement (skip sets nested: S_1 ⊂ S_2 ⊂ ...);
- test prompts: agreement and its 95% bootstrap lower bound for each S_k; the per-sequence oracle
  (each prompt takes the largest S_k under which all its tokens agree) and the per-token one;
- costs in blocks measured here (a block on q = 1..8 tokens, the full head), the predicted
  speed-up of approximate mode (skip S_k) and of exact mode with S_k drafts (replayed along each
  test prompt: drafts until max_draft or a disagreement, then one verification chunk that runs
  blocks from min(S_k) on the drafts).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from shortcuts.adapter import CausalLM
from shortcuts.assets import default_model_dir
from shortcuts.calibration.costs import BlockPass, interleaved
from shortcuts.calibration.replay import bootstrap_lower_bound
from shortcuts.calibration.table import continuations
from shortcuts.engine.cache import RowCall
from shortcuts.engine.runner import LayerRunner
from shortcuts.lab.traces import parse_study, split_args, val_test_prompts


@dataclass
class SkipTable:
    """Per prompt and decode step: does the skipped model's top-1 equal the full model's."""

    agree: Tensor  # (N,) bool
    prompt: Tensor  # (N,) prompt index
    step: Tensor  # (N,) decode step, 1..K-1


class SkipBench:
    """Prompts prefilled once in the rows of one cache; the continuation chunk replayed with blocks skipped."""

    @torch.inference_mode()
    def __init__(self, runner: LayerRunner, prompts: list[list[int]], conts: list[list[int]]):
        self.runner, self.L = runner, runner.num_layers
        self.P = [len(p) for p in prompts]
        K = min(len(c) for c in conts) - 1  # the chunk: tokens 0..K-1 predict tokens 1..K
        self.cache = runner.new_cache(len(prompts), max(self.P) + K + 1)
        for r, p in enumerate(prompts):
            h = runner.embed_rows(torch.tensor([p]), torch.arange(len(p)).unsqueeze(0))
            call = RowCall([r], [0], [len(p)], len(p), h.device)
            for i in range(self.L):
                h = runner.block(i, h, call, self.cache)
        ids = torch.tensor([c[:K] for c in conts])
        pos = torch.tensor(self.P).unsqueeze(1) + torch.arange(K)
        self.call = RowCall(list(range(len(prompts))), self.P, [K] * len(prompts), K, runner.lm.device)
        h = runner.embed_rows(ids, pos)
        self.inputs: list[Tensor] = []  # the input of block i at the chunk's positions, (B, K, d)
        for i in range(self.L):
            self.inputs.append(h)
            h = runner.block(i, h, self.call, self.cache)
        self.full_top = runner.full_logits(h).argmax(-1)  # (B, K)
        self._rewind()

    def _rewind(self) -> None:
        for r, p in enumerate(self.P):
            self.cache.crop_row(r, p)

    @torch.inference_mode()
    def table(self, skip: frozenset[int]) -> SkipTable:
        """Agreement of every (prompt, step) with the blocks in ``skip`` left out of the decoded tokens."""
        if not skip:
            top = self.full_top
        else:
            h = self.inputs[min(skip)]  # blocks before the first skipped one are the full model's
            for i in range(min(skip), self.L):
                if i not in skip:
                    h = self.runner.block(i, h, self.call, self.cache)
            top = self.runner.full_logits(h).argmax(-1)
            self._rewind()
        B, K = top.shape
        return SkipTable((top == self.full_top).flatten().cpu(), torch.arange(B).repeat_interleave(K),
                         torch.arange(1, K + 1).repeat(B))


def greedy_sets(bench: SkipBench, max_skip: int, floor: float, candidates: list[int]) -> list[dict]:
    """Nested skip sets: each round adds the candidate block whose removal keeps the most agreement."""
    chosen: list[int] = []
    rounds: list[dict] = []
    for _ in tqdm(range(max_skip), desc="greedy skip search", unit="round"):
        scores = {i: float(bench.table(frozenset(chosen + [i])).agree.float().mean())
                  for i in candidates if i not in chosen}
        best = max(scores, key=lambda i: scores[i])
        chosen.append(best)
        rounds.append({"skip": sorted(chosen), "added": best, "val_agreement": scores[best],
                       "round_scores": {str(k): round(v, 4) for k, v in sorted(scores.items())}})
        if scores[best] < floor:
            break
    return rounds


@torch.inference_mode()
def block_costs(runner: LayerRunner, qs: tuple[int, ...] = tuple(range(1, 10)), repeats: int = 10) -> dict[str, float]:
    """Milliseconds of one block on q tokens of one row (over passes through every block, as decoding
    reads them) and of the full head on q rows (right after a pass), interleaved (``costs.interleaved``)."""
    passes = {f"block_q{q}": BlockPass(runner, q) for q in qs}
    d, dev = runner.lm.hidden_size, runner.lm.device
    states = {q: torch.randn(q, d, device=dev) for q in qs}
    heads: dict[str, Callable[[], object]] = {f"head_q{q}": partial(runner.full_logits, states[q]) for q in qs}
    out = {k: 1e3 * v for k, v in interleaved(passes, heads, passes["block_q1"], repeats).items()}
    out["head"] = out["head_q1"]
    return out


# --- analysis ------------------------------------------------------------------------------------------
def oracles(tables: list[SkipTable], num_layers: int) -> dict[str, float]:
    """Mean fraction of blocks run under the per-sequence and per-token oracles over nested sets
    (table k skips k blocks; table 0 is the full model)."""
    agree = torch.stack([t.agree for t in tables])  # (m+1, N)
    prompt = tables[0].prompt
    n_prompts = int(prompt.max()) + 1
    m = agree.shape[0] - 1
    k = torch.arange(m + 1)[:, None].expand_as(agree)
    per_token = torch.where(agree, k, 0).max(0).values.float()  # any set of the family may serve each token
    all_ok = torch.stack([torch.zeros(n_prompts).index_add_(0, prompt, (~a).float()) == 0 for a in agree])
    per_seq = torch.where(all_ok, torch.arange(m + 1)[:, None], 0).max(0).values.float()
    return {"per_sequence_blocks": 1 - float(per_seq.mean()) / num_layers,
            "per_token_blocks": 1 - float(per_token.mean()) / num_layers}


def exact_replay(agree: Tensor, prompt: Tensor, first: int, k: int, costs: dict[str, float], num_layers: int,
                 max_draft: int) -> float:
    """Predicted exact-mode speed-up with drafts that skip k blocks from ``first`` (greedy): along each
    prompt's steps, draft until ``max_draft`` or a disagreement, then verify in one step that runs
    blocks first..L on the drafts and the fed token (a chunk) and the full head on each."""
    blk = costs["block_q1"]
    L, H = num_layers, costs["head"] / blk

    def chunk(q: int) -> float:
        return costs[f"block_q{q}"] / blk

    def head(q: int) -> float:
        return costs[f"head_q{q}"] / blk

    full_cost = tokens = 0.0
    spent = 0.0
    for p in range(int(prompt.max()) + 1):
        a = agree[prompt == p].tolist()
        t = 0
        while t < len(a):
            room = min(max_draft, len(a) - t)
            n = 0
            while n < room and a[t + n]:
                n += 1
            out = n + 1  # the accepted drafts, then the correction (or the token after the last draft)
            spent += room * (L - k + H) + first + (L - first) * chunk(room + 1) + head(room + 1)
            tokens += out
            full_cost += out * (L + H)
            t += out
    return full_cost / spent


def evaluate(bench: SkipBench, sets: list[list[int]], costs: dict[str, float], max_draft: tuple[int, ...]) -> dict:
    """Agreement (with the bootstrap lower bound), approximate and exact predicted speed-ups and the
    oracles for each nested skip set on ``bench``'s prompts."""
    L, H = bench.L, costs["head"] / costs["block_q1"]
    tables = [bench.table(frozenset())] + [bench.table(frozenset(s)) for s in tqdm(sets, desc="test sets")]
    rows = []
    for s, t in zip(sets, tables[1:], strict=True):
        row = {"skip": s, "k": len(s), "agreement": float(t.agree.float().mean()),
               "agreement_lower": bootstrap_lower_bound(t.agree, t.prompt),
               "approximate_speedup": (L + H) / (L - len(s) + H)}
        for D in max_draft:
            row[f"exact_speedup_d{D}"] = exact_replay(t.agree, t.prompt, min(s), len(s), costs, L, D)
        rows.append(row)
    return {"sets": rows, "oracle": oracles(tables, L)}


def plot(result: dict, path: Path) -> None:
    """Left: validation agreement with each single block skipped. Right: test agreement (and its
    lower bound) against the share of blocks each decoded token runs, for the nested skip sets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = result["num_layers"]
    single = {int(k): v for k, v in result["search"][0]["round_scores"].items()}
    rows = result["test"]["sets"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(list(single), list(single.values()), color="tab:blue")
    a.axhline(0.95, color="tab:red", ls="--", lw=1, label="target 0.95")
    a.set(xlabel="skipped block (0-based)", ylabel="agreement with the full model (validation)",
          title="one block skipped", ylim=(0, 1))
    a.legend()
    share = [1 - r["k"] / L for r in rows]
    b.plot(share, [r["agreement"] for r in rows], "o-", label="agreement")
    b.plot(share, [r["agreement_lower"] for r in rows], "s--", label="95% lower bound")
    b.axhline(0.95, color="tab:red", ls="--", lw=1)
    b.set(xlabel="share of blocks run per decoded token", ylabel="agreement (test)",
          title="greedy nested skip sets", ylim=(0.5, 1.0))
    b.invert_xaxis()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.skip_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(default_model_dir()))
    p.add_argument("--out", required=True)
    split_args(p, val=48)
    p.add_argument("--max-skip", type=int, default=10)
    p.add_argument("--floor", type=float, default=0.7, help="stop the search below this validation agreement")
    p.add_argument("--max-draft", type=int, nargs="+", default=[2, 4, 8])
    a, out = parse_study(p, argv)
    lm = CausalLM.load(a.model)
    runner = LayerRunner(lm)
    split = val_test_prompts(lm, a.val, a.test)
    benches = {name: SkipBench(runner, ids, continuations(lm, ids, a.new_tokens)) for name, ids in split.items()}
    rounds = greedy_sets(benches["val"], a.max_skip, a.floor, list(range(1, lm.num_layers - 1)))
    (out / "search.json").write_text(json.dumps(rounds, indent=1))
    costs = block_costs(runner)
    result = {"model": a.model, "num_layers": lm.num_layers, "sizes": {k: len(v) for k, v in split.items()},
              "new_tokens": a.new_tokens, "costs_ms": costs, "search": rounds,
              "test": evaluate(benches["test"], [r["skip"] for r in rounds], costs, tuple(a.max_draft))}
    (out / "skip_study.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "skip_study.png")
    for r in result["test"]["sets"]:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
    print(json.dumps(result["test"]["oracle"]), json.dumps({k: round(v, 3) for k, v in costs.items()}))


if __name__ == "__main__":
    main()
