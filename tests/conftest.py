"""Fixtures: tiny random Hugging Face models of every supported architecture, built here, with a
real (word-level) tokenizer; and the real SmolLM2 from the asset cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from shortcuts.adapter import CausalLM

WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "was", "on", "for", "with", "by", "at", "from", "as", "his",
    "her", "city", "river", "king", "music", "film", "war", "first", "new", "old", "great", "small", "large",
    "north", "south", "east", "west", "year", "years", "people", "world", "state", "time", "road", "sea",
    "island", "church", "school", "army", "band", "song", "book", "game", "team", "house", "language", "art",
    "law", "power", "water", "land", "gold", "iron", "stone",
)  # 60 words + 4 special tokens: every id of the tiny models' 64-token vocabulary decodes to text
ARCHS = ("llama", "qwen2", "gemma3_text", "gpt2")


def word_tokenizer(add_bos: bool = False):
    """A real fast tokenizer with a tiny word-level vocabulary (ids 0..3 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def tiny_config(arch: str, layers: int = 4):
    from transformers import AutoConfig

    common = {"vocab_size": 64, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    kw = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128, **common}
    if arch == "gemma3_text":
        kw.update(head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    return AutoConfig.for_model(arch, **kw)


def build_tiny(arch: str, seed: int = 0, layers: int = 4) -> CausalLM:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers), dtype=torch.float32)
    with torch.no_grad():  # random norms, so the head's gain and bias matter in the tests
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return CausalLM(model, word_tokenizer(add_bos=arch == "gemma3_text"), name=f"tiny-{arch}-{seed}")


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


def save_tiny(folder: Path) -> Path:
    """A tiny Llama saved as an ordinary model folder (config, safetensors, tokenizer)."""
    lm = build_tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="session")
def smollm2() -> CausalLM:
    from shortcuts.assets import default_model_dir

    folder = default_model_dir()
    if not (folder / "config.json").exists():
        pytest.fail(f"the real SmolLM2 is missing at {folder}: run `make assets` (or `onejump assets`) first")
    return CausalLM.load(folder)
