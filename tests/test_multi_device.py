"""One model split over several devices (accelerate device maps), on a machine with one CPU.

torch has one CPU device, so the tests give the engine two *device keys* instead:
``torch.device("cpu", 0)`` and ``torch.device("cpu", 1)`` are different devices to every dict and
comparison in the engine (so it makes a copy of the exit head, the rotary tables and a moved call
per key, and moves the states at the cut), while tensors sent to either land in CPU memory. A
recording dispatch mode then maps every storage an op reads back to its owner (block weights,
KV buffers, exit-head copies, rotary copies, the full head) and checks that a token which exits
at level l read nothing owned by a later device; a second mode carries each tensor's device key
through every op and checks that no op takes tensors of both block devices (which real GPUs
refuse, and the CPU does not notice). Real GPUs have not run this (docs/scale.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.models import build_tiny, fitted_jump, sharpen
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from shortcuts.adapter import CausalLM
from shortcuts.engine.decoder import EarlyExitDecoder
from shortcuts.engine.settings import ExitSettings, GenerationSettings
from shortcuts.engine.weights import linear_tensors
from shortcuts.jump import LowRankJumps
from shortcuts.placement import (
    OffloadError,
    Placement,
    device_list,
    map_device,
    refuse_offload,
    resolve_map,
    split_map,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU0, CPU1 = torch.device("cpu", 0), torch.device("cpu", 1)
PROMPTS = ["the king of the north city was old", "a river of gold and the sea", "the band and the song"]


def two_devices(lm: CausalLM, cut: int = 2) -> list[torch.device]:
    """Blocks 0..cut-1 on "cpu:0", the rest on "cpu:1", as the engine sees them."""
    devices = [CPU0] * cut + [CPU1] * (lm.num_layers - cut)
    lm.block_devices = lambda: devices  # type: ignore[method-assign]
    return devices


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[CausalLM, CausalLM, LowRankJumps]:
    """The same sharpened tiny Llama twice: plain, and loaded with a device map (blocks split over
    two CPU entries, accelerate's hooks installed as a multi-GPU load would), seen as two devices."""
    from accelerate import dispatch_model

    plain = sharpen(build_tiny("llama"))
    folder = Path(tmp_path_factory.mktemp("split")) / "tiny"
    plain.model.save_pretrained(folder)
    plain.tokenizer.save_pretrained(folder)
    split = CausalLM.load(folder, device_map="cpu,cpu")
    dispatch_model(split.model, split_map(split.config, ["cpu", "cpu"]), main_device="cpu", force_hooks=True)
    assert hasattr(split.layers[0], "_hf_hook")
    two_devices(split)
    return plain, split, fitted_jump(plain)


def gen_settings(mode: str, threshold: float, kv_policy: str = "catchup", **kw: Any) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": 20, **kw}, stop_token_ids=(),
                              exit=ExitSettings(mode=mode, threshold=threshold, kv_policy=kv_policy))


# --- the plan, from names alone -------------------------------------------------------------------------
def test_split_map_cuts_the_blocks_evenly_over_named_devices() -> None:
    from support.models import tiny_config

    config = tiny_config("llama", layers=5)  # untied head
    m = split_map(config, ["cuda:0", "cuda:1"])
    assert [m[f"model.layers.{i}"] for i in range(5)] == ["cuda:0"] * 3 + ["cuda:1"] * 2
    assert (m["model.embed_tokens"], m["model.norm"], m["lm_head"]) == ("cuda:0", "cuda:1", "cuda:1")
    assert resolve_map("cuda:0, cuda:1", config) == m
    plan = Placement.from_map(config, m)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert plan.blocks == (cuda0,) * 3 + (cuda1,) * 2
    assert [plan.check(level) for level in range(1, 5)] == [cuda0, cuda0, cuda0, cuda1]  # level 3 reads block 3
    assert plan.head == cuda1
    assert plan.stages() == [(cuda0, range(0, 3)), (cuda1, range(3, 5))]
    assert plan.describe() == "blocks 0-2 on cuda:0, 3-4 on cuda:1, head on cuda:1"
    with torch.device("meta"):  # every weight of the model has an entry (what accelerate needs)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    assert {str(map_device(m, n.rpartition(".")[0])) for n, _ in model.named_parameters()} == {"cuda:0", "cuda:1"}


def test_a_tied_head_stays_with_the_embedding_and_integers_are_cuda() -> None:
    from support.models import tiny_config

    config = tiny_config("gpt2", layers=4)  # GPT-2 ties lm_head to wte
    m = split_map(config, [0, 1])
    assert m["transformer.wte"] == m["lm_head"] == 0
    assert m["transformer.ln_f"] == 1
    plan = Placement.from_map(config, m)
    assert plan.head == torch.device("cuda", 0)
    assert plan.devices == [torch.device("cuda", 0), torch.device("cuda", 1)]


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("", ValueError, "one or more"),
    ("cuda:0,disk", OffloadError, "disk"),
    ("cuda:0,gpu7", ValueError, "'gpu7' in device map"),
])
def test_device_lists_are_checked(spec: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        device_list(spec)


def test_offloading_is_refused_by_name(tmp_path: Path) -> None:
    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(OffloadError, match=r"\(the whole model\) -> disk"):
        CausalLM.load(tmp_path, device_map={"": "disk"})
    with pytest.raises(OffloadError, match="model.norm -> meta"):
        CausalLM.load(tmp_path, device_map={"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "meta",
                                            "model.rotary_emb": "cpu", "lm_head": "cpu"})
    with pytest.raises(OffloadError, match=r"model.layers.3.mlp.up_proj.weight \(meta\)"):  # accelerate's CPU offload
        refuse_offload({"model.layers.3": "cpu"}, ["model.layers.3.mlp.up_proj.weight"])
    assert resolve_map("balanced", lm.config) == "balanced"


# --- the engine over two device keys ---------------------------------------------------------------------
def test_each_check_has_its_head_copy_on_its_blocks_device(models: tuple[CausalLM, CausalLM, LowRankJumps]) -> None:
    _, split, jump = models
    dec = EarlyExitDecoder(split, jump)
    assert dec.runner.blocks.devices == (CPU0, CPU0, CPU1, CPU1)
    head = dec.exit_head
    assert [head.levels[level].device for level in (1, 2, 3)] == [CPU0, CPU0, CPU1]
    assert head.levels[1].M is head.levels[2].M  # one copy per device for a bank of one jump
    assert head.levels[1].M is not head.levels[3].M
    assert head.levels[1].A_T is head.levels[2].A_T
    ptr = [head.levels[level].A_T.untyped_storage().data_ptr() for level in (1, 3)]  # type: ignore[union-attr]
    assert ptr[0] != ptr[1]
    assert set(dec.runner.rope) == {CPU0, CPU1}
    identity = EarlyExitDecoder(split, None, check=False).exit_head
    assert identity.levels[3].head is not identity.levels[1].head  # the logit lens copies W_U and the norm
    assert identity.levels[3].norm is not identity.levels[1].norm


@pytest.mark.parametrize(("mode", "kv_policy"), [("approximate", "catchup"), ("approximate", "copy"),
                                                 ("exact", "catchup")])
def test_split_model_decodes_token_identically(models: tuple[CausalLM, CausalLM, LowRankJumps], mode: str,
                                               kv_policy: str) -> None:
    """Alone and in a batch, greedy, exits on: the same tokens and the same exit levels."""
    plain, split, jump = models
    ref, dec = EarlyExitDecoder(plain, jump), EarlyExitDecoder(split, jump)
    ids = [plain.tokenizer(p).input_ids for p in PROMPTS]
    levels: set[int] = set()
    for threshold in (0.3, 0.6):
        s = gen_settings(mode, threshold, kv_policy)
        for p in ids:
            a, b = ref.generate(p, s), dec.generate(p, s)
            assert a.tokens == b.tokens
            assert [t.exit_layer for t in a.trace] == [t.exit_layer for t in b.trace]
            levels |= {t.exit_layer for t in b.trace}
        together = dec.batch(3).generate(ids, s)
        assert [g.tokens for g in together] == [ref.generate(p, s).tokens for p in ids]
    assert levels & {1, 2}  # tokens left on device 0
    assert split.num_layers in levels  # others went to the top
    assert mode == "exact" or 3 in levels  # and on device 1 (exact mode: only the drafts the top accepted show)


def test_split_model_samples_like_the_plain_one(models: tuple[CausalLM, CausalLM, LowRankJumps]) -> None:
    plain, split, jump = models
    s = gen_settings("exact", 0.3, temperature=0.8, seed=5)
    ids = plain.tokenizer(PROMPTS[0]).input_ids
    ours = EarlyExitDecoder(split, jump).generate(ids, s)
    assert ours.tokens == EarlyExitDecoder(plain, jump).generate(ids, s).tokens
    assert ours.stats.drafted > 0


# --- what a step reads -----------------------------------------------------------------------------------
def storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    if t.is_mkldnn:
        return "id", id(t)  # oneDNN-packed weights have no storage; the op gets the tensor itself
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return "ptr", t.untyped_storage().data_ptr()


class StorageReads(TorchDispatchMode):
    """The storages every op reads (its tensor arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: set[tuple[str, int]] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for a in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(a, torch.Tensor) and (key := storage_key(a)) is not None:
                self.keys.add(key)
        return func(*args, **(kwargs or {}))


def owners(dec: EarlyExitDecoder, cache: Any, devices: list[torch.device]) -> dict[tuple[str, int], tuple[str, Any]]:
    """storage -> (what, where): block weights and KV buffers by block, head and rotary copies by
    device, the full head ("full")."""
    out: dict[tuple[str, int], tuple[str, Any]] = {}

    def own(tensors: Any, owner: tuple[str, Any]) -> None:
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor) and (key := storage_key(t)) is not None:
                assert out.setdefault(key, owner) == owner, (owner, out[key])

    for i, w in enumerate(dec.runner.blocks.weights):
        own(list(w), ("block", i))
        own([cache.keys[i], cache.values[i]], ("kv", i))
    for head in dec.exit_head.levels.values():
        own(head.tensors(), ("head", head.device))
    for dev, tables in dec.runner.rope.items():
        own(list(tables.values()), ("rope", dev))
    own([*linear_tensors(dec.runner.head), dec.runner.final_norm.weight], ("full", None))
    return out


def device_of(owner: tuple[str, Any], devices: list[torch.device]) -> torch.device:
    what, where = owner
    return devices[where] if what in ("block", "kv") else devices[-1] if what == "full" else where


@pytest.mark.parametrize("mode", ["approximate", "exact"])
def test_an_exited_token_reads_nothing_of_a_later_device(models: tuple[CausalLM, CausalLM, LowRankJumps],
                                                         mode: str) -> None:
    """Every step of a decode, recorded: a token that leaves at level l reads only blocks 1..l and
    their KV buffers, the head copy on block l's device, and nothing on a later device (no full
    head). Steps that reach the top do read block L and the full head (the recording sees them)."""
    _, split, jump = models
    devices = split.block_devices()
    dec = EarlyExitDecoder(split, jump)
    batch = dec.single
    L = split.num_layers
    seq = batch.add(split.tokenizer(PROMPTS[0]).input_ids, gen_settings(mode, 0.4, max_new_tokens=24))
    assert [out.seq for out in batch.step()] == [seq]  # the first token's report: nothing is decoded
    table = owners(dec, batch.cache, devices)
    seen: dict[int, int] = {}
    while not seq.done:
        skipped = seq.stats.layers_skipped
        with StorageReads() as reads:
            batch.step()
        level = L - (seq.stats.layers_skipped - skipped)
        read = {table[k] for k in reads.keys if k in table}
        seen[level] = seen.get(level, 0) + 1
        blocks = {i for what, i in read if what == "block"}
        assert blocks == set(range(level)), (level, read)
        assert {i for what, i in read if what == "kv"} <= blocks
        if level < L:
            assert ("full", None) not in read
            assert ("head", devices[level - 1]) in read  # the check at l used the copy on l's device
            assert {device_of(o, devices) for o in read} <= set(devices[:level]), (level, read)
        else:
            assert ("full", None) in read
            assert ("block", L - 1) in read
    assert any(level <= 2 for level in seen), seen  # exits on device 0
    assert L in seen, seen  # and full-depth steps


# --- the server setting ----------------------------------------------------------------------------------
def test_the_device_map_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from service.config import Settings, parse_args
    from service.loading import load_decoder

    assert parse_args(["--device-map", "cuda:0,cuda:1"]).device_map_value == ["cuda:0", "cuda:1"]
    assert Settings(device_map="0,1").device_map_value == [0, 1]
    assert Settings(device_map=" ").device_map is None
    assert Settings(device_map='{"": "cuda:1"}').device_map_value == {"": "cuda:1"}
    monkeypatch.setenv("ONEJUMP_DEVICE_MAP", "balanced")
    assert parse_args([]).device_map_value == "balanced"
    for bad, match in (("cuda:0,disk", "offloads to disk"), ('{"model.norm": "meta"}', "model.norm -> meta"),
                       ("{nope", "not valid JSON"), ("gpu0", "not a device")):
        with pytest.raises(ValidationError, match=match):
            Settings(device_map=bad)
    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    decoder, _ = load_decoder(Settings(model=str(tmp_path), jump="", device_map="cpu,cpu"))
    ids = lm.tokenizer(PROMPTS[0]).input_ids
    off = gen_settings("off", 1.0)
    assert decoder.generate(ids, off).tokens == EarlyExitDecoder(lm, None).generate(ids, off).tokens


# --- no op mixes two devices -----------------------------------------------------------------------------
class VirtualDevices(TorchDispatchMode):
    """Each tensor carries the device key it would live on (``tags``): a move (``.to(key)``, which
    dispatches a copy because the key is not the tensor's real device) or a factory call with a
    ``device=key`` sets it, any other op passes its inputs' key on. An op whose non-scalar inputs
    carry two different keys is recorded in ``mixed``: on real GPUs it would raise. Tensors with no
    key are on the plain CPU, the model's main device here (embeddings, the full head, host-made
    indices), and mix with anything: the check is that the two block devices never meet."""

    def __init__(self) -> None:
        from torch.utils.weak import WeakTensorKeyDictionary

        super().__init__()
        self.tags = WeakTensorKeyDictionary()
        self.mixed: list[tuple[str, set[torch.device]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        keys = {self.tags.get(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim()}
        keys.discard(None)
        if len(keys) > 1:
            self.mixed.append((str(func), keys))
        out = func(*args, **kwargs)
        dev = kwargs.get("device")
        key = (dev if dev.index is not None else None) if isinstance(dev, torch.device) else \
            next(iter(keys)) if len(keys) == 1 else None
        if key is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self.tags[t] = key
        return out


class MovesToMain(TorchFunctionMode):
    """``t.to("cpu")`` of a keyed tensor is a move to the main device (on GPUs, the LM head's
    device, say), though torch sees no move: the result loses its key."""

    def __init__(self, devices: VirtualDevices) -> None:
        super().__init__()
        self.devices = devices

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.Tensor.to and isinstance(out, torch.Tensor):
            target = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, torch.device | str)]
            if target and torch.device(target[0]) == torch.device("cpu"):
                out = out.view_as(out) if out is args[0] else out
                self.devices.tags.pop(out, None)
        return out


@pytest.mark.parametrize(("mode", "kv_policy"), [("approximate", "catchup"), ("approximate", "copy"),
                                                 ("exact", "catchup")])
def test_no_op_mixes_two_devices(models: tuple[CausalLM, CausalLM, LowRankJumps], mode: str, kv_policy: str) -> None:
    """The engine built and run with the blocks' weights keyed cpu:0 / cpu:1: no op of loading,
    prefill, checks, catch-up, copy fills, verification or sampling takes tensors of both."""
    _, split, jump = models
    devices = split.block_devices()
    ids = [split.tokenizer(p).input_ids for p in PROMPTS]
    with VirtualDevices() as vd, MovesToMain(vd):
        for layer, dev in zip(split.layers, devices, strict=True):
            for p in layer.parameters():
                vd.tags[p] = dev
        dec = EarlyExitDecoder(split, jump, check=False)
        for threshold in (0.3, 0.6):
            s = gen_settings(mode, threshold, kv_policy, temperature=0.7, seed=1) if mode == "exact" else \
                gen_settings(mode, threshold, kv_policy)
            dec.generate(ids[0], s)
            dec.batch(3).generate(ids, s)
    assert vd.mixed == []
    assert set(vd.tags.values()) >= {CPU0, CPU1}


def test_bench_takes_a_device_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from support.models import tiny_artifact

    from shortcuts.cli import main

    lm = build_tiny("llama")
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    jump = tiny_artifact(lm).save(tmp_path / "jump.safetensors")
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n")
    assert main(["bench", "--model", str(tmp_path / "tiny"), "--jump", str(jump), "--prompts",
                 str(tmp_path / "prompts.txt"), "--new-tokens", "4", "--device-map", "cpu,cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["placement"] == "cpu"  # two CPU entries are one device to torch
    assert result["prompts"] == 2


@pytest.mark.parametrize("arch", ["gemma3_text", "gpt2"])  # rotary per layer type and sliding windows; positions
def test_other_architectures_split_the_same_way(arch: str) -> None:
    plain = sharpen(build_tiny(arch))
    split = sharpen(build_tiny(arch))
    devices = two_devices(split)
    jump = fitted_jump(plain)
    ids = [plain.tokenizer(p).input_ids for p in PROMPTS]
    ref = EarlyExitDecoder(plain, jump)
    with VirtualDevices() as vd, MovesToMain(vd):
        for layer, dev in zip(split.layers, devices, strict=True):
            for p in layer.parameters():
                vd.tags[p] = dev
        dec = EarlyExitDecoder(split, jump, check=False)
        levels: set[int] = set()
        for mode in ("approximate", "exact"):
            s = gen_settings(mode, 0.4)
            gens = dec.batch(3).generate(ids, s)
            assert [g.tokens for g in gens] == [ref.generate(p, s).tokens for p in ids]
            levels |= {t.exit_layer for g in gens for t in g.trace}
    assert levels & {1, 2}  # tokens left on the first device
    assert vd.mixed == []
    assert set(dec.runner.rope) == {CPU0, CPU1}


def test_a_sequence_has_one_generator_per_device() -> None:
    """Draws happen where the logits are: a second device gets its own generator, seeded from the
    sequence's seed, the same one at every later draw there."""
    from shortcuts.engine.sequence import SequenceRun

    def run(seed: int | None) -> SequenceRun:
        return SequenceRun(0, 3, GenerationSettings(seed=seed, temperature=1.0, exit=ExitSettings(mode="off")), 4, 64,
                           (3,), device="cpu")

    seq = run(7)
    assert seq.generator_on(torch.device("cpu")) is seq.generator
    other = seq.generator_on(CPU1)
    assert other is not seq.generator
    assert seq.generator_on(CPU1) is other
    draws = [torch.rand(4, generator=g).tolist() for g in (seq.generator, other)]
    assert draws[0] != draws[1]  # not the same stream twice
    again = run(7)
    assert torch.rand(4, generator=again.generator_on(CPU1)).tolist() == draws[1]
