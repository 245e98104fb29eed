"""The jump artifact: one safetensors file, tensors plus JSON metadata in its header.

Metadata (key ``onejump``): format version, base model id and fingerprint, hidden size, layer
count, the level the jump was trained at, rank, variant, the OJFA score table, the corpus, and
optional extras (evaluation summary, calibrated setting, learned gate). Loading checks all of it.
A jump with per-level normalisation also stores ``level_mean`` and ``level_var`` (L-1, d) and is
written as format ``onejump.jump/2``, which older readers refuse instead of silently ignoring. A jump
whose exit head switches to the logit lens at some levels (``LowRankJumps.with_lens``) stores them as
``lens_levels`` and is written as format ``onejump.jump/3`` (older readers refuse it: they would run the
jump at those levels under a setting calibrated with the lens); this reader loads every format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from shortcuts.adapter import CausalLM, fingerprint_mismatch
from shortcuts.errors import ArtifactError
from shortcuts.jump import JumpConfig, LowRankJumps

FORMAT = "onejump.jump/1"
FORMAT_LEVEL_NORM = "onejump.jump/2"  # /1 plus per-level input statistics level_mean, level_var (L-1, d)
FORMAT_LENS = "onejump.jump/3"  # /1 or /2 plus metadata ``lens_levels``: levels whose exit head is the logit lens
FORMATS = (FORMAT, FORMAT_LEVEL_NORM, FORMAT_LENS)
_TENSORS = ("bn_weight", "bn_bias", "running_mean", "running_var", "lora_A", "lora_B", "bias")


@dataclass
class JumpArtifact:
    jump: LowRankJumps  # a bank of one
    base_model: str
    fingerprint: dict[str, Any]
    num_layers: int
    trained_level: int  # block index l (1-based) whose output the jump was trained on
    scores: list[float]  # OJFA score of the jump trained at each level 1..L-1
    corpus: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> JumpConfig:
        return self.jump.config

    def metadata(self) -> dict[str, Any]:
        c = self.config
        lens = list(self.jump.lens_levels)
        meta = {
            "format": FORMAT_LENS if lens else FORMAT if self.jump.level_norm is None else FORMAT_LEVEL_NORM,
            "base_model": self.base_model, "fingerprint": self.fingerprint,
            "hidden_size": c.hidden_size, "num_layers": self.num_layers, "trained_level": self.trained_level,
            "rank": c.rank, "variant": c.variant, "bn_eps": c.bn_eps, "scores": self.scores,
            "corpus": self.corpus, "extra": self.extra,
        }
        if lens:
            meta["lens_levels"] = lens
        return meta

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.jump.state_dict().items()}
        save_file(tensors, str(path), metadata={"onejump": json.dumps(self.metadata())})
        path.chmod(0o644)  # readable by a container's user when the folder is mounted
        return path

    @classmethod
    def load(cls, path: str | Path) -> JumpArtifact:
        meta, tensors = _read(Path(path))
        try:
            config = JumpConfig.from_variant(meta["variant"], int(meta["hidden_size"]), int(meta["rank"]))
            config.bn_eps = float(meta.get("bn_eps", config.bn_eps))
            jump = LowRankJumps(config, n=1)
            jump.load_state_dict({k: tensors[k] for k in _TENSORS})
            if "level_mean" in tensors and meta["format"] != FORMAT:
                jump = jump.with_level_norm(tensors["level_mean"], tensors["level_var"])
            jump.with_lens([int(x) for x in meta.get("lens_levels", [])])
            return cls(jump.eval(), meta["base_model"], meta["fingerprint"], int(meta["num_layers"]),
                       int(meta["trained_level"]), list(meta["scores"]), meta["corpus"], meta.get("extra", {}))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{path}: not a valid onejump jump artifact ({e})") from e

    def check_model(self, lm: CausalLM) -> None:
        """Refuse a model this jump was not trained for, saying what differs."""
        if lm.hidden_size != self.config.hidden_size or lm.num_layers != self.num_layers:
            raise ArtifactError(
                f"jump artifact is for {self.base_model} (d={self.config.hidden_size}, L={self.num_layers}), "
                f"but the model {lm.name} has d={lm.hidden_size}, L={lm.num_layers}"
            )
        if reason := fingerprint_mismatch(self.fingerprint, lm.fingerprint()):
            raise ArtifactError(f"jump artifact is for {self.base_model}, not {lm.name}: {reason}")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise ArtifactError(f"jump artifact not found: {path}")
    if not os.access(path, os.R_OK):
        st = path.stat()
        raise ArtifactError(f"jump artifact {path} exists but cannot be read: mode {st.st_mode & 0o777:o}, owner uid "
                            f"{st.st_uid}, this process runs as uid {os.getuid()} (chmod a+r {path})")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("onejump")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the safetensors file ({e})") from e
    if raw is None:
        raise ArtifactError(f"{path}: no onejump metadata; is this a jump artifact?")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupt metadata ({e})") from e
    if meta.get("format") not in FORMATS:
        raise ArtifactError(f"{path}: format {meta.get('format')!r}, expected one of {', '.join(FORMATS)}")
    return meta, tensors
