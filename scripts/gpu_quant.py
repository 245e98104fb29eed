"""The weight formats on a GPU (issue 20), in one short run: each format's product against its dequantized
matrix and its speed at one row and 64 rows (CUDA events), then every tiny model family at every format
(the self-check, exact mode equal to full depth, exits, CUDA-graph captures). JSON to argv[1].

    PYTHONPATH=.:tests python3 scripts/gpu_quant.py runs/gpu/quant.json

The real model's formats side by side: ``onejump bench --device cuda --dtype bfloat16 --graphs
--quantization none,int8,int4,bnb-8bit,bnb-4bit`` (scripts/gpu_check.sh's model stage first).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

import torch

FORMATS = ("none", "int8", "int4", "bnb-8bit", "bnb-4bit")


def kernels() -> dict[str, Any]:
    from shortcuts.engine.weights import prepare_linear

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    out: dict[str, Any] = {}
    for q in FORMATS:
        try:
            lin = prepare_linear(w, None, q)  # type: ignore[arg-type]
            deq = w.float() if q == "none" else lin.dequantized().float()
            error = float((deq - w.float()).norm() / w.float().norm())
            row: dict[str, Any] = {"format": lin.format, "weight_error": error, "mb": lin.nbytes / 2**20}
            for rows in (1, 64):
                x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
                y = lin(x).float()
                ref = x.float() @ deq.T
                row[f"product_error_{rows}"] = float((y - ref).norm() / ref.norm())
                for _ in range(5):
                    lin(x)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(100):
                    lin(x)
                end.record()
                torch.cuda.synchronize()
                row[f"us_{rows}"] = start.elapsed_time(end) * 10  # ms/100 -> us
            out[q] = row
        except Exception as e:  # noqa: BLE001 - a check reports what failed and goes on
            out[q] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        print(q, out[q], flush=True)
    return out


def tiny(archs: list[str]) -> dict[str, Any]:
    from conftest import build_tiny
    from support.models import fitted_jump, prompt_ids, settings, sharpen

    from shortcuts.adapter import CausalLM
    from shortcuts.engine.decoder import EarlyExitDecoder

    out: dict[str, Any] = {}
    for arch in archs:
        base = sharpen(build_tiny(arch))
        jump = fitted_jump(base, rank=16)
        for q in FORMATS:
            key = f"{arch}/{q}"
            try:
                base.model.to("cuda", torch.bfloat16)
                lm = CausalLM(base.model, base.tokenizer, base.name)
                dec = EarlyExitDecoder(lm, jump.to("cuda"), quantization=q)  # type: ignore[arg-type]
                ids = prompt_ids(lm)
                off = dec.generate(ids, settings(16, mode="off")).tokens
                exact = dec.generate(ids, settings(16, mode="exact", threshold=0.3)).tokens
                approx = dec.generate(ids, settings(16, mode="approximate", threshold=0.3))
                batch = dec.batch(3).generate([ids, ids[:5], ids[:9]], settings(16, mode="exact", threshold=0.3))
                graphs = dec.runner.graphs
                out[key] = {"self_check": None if dec.self_check is None else dec.self_check.to_dict(),
                            "exact_equals_off": exact == off, "batch_first_equals_off": batch[0].tokens == off,
                            "exits": min(t.exit_layer for t in approx.trace) < lm.num_layers,
                            "graphs_captured": None if graphs is None else graphs.captured,
                            "capture_error": None if graphs is None else graphs.capture_error}
            except Exception as e:  # noqa: BLE001
                out[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            print(key, out[key], flush=True)
    return out


def main() -> None:
    import bitsandbytes

    result = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
              "gpu": torch.cuda.get_device_name(0), "kernels": kernels(),
              "tiny": tiny(sys.argv[2].split(",") if len(sys.argv) > 2 else ["llama", "gemma3_text"])}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
