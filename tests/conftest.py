"""Fixtures: tiny random Hugging Face models of every supported architecture, built here, with a
real (word-level) tokenizer; and the real SmolLM2 from the asset cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from support.models import ARCHS, WORDS, build_tiny, save_tiny
from support.server import StepGate

from shortcuts.adapter import CausalLM


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Decoding is latency-bound and tiny models gain nothing from threads; on a busy 2-core machine
    (CI, a fit in the background) two OpenMP threads run these tests up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=ARCHS)
def tiny_lm(request: pytest.FixtureRequest) -> CausalLM:
    return build_tiny(request.param)


@pytest.fixture
def make_tiny() -> Callable[..., CausalLM]:
    return build_tiny


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama folder a test module's servers share."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture
def word_corpus(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(n),), generator=g))
             for n in torch.randint(4, 12, (200,), generator=g)]
    path = tmp_path / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def step_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[StepGate]:
    """The in-process servers' token steps wait for ``step_gate.open()`` (opened at the end in any case)."""
    gate = StepGate()
    gate.install(monkeypatch)
    yield gate
    gate.open()


@pytest.fixture(scope="session")
def smollm2() -> CausalLM:
    from shortcuts.assets import default_model_dir

    folder = default_model_dir()
    if not (folder / "config.json").exists():
        pytest.fail(f"the real SmolLM2 is missing at {folder}: run `make assets` (or `onejump assets`) first")
    return CausalLM.load(folder)
