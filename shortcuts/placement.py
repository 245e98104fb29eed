"""One model over several devices: accelerate device maps, and where the engine puts what.

A *device map* (accelerate's, passed to ``from_pretrained``) says on which device each module of
the model lives. onejump takes one of:

- a strategy: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate places the
  modules by the free memory it sees);
- a list of devices, spelled ``"cuda:0,cuda:1"`` (or ``["cuda:0", "cuda:1"]``): ``split_map`` cuts the
  decoder blocks into that many consecutive runs of (almost) equal size, one per device, in order;
  what comes before the blocks (embeddings) goes to the first device, the final norm to the last
  one, the LM head to the last one unless it shares its weight with the embedding (then the first);
- a dict of module name -> device, given as is.

The early-exit engine reads the weights directly (its own block math), so every weight must be
in a device's memory: a map that offloads modules to ``"disk"`` or ``"meta"`` (or, on a GPU map,
to ``"cpu"``: accelerate keeps those weights on the meta device and streams them in) is refused
by name with ``OffloadError``.

``Placement`` is where the engine runs each stage: block i on its weights' device, the exit check
after block l on block l's device (the exit head keeps a copy of its small tensors there), the
full head on the LM head's device. A token that exits at level l touches only the devices of
blocks 1..l. ``Placement.from_map`` gives the same plan from a device map's names alone, without
the devices (``onejump`` has been tested on CPUs only: docs/scale.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shortcuts.architectures import arch_spec
from shortcuts.errors import OnejumpError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD = ("disk", "meta")
Device = int | str | torch.device
DeviceMap = str | Sequence[Device] | Mapping[str, Device]


class OffloadError(OnejumpError):
    """A device map that leaves weights outside device memory (disk, meta, CPU offload)."""


def device_list(spec: str | Sequence[Device]) -> list[Device]:
    """``"cuda:0,cuda:1"`` (or ``"0,1"``, or a list) -> the devices, at least one, none of them an
    offload target; a bare integer is a CUDA index (accelerate's spelling)."""
    items: list[Device] = [int(s) if s.strip().isdigit() else s.strip() for s in spec.split(",")] \
        if isinstance(spec, str) else list(spec)
    if not items or any(d == "" for d in items):
        raise ValueError(f"a device list needs one or more comma-separated devices (cuda:0,cuda:1); got {spec!r}")
    bad = [d for d in items if str(d) in OFFLOAD]
    if bad:
        raise OffloadError(f"device map {spec!r} offloads to {', '.join(map(str, bad))}: the engine reads the weights "
                           "directly, so every module must be on a device (cuda:N or cpu)")
    for d in items:
        try:
            as_device(d)
        except RuntimeError:
            raise ValueError(f"{d!r} in device map {spec!r} is not a device (cuda:0, cuda:1, 0, cpu, ...)") from None
    return items


def parse_device_map(text: str) -> DeviceMap:
    """A device map as a user writes it (a setting, a flag): a strategy name, a JSON object
    ``{"module": device}``, or a comma-separated device list. Offload targets are refused."""
    text = text.strip()
    if text in STRATEGIES:
        return text
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the device map is not valid JSON: {e}") from None
        if not isinstance(value, dict) or not all(isinstance(d, int | str) for d in value.values()):
            raise ValueError("a JSON device map is an object of module name -> device (\"cuda:1\" or 1)")
        refuse_offload(value)
        return value
    return device_list(text)


def map_main_device(device_map: DeviceMap) -> str:
    """The device a map starts on (embeddings, the first blocks), for defaults such as the dtype:
    a strategy means CUDA when there is one."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return "cuda" if torch.cuda.is_available() else "cpu"
    items = device_list(device_map) if not isinstance(device_map, Mapping) else list(device_map.values())
    return str(as_device(items[0]))


def resolve_map(device_map: DeviceMap, config: Any) -> str | dict[str, Device]:
    """What ``from_pretrained(device_map=...)`` gets: a strategy name as is, a device list as
    ``split_map``, a dict after checking that it offloads nothing."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, Mapping):
        refuse_offload(dict(device_map))
        return dict(device_map)
    return split_map(config, device_list(device_map))


def refuse_offload(hf_map: Mapping[str, Device], meta: Sequence[str] = ()) -> None:
    """``OffloadError`` naming the modules a (resolved) device map puts on disk or meta, and the
    parameters left on the meta device (accelerate's CPU offload)."""
    off = [f"{name or '(the whole model)'} -> {dev}" for name, dev in hf_map.items() if str(dev) in OFFLOAD]
    if not off and not meta:
        return
    shown = off[:4] or [f"{p} (meta)" for p in meta[:4]]
    more = len(off or meta) - len(shown)
    raise OffloadError(f"the device map offloads weights ({', '.join(shown)}{f' and {more} more' if more else ''}): "
                       "onejump's engine reads the weights directly and cannot serve offloaded modules. Give every "
                       "module a device with room for it (e.g. ONEJUMP_DEVICE_MAP=cuda:0,cuda:1), or more devices")


def _module_names(config: Any) -> tuple[str, list[str], bool]:
    """The decoder stack's path, its children's names in order, and whether lm_head is tied to the
    embedding; from a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    spec = arch_spec(config.model_type)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config)
    stack = spec.layers.rpartition(".")[0]
    children = [name for name, _ in dict(model.named_modules())[stack].named_children()]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return stack, children, tied


def split_map(config: Any, devices: Sequence[Device]) -> dict[str, Device]:
    """A device map that splits the decoder blocks evenly over ``devices``, in order (the first
    devices take one block more when they do not divide evenly). Module names as accelerate wants
    them (``model.layers.3``), every module with weights named once."""
    devices = device_list(devices)
    layers_path = arch_spec(config.model_type).layers
    stack, children, tied = _module_names(config)
    layers_child = layers_path.rpartition(".")[2]
    n = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
    if len(devices) > n:
        raise ValueError(f"{len(devices)} devices for {n} blocks: give at most one device per block")
    per, extra = divmod(n, len(devices))
    owner = [k for k in range(len(devices)) for _ in range(per + (k < extra))]
    first, last = devices[0], devices[-1]
    out: dict[str, Device] = {}
    before = True
    for child in children:
        if child == layers_child:
            out.update({f"{layers_path}.{i}": devices[owner[i]] for i in range(n)})
            before = False
        else:
            out[f"{stack}.{child}"] = first if before else last
    out["lm_head"] = first if tied else last
    return out


def map_device(device_map: Mapping[str, Device], module: str) -> torch.device:
    """The device a map gives ``module``: the entry of its longest prefix (accelerate's rule)."""
    best = max((k for k in device_map if k == "" or module == k or module.startswith(k + ".")), key=len,
               default=None)
    if best is None:
        raise ValueError(f"the device map has no entry for {module}")
    return as_device(device_map[best])


def as_device(device: Device) -> torch.device:
    """accelerate's spelling (an int is a CUDA index) as a torch.device."""
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


@dataclass(frozen=True)
class Placement:
    """Where each stage of the engine runs: ``blocks[i]`` block i (0-based), ``head`` the full head
    (the LM head's device). The exit check after block l (level l, 1-based) runs on ``blocks[l-1]``."""

    blocks: tuple[torch.device, ...]
    head: torch.device

    def check(self, level: int) -> torch.device:
        """The device of the exit check at ``level`` (1..L-1): that of the block whose state it reads."""
        return self.blocks[level - 1]

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, in the order the blocks reach them, the head's last."""
        return list(dict.fromkeys([*self.blocks, self.head]))

    def stages(self) -> list[tuple[torch.device, range]]:
        """Runs of consecutive blocks on one device: (device, block indices)."""
        out: list[tuple[torch.device, range]] = []
        start = 0
        for i in range(1, len(self.blocks) + 1):
            if i == len(self.blocks) or self.blocks[i] != self.blocks[start]:
                out.append((self.blocks[start], range(start, i)))
                start = i
        return out

    def describe(self) -> str:
        """``cuda:0`` on one device; ``blocks 0-14 on cuda:0, 15-29 on cuda:1, head on cuda:1`` on several."""
        if len(self.devices) == 1:
            return str(self.head)
        runs = [f"{r.start}-{r.stop - 1} on {dev}" if len(r) > 1 else f"{r.start} on {dev}" for dev, r in self.stages()]
        return f"blocks {', '.join(runs)}, head on {self.head}"

    @classmethod
    def from_map(cls, config: Any, device_map: Mapping[str, Device]) -> Placement:
        """The plan a device map gives, from its names alone (no model, no devices needed)."""
        layers = arch_spec(config.model_type).layers
        n = int(getattr(config, "num_hidden_layers", None) or config.n_layer)
        return cls(tuple(map_device(device_map, f"{layers}.{i}") for i in range(n)), map_device(device_map, "lm_head"))
