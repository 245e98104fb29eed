"""``onejump bench``: the side-by-side timed run on anyone's prompts.

Arms, interleaved prompt by prompt (the order rotates, so a noisy neighbour hits every arm alike):
Hugging Face ``generate`` (the baseline), Hugging Face's prompt lookup (``hf_prompt_lookup``:
``generate(prompt_lookup_num_tokens=10)``, greedy, the same prompts), our full depth (``off``),
``approximate`` and ``exact`` at the setting the server would run for this artifact and these flags
(``calibration.resolve``); with ``--compile`` also the same three engine arms with compiled blocks
(``*_compiled``). Every arm generates exactly ``--new-tokens`` tokens per prompt (EOS ignored), so
tokens/s compare like with like. ``same_as_off`` is the fraction of generated tokens equal, position by
position, to full depth's. ``setting`` and ``exact_setting`` are the resolved settings' reports
(``Resolved.report``); ``exact_drafts`` says where exact mode's drafts came from: drafted and accepted
tokens by source, full-depth passes, and tokens per pass. Prompt files: ``shortcuts.prompts`` (text
lines, ``{"text": ...}``, ``{"messages": [...]}`` chat requests).

``--quantization none,int8,int4`` adds the engine arms at every listed weight format (``engine.weights``;
``off@int8``, ``approximate@int8``, ... each at the setting stored for that precision) to the same run,
and ``quantization``: per format its full depth's tok/s, the share of its tokens equal to the dense
model's full depth (``same_as_none``), the megabytes of its matrices, its load-time self-check, and its
exits' speed against its own full depth. ``--llama-cpp FILE.gguf`` adds llama.cpp (llama-cpp-python, the
optional ``llama`` extra) continuing the same token ids greedily, one more arm of the same run.

``--graphs`` adds the engine arms run through CUDA graphs (``*_graphs``; on a CPU the same static
shapes run eagerly); ``--batch-size N`` times batches of N prompts (the engine's continuous batch, HF
``generate`` on left-padded prompts) instead of one prompt at a time. ``traces`` gives each engine
arm's exit levels and checks per token (what ``lab/gpu_shapes`` projects from); on a GPU,
``gpu_memory_gb`` the weights' and the peak allocation.

Imports of torch and the engine stay inside the functions that run: ``onejump --help`` builds this
command's parser without loading them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortcuts.calibration.setting import DENSE, Overrides, StoredCalibration, resolve_modes
from shortcuts.engine.settings import DRAFT_POLICIES, GATES, QUANTIZATIONS, Mode, Quantization
from shortcuts.timing import time_arms

if TYPE_CHECKING:
    from shortcuts.adapter import CausalLM
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.engine.sequence import Generation, Stats
    from shortcuts.engine.settings import ExitSettings
    from shortcuts.jump import LowRankJumps


PROMPT_LOOKUP_TOKENS = 10  # Hugging Face's documented example value of prompt_lookup_num_tokens


def overrides(args: argparse.Namespace) -> Overrides:
    """The exit flags given (None: not given)."""
    return Overrides(gate=args.gate, threshold=args.threshold, min_layer=args.min_layer, stride=args.stride,
                     draft=getattr(args, "draft", None), max_draft=getattr(args, "max_draft", None),
                     ngram_min=getattr(args, "ngram_min", None), ngram_max=getattr(args, "ngram_max", None))


def hf_generate(lm: CausalLM, ids: list[int], n: int, **kw: int) -> list[int]:
    """Exactly ``n`` greedy tokens from Hugging Face ``generate`` (EOS suppressed), the baseline."""
    import torch

    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids], device=lm.device), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, attention_mask=torch.ones(1, len(ids), dtype=torch.long,
                                                                            device=lm.device), **kw)
    return out[0, len(ids):].tolist()


def hf_generate_batch(lm: CausalLM, batch: list[list[int]], n: int) -> list[list[int]]:
    """``hf_generate`` on a batch of prompts, left-padded."""
    import torch

    width = max(map(len, batch))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=lm.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=lm.device)
    with torch.inference_mode():
        out = lm.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                pad_token_id=pad)
    return out[:, width:].tolist()


class Traces:
    """Each engine arm's exit levels (one per generated token) and its gate checks and steps."""

    def __init__(self) -> None:
        self.levels: dict[str, list[int]] = {}
        self.checks: dict[str, int] = {}
        self.stats: dict[str, list[Stats]] = {}  # each timed call's Stats
        self.warm: set[str] = set()  # arms whose first call (time_arms' warm-up, not counted) was seen
        self.graphs: dict[str, Any] = {}  # decoder variant -> its SegmentGraphs (captures, a capture's error)
        self.weights: dict[str, dict[str, Any]] = {}  # weight format -> its decoder's weights report

    def record(self, name: str, generations: list[Generation]) -> list[list[int]]:
        """An arm's generations (its tokens returned); the arm's first call is the warm-up, not recorded."""
        if name not in self.warm:
            self.warm.add(name)
            return [g.tokens for g in generations]
        for g in generations:
            self.levels.setdefault(name, []).extend(t.exit_layer for t in g.trace)
            self.checks[name] = self.checks.get(name, 0) + g.stats.exit_checks
            self.stats.setdefault(name, []).append(g.stats)
        return [g.tokens for g in generations]

    def report(self, num_layers: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {
            name: {"exit_levels": lv, "num_layers": num_layers, "checks_per_token": self.checks[name] / max(len(lv), 1),
                   "exit_rate": sum(x < num_layers for x in lv) / max(len(lv), 1)} for name, lv in self.levels.items()}
        for variant, g in self.graphs.items():
            out[f"graphs{variant}"] = {"captured": g.captured, "capture": g.capture, "capture_error": g.capture_error,
                                       "segments": len(g.segments)}
        return out


def engine_arms(lm: CausalLM, jump: LowRankJumps, learned: LearnedGate | None, exits: ExitSettings,
                exact: ExitSettings, new_tokens: int, compile: bool, graphs: bool = False, batch_size: int = 1,
                traces: Traces | None = None, quantization: Quantization = "none") -> dict[str, Callable[[Any], Any]]:
    """Full depth, approximate and exact mode as arms (and compiled or graphed copies), recording their
    generations in ``traces``. With ``batch_size`` > 1 an arm takes a batch of prompts (the engine's continuous
    batch of that size). At a ``quantization`` other than "none" the arms are named ``off@int8`` and so on."""
    from shortcuts.engine.decoder import EarlyExitDecoder
    from shortcuts.engine.settings import GenerationSettings

    traces = traces or Traces()
    arms: dict[str, Callable[[Any], Any]] = {}
    variants: list[tuple[str, dict[str, bool]]] = [("", {"graphs": False})]  # the eager engine
    variants += [("_compiled", {"compile": True, "graphs": False})] if compile else []
    variants += [("_graphs", {"graphs": True})] if graphs else []
    tag = "" if quantization == "none" else f"@{quantization}"
    for suffix, kw in variants:
        dec = EarlyExitDecoder(lm, jump, learned_gate=learned, quantization=quantization, **kw)  # type: ignore[arg-type]
        if kw.get("compile"):
            print(f"compiled blocks in {dec.compile_seconds:.1f}s", file=sys.stderr)
        if dec.runner.graphs is not None:
            traces.graphs[tag + suffix] = dec.runner.graphs
        traces.weights.setdefault(quantization, dec.weights_report())
        batch = dec.batch(batch_size) if batch_size > 1 else None
        runs: tuple[tuple[Mode, ExitSettings], ...] = (("off", exits), ("approximate", exits), ("exact", exact))
        for mode, setting in runs:
            s = GenerationSettings(max_new_tokens=new_tokens, stop_token_ids=(), exit=replace(setting, mode=mode))
            name = mode + tag + suffix
            if batch is None:
                arms[name] = lambda ids, d=dec, s=s, n=name: traces.record(n, [d.generate(ids, s)])[0]  # type: ignore[misc]
            else:
                arms[name] = lambda b, bd=batch, s=s, n=name: traces.record(n, bd.generate(b, s))  # type: ignore[misc]
    return arms


def draft_report(stats: list[Stats]) -> dict[str, Any]:
    """Exact mode's drafts over the timed calls: drafted and accepted tokens by source, full-depth passes
    (verifications), and tokens decided per pass."""
    drafted: dict[str, int] = {}
    accepted: dict[str, int] = {}
    for st in stats:
        for into, counts in ((drafted, st.drafted_by), (accepted, st.accepted_by)):
            for source, n in counts.items():
                into[source] = into.get(source, 0) + n
    passes = sum(st.verifications for st in stats)
    tokens = passes + sum(accepted.values())
    return {"drafted": drafted, "accepted": accepted,
            "acceptance": {k: round(accepted.get(k, 0) / n, 4) for k, n in drafted.items() if n},
            "verifications": passes, "tokens_per_verification": round(tokens / passes, 3) if passes else None}


def summarize(timed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    off = [t for seq in timed["off"]["tokens"] for t in seq]
    tok_s, same = {}, {}
    for name, r in timed.items():
        flat = [t for seq in r["tokens"] for t in seq]
        tok_s[name] = len(flat) / r["seconds"]
        same[name] = sum(a == b for a, b in zip(flat, off, strict=False)) / max(len(off), 1)
    return {"tok_s": tok_s, "speedup": {n: v / tok_s["off"] for n, v in tok_s.items()}, "same_as_off": same}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from shortcuts.adapter import CausalLM
    from shortcuts.artifact import JumpArtifact
    from shortcuts.engine.decoder import DEFAULT_MAX_SEQ_LEN
    from shortcuts.engine.learned_gate import LearnedGate
    from shortcuts.placement import parse_device_map
    from shortcuts.prompts import read_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    artifact = JumpArtifact.load(args.jump)
    device_map = parse_device_map(args.device_map) if args.device_map else None
    lm = CausalLM.load(args.model, dtype=args.dtype, device=args.device, device_map=device_map)
    artifact.check_model(lm)
    stored = StoredCalibration.from_extra(artifact.extra)
    modes = resolve_modes(stored, overrides(args), lm.num_layers, DENSE)
    context = getattr(lm.config, "max_position_embeddings", None) or lm.config.n_positions
    room = min(int(context), DEFAULT_MAX_SEQ_LEN) - args.new_tokens - 1  # what the engine's context leaves
    prompts = read_prompts(lm, args.prompts, args.max_prompts, max_tokens=room)
    precisions = parse_quantizations(args.quantization)
    weights_gb = torch.cuda.memory_allocated() / 2**30 if lm.device.type == "cuda" else None
    bs = args.batch_size
    arms: dict[str, Callable[[Any], Any]] = {
        "hf_generate": (lambda ids: hf_generate(lm, ids, args.new_tokens)) if bs == 1
        else (lambda b: hf_generate_batch(lm, b, args.new_tokens))}
    if bs == 1:  # HF's prompt lookup generates one sequence at a time
        arms["hf_prompt_lookup"] = lambda ids: hf_generate(lm, ids, args.new_tokens,
                                                           prompt_lookup_num_tokens=PROMPT_LOOKUP_TOKENS)
    traces = Traces()
    learned = LearnedGate.from_extra(artifact.extra)
    settings: dict[str, dict[str, Any]] = {}
    for q in precisions:
        at = modes if q == DENSE else resolve_modes(stored, overrides(args), lm.num_layers, q)
        settings[q] = {m: r.report() for m, r in at.items()}
        arms.update(engine_arms(lm, artifact.jump.to(lm.device), learned, at["approximate"].settings,
                                at["exact"].settings, args.new_tokens, args.compile, args.graphs, bs, traces,
                                quantization=q))
    if args.llama_cpp:
        if bs != 1:
            raise ValueError("--llama-cpp times one prompt at a time (--batch-size 1)")
        arms["llama_cpp"] = llama_cpp_arm(args.llama_cpp, args.new_tokens, torch.get_num_threads())
    units: list[Any] = prompts if bs == 1 else [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
    failed: dict[str, str] = {}
    timed = time_arms(arms, units, failed if args.keep_going else None)
    for name, error in failed.items():
        print(f"bench: arm {name} failed and is left out: {error}", file=sys.stderr)
    if bs > 1:  # one list of tokens per prompt, as at batch 1
        for r in timed.values():
            r["tokens"] = [seq for batch in r["tokens"] for seq in batch]
    result = summarize(timed)
    result["quantization"] = quantization_report(result, precisions, traces, settings, args.compile)
    if args.llama_cpp and "llama_cpp" in result["tok_s"]:
        result["llama_cpp"] = {"gguf": str(args.llama_cpp), "tok_s": result["tok_s"]["llama_cpp"],
                               "same_as_none": result["same_as_off"]["llama_cpp"],
                               "file_mb": round(Path(args.llama_cpp).stat().st_size / 2**20, 1)}
    memory = None if weights_gb is None else {"weights": weights_gb, "peak": torch.cuda.max_memory_allocated() / 2**30}
    return {**result, "setting": modes["approximate"].report(), "exact_setting": modes["exact"].report(),
            "exact_drafts": draft_report(traces.stats.get("exact", [])),
            **({"exact_graphs_drafts": draft_report(traces.stats["exact_graphs"])} if "exact_graphs" in traces.stats
               else {}),
            "model": str(args.model), "jump": str(args.jump), "placement": lm.placement().describe(),
            "num_layers": lm.num_layers, "prompts": len(prompts), "batch_size": bs,
            "new_tokens": args.new_tokens, "threads": torch.get_num_threads(), "dtype": args.dtype,
            "gpu_memory_gb": memory, "traces": traces.report(lm.num_layers), "failed_arms": failed}


def parse_quantizations(spec: str) -> list[Quantization]:
    """``none,int8,int4`` -> the weight formats, the dense model's first (every other is compared with it)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if bad := [n for n in names if n not in QUANTIZATIONS]:
        raise ValueError(f"--quantization {spec!r}: {', '.join(bad)} not among {', '.join(QUANTIZATIONS)}")
    return [DENSE, *dict.fromkeys(n for n in names if n != DENSE)]  # type: ignore[list-item]


def quantization_report(result: dict[str, Any], precisions: list[Quantization], traces: Traces,
                        settings: dict[str, dict[str, Any]], compiled: bool) -> dict[str, dict[str, Any]]:
    """Per weight format: its full depth's tok/s (and compiled), the share of its tokens equal to the dense
    model's full depth, its matrices' megabytes and self-check, its exits' speed over its own full depth."""
    tok_s, same = result["tok_s"], result["same_as_off"]
    out: dict[str, dict[str, Any]] = {}
    for q in precisions:
        tag = "" if q == DENSE else f"@{q}"
        off = f"off{tag}"
        if off not in tok_s:  # the arm failed (--keep-going)
            continue
        w = traces.weights.get(q, {})
        entry: dict[str, Any] = {"tok_s": tok_s[off], "same_as_none": same[off], "weights_mb": w.get("weights_mb"),
                                 "self_check": w.get("self_check"), "settings": settings.get(q),
                                 "exits_vs_full_depth": {m: tok_s[f"{m}{tag}"] / tok_s[off]
                                                         for m in ("approximate", "exact") if f"{m}{tag}" in tok_s}}
        if compiled and f"{off}_compiled" in tok_s:
            entry["tok_s_compiled"] = tok_s[f"{off}_compiled"]
            entry["same_as_none_compiled"] = same[f"{off}_compiled"]
        out[q] = entry
    return out


def llama_cpp_arm(gguf: str | Path, new_tokens: int, threads: int) -> Callable[[list[int]], list[int]]:
    """An arm continuing a prompt's token ids with llama.cpp (llama-cpp-python), greedily, exactly
    ``new_tokens`` tokens (EOS ignored, as every arm), on ``threads`` threads; the GGUF holds the same
    model (its vocabulary is the model's, so the token ids compare)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("--llama-cpp needs llama-cpp-python: pip install 'onejump[llama]' (it builds llama.cpp, "
                          "about 40 minutes on two cores)") from e
    if not Path(gguf).is_file():
        raise FileNotFoundError(f"--llama-cpp: GGUF file not found: {gguf}")
    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)

    def arm(ids: list[int]) -> list[int]:
        out: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new_tokens:
                break
        return out

    return arm


def text_report(r: dict[str, Any]) -> str:
    keys = ("gate", "threshold", "min_layer", "stride", "source")
    setting = {k: r["setting"][k] for k in keys}
    exact = {k: r["exact_setting"][k] for k in (*keys, "max_draft", "draft", "ngram_min", "ngram_max")}
    lines = [f"{r['prompts']} prompts x {r['new_tokens']} tokens, {r['threads']} thread(s), on {r['placement']}, "
             f"setting {setting}, exact {exact}",
             f"{'arm':<22} {'tok/s':>8} {'vs off':>7} {'same as off':>12}"]
    for name, v in r["tok_s"].items():
        lines.append(f"{name:<22} {v:8.2f} {r['speedup'][name]:7.2f} {r['same_as_off'][name]:12.3f}")
    d = r.get("exact_drafts")
    if d:
        lines.append(f"exact drafts: drafted {d['drafted']}, accepted {d['accepted']}, "
                     f"{d['tokens_per_verification']} tokens per full-depth pass")
    quant = r.get("quantization") or {}
    if len(quant) > 1:
        lines.append(f"{'weights':<10} {'MB':>7} {'tok/s':>8} {'vs none':>8} {'same as none':>13}")
        base = quant[DENSE]["tok_s"]
        for q, e in quant.items():
            lines.append(f"{q:<10} {e['weights_mb'] or 0:7.1f} {e['tok_s']:8.2f} {e['tok_s'] / base:8.2f} "
                         f"{e['same_as_none']:13.3f}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction, model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("bench", help="time HF generate, full depth, approximate and exact side by side on prompts")
    model_args(p)
    p.add_argument("--jump", required=True, help="jump artifact (its stored exit setting is timed)")
    p.add_argument("--device-map", default=None, help="one model over several devices instead of --device: "
                   "cuda:0,cuda:1 (blocks split evenly), auto, balanced, sequential, or a JSON map (docs/scale.md)")
    p.add_argument("--prompts", required=True, help="a prompt file: .jsonl lines {\"text\": ...} or {\"messages\": "
                   "[...]} (a chat request: the model's chat template), or text, one prompt per line")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="also time the engine arms with compiled blocks")
    p.add_argument("--graphs", action="store_true",
                   help="also time the engine arms through CUDA graphs (*_graphs)")
    p.add_argument("--keep-going", action="store_true",
                   help="leave out an arm that fails (its error in failed_arms) instead of stopping")
    p.add_argument("--batch-size", type=int, default=1,
                   help="prompts decoded together (the engine's continuous batch; HF generate left-padded)")
    p.add_argument("--gate", choices=GATES, default=None, help="exit flags: override the artifact's stored setting")
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--min-layer", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--draft", choices=DRAFT_POLICIES, default=None, help="exact mode's draft source (default: the "
                   "artifact's calibrated policy, else auto)")
    p.add_argument("--max-draft", type=int, default=None)
    p.add_argument("--ngram-min", type=int, default=None)
    p.add_argument("--ngram-max", type=int, default=None)
    p.add_argument("--quantization", default="none", help="comma-separated weight formats to time side by side (of "
                   f"{', '.join(QUANTIZATIONS)}; the dense model's always): every arm at each (docs/quantization.md)")
    p.add_argument("--llama-cpp", default=None, metavar="FILE.gguf",
                   help="also time llama.cpp on this GGUF of the same model (llama-cpp-python: the llama extra)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
