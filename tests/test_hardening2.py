"""Issue 22's findings (the second hardening pass), each kept as a regression test, over a real socket on
the tiny random Llama where one fits: token-id keys and text parsed in one place (no 500), stop strings and
logit_bias bounded (and /health answering during the worst request the limits allow), a client that leaves
stopping its prompt scoring and prefill within a chunk, the OpenAPI schema saying what /metrics is, the
mixed prompt list's message, safe defaults (no key beyond loopback refused; the key from a file), a jump of
another model refused before the weights load, the default paths found from any folder, and the work
exits really save counted."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from support.deploy import free_port
from support.server import metric, openai_error, post, running_server, tiny_settings

from service.config import Settings, is_loopback
from service.protocol import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MAX_STOP_STRINGS, parse_token_id
from service.text import StopMatcher, TextAssembler

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_settings(tiny_model_dir, queue_size=16, max_batch_size=8)) as url:
        yield url


# ---------------------------------------------------------------- A: one parser for token-id keys

ODD_KEYS = ["\u00b2", "\u2460", "1" * 5000, "\u0663", "\uff11", "-1", "+1", " 1", "1 ", "01", "1e3", "1.0", "", "0x1",
            "1" * 10]


@pytest.mark.parametrize("key", ODD_KEYS, ids=[f"key{i}" for i in range(len(ODD_KEYS))])
def test_a_logit_bias_key_that_is_not_a_token_id_gets_a_400(server: str, key: str) -> None:
    """``str.isdigit`` took "²" and "①" (and a 5,000-digit key), which ``int`` refused: a 500."""
    for path, prompt in (("/v1/completions", {"prompt": "the"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the"}]})):
        err = openai_error(post(server, prompt | {"max_tokens": 1, "logit_bias": {key: 1}}, path), 400)
        assert err["param"] == "logit_bias", err
        assert "token ids" in err["message"], err
        assert len(err["message"]) < 300, err  # a 5,000-digit key is not echoed whole


def test_token_id_keys_parse_to_ints() -> None:
    assert [parse_token_id(k) for k in ("0", "7", "49151", "999999999")] == [0, 7, 49151, 999_999_999]
    for key in ODD_KEYS:
        with pytest.raises(ValueError, match="token ids"):
            parse_token_id(key)


def test_logit_bias_is_bounded_and_served(server: str) -> None:
    body = {"prompt": "the", "max_tokens": 3, "ignore_eos": True}
    err = openai_error(post(server, body | {"logit_bias": {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)}}), 400)
    assert f"at most {MAX_LOGIT_BIAS}" in err["message"]
    assert err["param"] == "logit_bias"
    err = openai_error(post(server, body | {"logit_bias": {"5": 101}}), 400)
    assert "[-100, 100]" in err["message"]
    err = openai_error(post(server, body | {"logit_bias": {"64": 1}}), 400)  # the tiny vocabulary has 64 ids
    assert "outside the vocabulary" in err["message"]
    every = {str(i): -100.0 for i in range(64)} | {"21": 100.0}  # the whole vocabulary: one token left
    r = post(server, body | {"logit_bias": every, "temperature": 1.0, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"].split() == [r.json()["choices"][0]["text"].split()[0]] * 3


# ---------------------------------------------------------------- B: one text check on every route

SURROGATES = [
    ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', "messages.0.content"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "a", "name": "\\ud800"}]}', "messages.0.name"),
    ("/tokenize", b'{"prompt": "the", "model": "\\ud800"}', "model"),
    ("/v1/completions", b'{"prompt": "the", "suffix": "\\ud800"}', "suffix"),
    ("/v1/completions", b'{"prompt": "the", "user": "\\ud800"}', "user"),
    ("/v1/completions", b'{"prompt": ["the", "\\udbff"]}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages.0.content.0.text"),
    ("/v1/chat/completions", b'{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "1", '
     b'"function": {"name": "f", "arguments": "\\ud800"}}]}]}', "messages.0.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "the"}], "stop": ["\\ud800"]}', "stop.0"),
]


@pytest.mark.parametrize(("path", "body", "param"), SURROGATES)
def test_a_lone_surrogate_gets_a_400_on_every_route(server: str, path: str, body: bytes, param: str) -> None:
    err = openai_error(post(server, body, path), 400)
    assert "lone surrogate" in err["message"], err
    assert err["param"] == param, err


# ---------------------------------------------------------------- the prompt's forms

@pytest.mark.parametrize(("prompt", "needle"), [
    (["the", [5, 6]], "mixes strings and token-id lists"),
    ([5, "the"], "mixes strings and token ids"),
    ([[5], 6], "mixes token ids and token-id lists"),
    (5, "must be a string, a list of token ids"),
    ({"text": "the"}, "must be a string"),
    ([None], "got a list of null"),
    ([5, -1], "item 1: token ids are integers >= 0"),
    ([[5], [True]], "item 1: item 0: token ids are integers >= 0"),
    (["the", ""], "item 1: a prompt must not be empty"),
    ([], "got an empty list"),
])
def test_the_prompts_form_is_named_in_plain_words(server: str, prompt: object, needle: str) -> None:
    """A mixed ids-and-text list got pydantic's ``prompt.str: Input should be a valid string``."""
    err = openai_error(post(server, {"prompt": prompt, "max_tokens": 1}), 400)
    assert needle in err["message"], err
    assert err["param"] == "prompt"
    assert "Input should" not in err["message"], err
    assert "prompt.str" not in err["message"], err


def test_union_tags_never_reach_the_message(server: str) -> None:
    err = openai_error(post(server, {"prompt": "the", "stop": 5}), 400)
    assert err["param"] == "stop", err
    assert "[" not in err["message"].split(":")[0], err


# ---------------------------------------------------------------- S1: stop strings, bounded and incremental

def test_stop_strings_are_limited(server: str) -> None:
    body = {"prompt": "the", "max_tokens": 1}
    err = openai_error(post(server, body | {"stop": ["x"] * (MAX_STOP_STRINGS + 1)}), 400)
    assert err["param"] == "stop", err
    assert str(MAX_STOP_STRINGS) in err["message"]
    err = openai_error(post(server, body | {"stop": "x" * (MAX_STOP_CHARS + 1)}), 400)
    assert str(MAX_STOP_CHARS) in err["message"], err
    assert post(server, body | {"stop": ["x" * MAX_STOP_CHARS] * MAX_STOP_STRINGS}).status_code == 200


class CharTokenizer:
    """Token i decodes to ``pieces[i]``; the text is their concatenation."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def _reference(text: str, stops: list[str]) -> int | None:
    """Where the text is cut: the earliest start among the stop strings found in the shortest prefix
    (token boundary) that holds one."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def test_the_incremental_matcher_cuts_where_a_full_search_would() -> None:
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3))) for _ in range(6)]
        ids = [rng.randrange(6) for _ in range(rng.randint(1, 12))]
        text = TextAssembler(CharTokenizer(pieces), StopMatcher(stops))
        shown, expected = "", None
        for k in range(len(ids)):
            shown += text.add(ids[k])
            expected = _reference("".join(pieces[i] for i in ids[: k + 1]), stops)
            if text.stopped:
                break
            assert not any(s in shown for s in stops), (stops, shown)
        shown += text.finish()
        full = "".join(pieces[i] for i in ids[: k + 1])
        assert text.stopped == (expected is not None), (stops, pieces, ids)
        assert shown == text.text == (full[:expected] if expected is not None else full), (stops, pieces, ids)


def test_a_stream_holds_back_only_the_partial_match() -> None:
    """The old assembler held back the longest stop string's length - 1 characters at every token."""
    text = TextAssembler(CharTokenizer(["hello ", "wo", "rld"]), ["y" * 1000, "wox"])
    assert text.add(0) == "hello "  # no stop string begins here: all of it shows (the old one held 999 characters)
    assert text.add(1) == ""  # "wo" may begin "wox"
    assert text.add(2) == "world"  # it did not


def test_a_multibyte_character_is_held_until_complete() -> None:
    text = TextAssembler(CharTokenizer(["caf", "\ufffd", "\u00e9"]), [])
    assert text.add(0) == "caf"
    assert text.add(1) == ""


# ---------------------------------------------------------------- /health during the worst single requests

def _health_during(url: str, path: str, body: dict) -> tuple[list[float], httpx.Response]:
    """/health latencies (s), asked back to back while the request runs; at least one must have been taken
    while it was in flight, else the test measured nothing."""
    done: list[httpx.Response] = []
    busy = threading.Thread(target=lambda: done.append(post(url, body, path)))
    times: list[float] = []
    busy.start()
    while busy.is_alive():
        t0 = time.perf_counter()
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        if busy.is_alive():  # the probe ended while the request still ran
            times.append(time.perf_counter() - t0)
        time.sleep(0.01)
    busy.join()
    assert times, "no /health probe was taken while the request ran"
    return times, done[0]


WORST = {  # each within the body limit and every documented limit, 16 choices
    "stop strings": ("/v1/completions", {"prompt": "the", "n": 16, "max_tokens": 100, "ignore_eos": True,
                                         "stop": [(f"{i} " + "the city " * 200)[:MAX_STOP_CHARS]
                                                  for i in range(MAX_STOP_STRINGS)]}),
    "logit_bias": ("/v1/completions", {"prompt": "the", "n": 16, "max_tokens": 100, "ignore_eos": True,
                                       "temperature": 1.0, "logit_bias": {str(i): 0.5 for i in range(64)},
                                       "repetition_penalty": 1.2, "frequency_penalty": 0.5}),
    "echo logprobs": ("/v1/completions", {"prompt": [[7] * 127] * 16, "echo": True, "logprobs": 20,
                                          "max_tokens": 0}),
    "chat logprobs": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the city " * 50}],
                                               "n": 16, "max_tokens": 20, "logprobs": True, "top_logprobs": 20,
                                               "ignore_eos": True}),
}


@pytest.mark.timing
@pytest.mark.parametrize("case", list(WORST))
def test_health_answers_during_the_worst_request(server: str, case: str) -> None:
    path, body = WORST[case]
    assert len(json.dumps(body)) < 4 * 2**20
    times, r = _health_during(server, path, body)
    assert r.status_code == 200, r.text
    print(f"\n{case}: /health max {max(times):.3f}s over {len(times)} probes during the request")
    assert max(times) < 1.0, (case, max(times), len(times))


# ---------------------------------------------------------------- S3: a client that leaves stops its work

@pytest.fixture
def slow_blocks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """5 ms per block call: a chunk of the tiny model's 4 blocks takes 20 ms, whatever its length. Returns
    the time (time.monotonic) each block call ended."""
    from shortcuts.engine.runner import LayerRunner

    block, calls = LayerRunner.block, []

    def slow(self: LayerRunner, *args: object) -> object:
        time.sleep(0.005)
        out = block(self, *args)
        calls.append(time.monotonic())
        return out

    monkeypatch.setattr(LayerRunner, "block", slow)
    return calls


def _leave_after(url: str, body: dict, seconds: float) -> float:
    """Sends ``body``, hangs up after ``seconds``; returns when it hung up (time.monotonic)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=seconds))
    return time.monotonic()


@pytest.mark.timing
@pytest.mark.parametrize("kind", ["scoring", "prefill"])
def test_a_client_that_leaves_stops_its_work_within_a_chunk(tiny_model_dir: Path, slow_blocks: list[float],
                                                            kind: str) -> None:
    """16 prompts of 120 tokens in chunks of 8: 15 chunks (0.3 s) each, 4.8 s in all. The client leaves after
    0.6 s; the chunk in progress ends and nothing else runs (scoring went on for 31 s in the issue)."""
    settings = tiny_settings(tiny_model_dir, queue_size=16, max_batch_size=16, prefill_chunk_tokens=8)
    body = {"prompt": [[7] * 120] * 16, "max_tokens": 0 if kind == "scoring" else 4, "echo": kind == "scoring",
            "logprobs": 1 if kind == "scoring" else None}
    with running_server(settings) as url:
        left = _leave_after(url, body, 0.6)
        deadline = left + 30
        while metric(url, "onejump_request_failure_total", reason="cancelled") < (1 if kind == "scoring" else 16):
            assert time.monotonic() < deadline, "the work was never cancelled"
            time.sleep(0.01)
        time.sleep(0.2)  # ten more chunks' time: nothing may run
        last = slow_blocks[-1]
        assert post(url, {"prompt": "the", "max_tokens": 1}).status_code == 200  # the worker is free
    took = max(last - left, 0.0)
    print(f"\n{kind}: the last block of the cancelled work ended {took:.3f}s after the client left")
    assert took < 1.0, took  # one chunk is 20 ms; 4.2 s of work were left when it hung up


def test_prefill_in_chunks_decodes_as_one_pass(tiny_lm) -> None:  # noqa: ANN001 (conftest fixture)
    """A prompt prefilled 5 tokens at a time gives the tokens of one pass, and scoring likewise."""
    from shortcuts.engine import EarlyExitDecoder, ExitSettings, GenerationSettings

    dec = EarlyExitDecoder(tiny_lm)
    prompt = [(7 * i) % 60 + 4 for i in range(23)]
    s = GenerationSettings(max_new_tokens=6, stop_token_ids=(), exit=ExitSettings(mode="off"))
    whole = dec.batch(1)
    a = whole.add(prompt, s, chunk=256)
    chunked = dec.batch(1)
    b = chunked.add(prompt, s, chunk=5)
    while not (a.done and b.done):
        whole.step()
        chunked.step()
    assert a.generation.tokens == b.generation.tokens
    one, five = dec.score(prompt, 3), dec.score(prompt, 3, chunk=5)
    assert len(one) == len(five) == len(prompt) - 1
    for (x, tx), (y, ty) in zip(one, five, strict=True):
        assert x == pytest.approx(y, abs=1e-4)
        assert [t for t, _ in tx] == [t for t, _ in ty]


def test_a_stop_between_chunks_raises_cancelled(tiny_lm) -> None:  # noqa: ANN001
    from shortcuts.engine import EarlyExitDecoder
    from shortcuts.errors import Cancelled

    dec = EarlyExitDecoder(tiny_lm)
    asked: list[int] = []
    with pytest.raises(Cancelled, match="after 8 of 30"):
        dec.score(list(range(4, 34)), stop=lambda: asked.append(1) or len(asked) > 2, chunk=4)
    batch = dec.batch(1)
    with pytest.raises(Cancelled):
        batch.add(list(range(4, 34)), stop=lambda: True, chunk=4)
    assert batch.free_slots == 1  # the slot stays free


# ---------------------------------------------------------------- the published schema

def test_openapi_says_metrics_is_prometheus_text(server: str) -> None:
    doc = httpx.get(f"{server}/openapi.json").json()
    content = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    (kind,) = content
    assert kind.startswith("text/plain"), content
    r = httpx.get(f"{server}/metrics")
    assert r.headers["content-type"] == kind
    assert "# TYPE onejump_layers_saved_total counter" in r.text


def test_openapi_states_the_limits(server: str) -> None:
    schemas = httpx.get(f"{server}/openapi.json").json()["components"]["schemas"]
    bias = next(s for s in schemas["CompletionRequest"]["properties"]["logit_bias"]["anyOf"] if s["type"] == "object")
    assert bias["maxProperties"] == MAX_LOGIT_BIAS
    assert bias["propertyNames"]["pattern"].startswith("^(0|[1-9]")
    stop = json.dumps(schemas["CompletionRequest"]["properties"]["stop"])
    assert f'"maxItems": {MAX_STOP_STRINGS}' in stop
    assert f'"maxLength": {MAX_STOP_CHARS}' in stop
    assert schemas["TokenizeRequest"]["oneOf"] == [{"required": ["prompt"]}, {"required": ["messages"]}]


# ---------------------------------------------------------------- work saved, not only skipped

def test_layers_saved_counts_what_was_never_computed(server: str) -> None:
    before = metric(server, "onejump_layers_saved_total")
    off = post(server, {"prompt": "the king", "max_tokens": 6, "ignore_eos": True}).json()["early_exit"]
    assert (off["layers_skipped"], off["layers_saved"]) == (0, 0)
    body = {"prompt": "the king", "max_tokens": 6, "ignore_eos": True,
            "early_exit": {"mode": "approximate", "threshold": 0.0}}
    report = post(server, body).json()["early_exit"]
    L = report["num_layers"]
    # 5 tokens fed after the first, each exits at layer 1; catch-up takes the pending ones deeper only when a
    # token climbs past them, which none does: every skipped block is saved, and computed + saved = L x fed
    assert report["layers_saved"] == report["layers_skipped"] == 5 * (L - 1)
    assert report["layers_computed"] + report["layers_saved"] == 5 * L
    assert metric(server, "onejump_layers_saved_total") - before == report["layers_saved"]


def test_layers_skipped_help_says_catch_up_computes_them_later(server: str) -> None:
    text = httpx.get(f"{server}/metrics").text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("# HELP onejump_layers_skipped_total")]
    assert "later" in line, line
    assert "saved by exits" not in line, line


# ---------------------------------------------------------------- safe by default

@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_hosts_need_no_key(host: str) -> None:
    assert is_loopback(host)
    assert Settings(host=host).api_key is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])  # noqa: S104
def test_a_host_beyond_loopback_without_a_key_is_refused(host: str, tmp_path: Path) -> None:
    for no_key in ({}, {"api_key": ""}, {"api_key": "  "}, {"api_key_file": str(tmp_path / "empty")}):
        (tmp_path / "empty").write_text("\n")
        with pytest.raises(ValidationError, match="ONEJUMP_ALLOW_UNAUTHENTICATED=true"):
            Settings(host=host, **no_key)
    assert Settings(host=host, allow_unauthenticated=True).api_key is None  # allowed by name
    assert Settings(host=host, api_key="k").api_key is not None


def test_the_key_comes_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key"
    key.write_text("  s3cret\n")
    monkeypatch.setenv("ONEJUMP_API_KEY_FILE", str(key))
    s = Settings(host="0.0.0.0")  # noqa: S104
    assert s.api_key is not None
    assert s.api_key.get_secret_value() == "s3cret"
    with pytest.raises(ValidationError, match="not both"):
        Settings(api_key="other")
    with pytest.raises(ValidationError, match="cannot be read"):
        Settings(api_key_file=str(tmp_path / "missing"))


@pytest.mark.subprocess
def test_the_server_refuses_to_start_beyond_loopback_without_a_key(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEJUMP_")} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "service", "--model", str(tiny_model_dir), "--jump", "", "--host",
                          "0.0.0.0", "--port", "0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "no API key is set" in out.stderr
    assert "ONEJUMP_ALLOW_UNAUTHENTICATED=true" in out.stderr
    assert "loaded" not in out.stderr


def test_a_file_key_guards_the_routes(tiny_model_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    with running_server(tiny_settings(tiny_model_dir, api_key_file=str(key))) as url:
        openai_error(post(url, {"prompt": "the", "max_tokens": 1}), 401)
        r = post(url, {"prompt": "the", "max_tokens": 1}, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, r.text


# ---------------------------------------------------------------- start-up: before the model loads

def test_a_jump_of_another_model_is_refused_before_the_weights_load(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Same depth and width, another MLP: the config half of the fingerprint differs; nothing loads."""
    from support.models import build_tiny, save_tiny, tiny_artifact, tiny_config
    from transformers import AutoModelForCausalLM

    from service.loading import preflight
    from shortcuts.adapter import CausalLM

    jump = tiny_artifact(build_tiny("llama")).save(tmp_path / "jump.safetensors")
    same = save_tiny(tmp_path / "same")
    preflight(Settings(model=str(same), jump=str(jump)))  # its own model passes
    other = tmp_path / "other"
    config = tiny_config("llama")
    config.intermediate_size = 48
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    build_tiny("llama").tokenizer.save_pretrained(other)
    monkeypatch.setattr(CausalLM, "load", lambda *a, **k: pytest.fail("the weights loaded"))
    with pytest.raises(ValueError, match="configuration differs"):
        preflight(Settings(model=str(other), jump=str(jump)))


def test_agreement_checks_the_prompts_file_before_the_model_loads(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from shortcuts import cli
    from shortcuts.adapter import CausalLM

    monkeypatch.setattr(CausalLM, "load", lambda *a, **k: pytest.fail("the model loaded"))
    jump = ROOT / "docs/results/smollm2-135m/jump.safetensors"
    assert cli.main(["agreement", "--jump", str(jump), "--prompts", "missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "missing.jsonl: no such file" in err
    assert "onejump assets" not in err


@pytest.mark.subprocess
def test_the_default_artifacts_are_found_from_any_folder(tmp_path: Path) -> None:
    """As the onejump command finds them: the server started elsewhere than the checkout."""
    code = ("from service.config import Settings; from shortcuts.assets import default_model_dir; s = Settings(); "
            "print(s.model); print(s.jump); print(default_model_dir())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEJUMP_")} | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=60)
    model, jump, found = out.stdout.split()
    assert model == found  # what the CLI uses
    assert Path(jump).is_file(), jump
    assert Path(jump) == ROOT / "docs/results/smollm2-135m/jump.safetensors"


# ---------------------------------------------------------------- drain: a real SIGTERM to a real process

LAUNCH = """
import sys, time
from shortcuts.engine.batch import BatchDecoder
from shortcuts.engine.runner import LayerRunner
step, block = BatchDecoder.step, LayerRunner.block
BatchDecoder.step = lambda self: (time.sleep(0.05), step(self))[1]  # 50 ms a token
LayerRunner.block = lambda self, *a: (time.sleep(0.005), block(self, *a))[1]  # 20 ms a chunk of 4 blocks
from service.__main__ import run
run(sys.argv[1:])
"""


def _serve(folder: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEJUMP_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "--model", str(folder), "--jump", "", "--device", "cpu",
                             "--port", str(port), "--max-new-tokens", "120", "--prefill-chunk-tokens", "8", *flags],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the server never became ready"
        try:
            if httpx.get(f"{url}/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def _raw(conn: object, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """One request on an http.client connection (kept alive between calls)."""
    import http.client

    assert isinstance(conn, http.client.HTTPConnection)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def _during_drain(url: str, kept: object) -> list[tuple[str, int]]:
    """Every kind of request, on fresh connections and on one kept alive from before the signal."""
    seen = []
    for _ in range(3):
        for name, r in (("completion", post(url, {"prompt": "the", "max_tokens": 1})),
                        ("chat", post(url, {"messages": [{"role": "user", "content": "the"}]}, "/v1/chat/completions")),
                        ("tokenize", post(url, {"prompt": "the"}, "/tokenize")),
                        ("models", httpx.get(f"{url}/v1/models", timeout=10))):
            err = openai_error(r, 503)
            assert "shutting down" in err["message"], err
            seen.append((name, r.status_code))
        openai_error(httpx.get(f"{url}/ready", timeout=10), 503)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
        status, body = _raw(kept, "POST", "/v1/completions", {"prompt": "the", "max_tokens": 1})
        assert (status, body["error"]["code"], body["error"]["type"]) == (503, 503, "service_unavailable"), body
        seen.append(("kept-alive", status))
        time.sleep(0.1)
    return seen


@pytest.mark.subprocess
@pytest.mark.timing
@pytest.mark.slow
def test_sigterm_drains_with_the_socket_open(tiny_model_dir: Path) -> None:
    """SIGTERM during a stream: new requests on fresh and kept-alive connections get 503 with the OpenAI body,
    /ready 503, /health 200, the stream finishes, then the process exits (it refused connections before)."""
    import http.client

    proc, url = _serve(tiny_model_dir, "--shutdown-timeout-s", "20")
    try:
        kept = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
        assert _raw(kept, "GET", "/v1/models")[0] == 200  # the connection is open before the signal
        body = {"prompt": "the", "max_tokens": 40, "ignore_eos": True, "stream": True}
        frames, seen = [], []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    frames.append(line)
                if len(frames) == 2 and not seen:  # the first frame, then the first token: 2 s of work left
                    t0 = time.monotonic()
                    proc.terminate()
                    time.sleep(0.2)
                    seen = _during_drain(url, kept)
        assert frames[-1] == "data: [DONE]"
        final = json.loads(frames[-2].removeprefix("data: "))
        assert final["usage"]["completion_tokens"] == 40  # the running stream finished
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        assert len(seen) == 15
        assert took < 20, took
        with pytest.raises(httpx.TransportError):  # gone now
            httpx.get(f"{url}/health", timeout=5)
    finally:
        proc.kill()


@pytest.mark.subprocess
@pytest.mark.timing
@pytest.mark.slow
@pytest.mark.parametrize("state", ["idle", "scoring", "prefill", "queued"])
def test_sigterm_ends_within_the_shutdown_timeout_in_every_state(tiny_model_dir: Path, state: str) -> None:
    """With a 1 s grace period: work that would take 5 s more (scoring or prefilling 16 long prompts, or a
    generation with 15 more waiting behind it) is cut at 1 s; each client gets a 503; the process exits."""
    proc, url = _serve(tiny_model_dir, "--shutdown-timeout-s", "1", "--max-batch-size", "1", "--queue-size", "16")
    answers: list[httpx.Response] = []
    bodies = {"scoring": {"prompt": [[7] * 120] * 16, "echo": True, "logprobs": 1, "max_tokens": 0},
              "prefill": {"prompt": [[7] * 120] * 16, "max_tokens": 2},
              "queued": {"prompt": [[7] * 8] * 16, "max_tokens": 20, "ignore_eos": True}}
    try:
        if state != "idle":
            client = threading.Thread(target=lambda: answers.append(post(url, bodies[state])))
            client.start()
            time.sleep(0.5)
        t0 = time.monotonic()
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        if state != "idle":
            client.join(10)
            err = openai_error(answers[0], 503)
            assert "shutting down" in err["message"], err
        print(f"\n{state}: exited {took:.2f}s after SIGTERM (grace period 1 s)")
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out
        assert took < 1 + 2 + 1, (took, out)  # the grace period, the 2 s the server allows itself, slack
    finally:
        proc.kill()
