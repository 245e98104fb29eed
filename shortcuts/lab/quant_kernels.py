"""One token's matrices at each weight format and kernel, one thread (issue 20): every matrix of a model
(the fused q/k/v and gate/up, o, down of every block, and the head) multiplied by one row, methods
interleaved repeat by repeat; each method's error against the dense product.

    python -m shortcuts.lab.quant_kernels --model .cache/onejump/models/smollm2-135m-instruct \\
        --out docs/quantization/kernels-smollm2.json

Methods: the engine's formats eagerly (``none``: oneDNN-packed float32; ``int8``/``int4``: torch's kernels,
bf16 activations), and traced by torch.compile (``*_compiled``: ``none`` and ``int8`` become one fused
float32 reduction per matrix; ``int4`` keeps torch's kernel), plus fbgemm's dynamic int8 (int8 activations
too, not an engine format: it does not trace) for reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shortcuts.engine.settings import Quantization
from shortcuts.engine.weights import head_format, prepare_linear


def matrices(folder: str) -> list[torch.Tensor]:
    """Every (out, in) matrix one decoding step reads, fused as the engine fuses them, float32."""
    sd = load_file(str(Path(folder) / "model.safetensors"))
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("model.layers.")})
    out = []
    for i in layers:
        p = f"model.layers.{i}."
        out += [torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]), sd[p + "self_attn.o_proj.weight"],
                torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
                sd[p + "mlp.down_proj.weight"]]
    out.append(sd.get("lm_head.weight", sd["model.embed_tokens.weight"]))
    return [m.float().contiguous() for m in out]


def fbgemm(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = (w.abs().amax(1).clamp_min(1e-12) / 127).double()
        qw = torch.quantize_per_channel(w, s, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def methods(mats: list[torch.Tensor]) -> dict[str, list[Callable[[torch.Tensor], torch.Tensor]]]:
    out: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    formats: tuple[Quantization, ...] = ("none", "int8", "int4")
    for q in formats:  # the head (last) in the engine's head format: int4's is int8
        fmts = [q] * (len(mats) - 1) + [head_format(q)]
        out[q] = [prepare_linear(m, None, f) for m, f in zip(mats, fmts, strict=True)]
        dense = [prepare_linear(m, None, f, pack=False) for m, f in zip(mats, fmts, strict=True)]
        fn = torch.compile(lambda x, lin: lin(x), dynamic=False)
        out[f"{q}_compiled"] = [lambda x, lin=lin, fn=fn: fn(x, lin) for lin in dense]  # type: ignore[misc]
    out["fbgemm_dynamic_int8"] = [fbgemm(m) for m in mats]
    return out


@torch.inference_mode()
def run(mats: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    arms = methods(mats)
    g = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1, k, generator=g) for k in {m.shape[1] for m in mats}}
    errors = {}
    for name, fns in arms.items():
        ys = [fn(xs[m.shape[1]]) for fn, m in zip(fns, mats, strict=True)]  # also compiles
        errors[name] = max(float((y.float() - xs[m.shape[1]] @ m.T).norm() / (xs[m.shape[1]] @ m.T).norm())
                           for y, m in zip(ys, mats, strict=True))
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):
        for name, fns in arms.items():
            t0 = time.perf_counter()
            for fn, m in zip(fns, mats, strict=True):
                fn(xs[m.shape[1]])
            times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {"ms_per_token": ms, "vs_none": {k: ms["none"] / v for k, v in ms.items()},
            "largest_relative_error": errors, "matrices": len(mats),
            "parameters_m": sum(m.numel() for m in mats) / 1e6}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shortcuts.lab.quant_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    torch._dynamo.config.cache_size_limit = 64
    result = {"model": a.model, **run(matrices(a.model), a.repeats)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    for k, v in result["ms_per_token"].items():
        print(f"{k:<22} {v:8.2f} ms  x{result['vs_none'][k]:.2f}  error {result['largest_relative_error'][k]:.4f}")


if __name__ == "__main__":
    main()
