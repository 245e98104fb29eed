"""OpenAI API parity over a real socket, on a tiny random Llama, with the real ``openai`` client
where it fits: every field of OpenAI's completions and chat requests is honoured or refused with a
400 naming it; logprobs (with each token's exit layer), echo and prompt scoring; n choices and
lists of prompts; chat content parts and tool-call turns; model names; tokenizer routes; token
accounting up to a stop string; the published OpenAPI document."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support.server import client, running_server, tiny_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "the king of the north"
EXACT = {"early_exit": {"mode": "exact", "threshold": 0.0, "draft": "exit"}}  # "auto" decides by timed costs: not fixed

# OpenAI's request fields (the API reference, 2025), each with a value that asks for something:
# "ok" fields are honoured, "refused" ones get a 400 whose param names them.
COMPLETION_FIELDS: dict[str, tuple[Any, str]] = {
    "model": ("tiny-llama", "ok"), "prompt": (PROMPT, "ok"), "best_of": (3, "refused"), "echo": (True, "ok"),
    "frequency_penalty": (1.0, "ok"), "logit_bias": ({"7": 5.0}, "ok"), "logprobs": (2, "ok"),
    "max_tokens": (3, "ok"), "n": (2, "ok"), "presence_penalty": (1.0, "ok"), "seed": (7, "ok"),
    "stop": (["zzz"], "ok"), "stream": (False, "ok"), "stream_options": ({"include_usage": True}, "ok"),
    "suffix": ("the end", "refused"), "temperature": (0.5, "ok"), "top_p": (0.9, "ok"), "user": ("u1", "ok"),
}
CHAT_FIELDS: dict[str, tuple[Any, str]] = {
    "messages": ([{"role": "user", "content": PROMPT}], "ok"), "model": ("tiny-llama", "ok"),
    "audio": ({"voice": "alloy", "format": "mp3"}, "refused"), "frequency_penalty": (1.0, "ok"),
    "function_call": ("auto", "ok"), "functions": ([{"name": "f"}], "refused"), "logit_bias": ({"7": 5.0}, "ok"),
    "logprobs": (True, "ok"), "max_completion_tokens": (3, "ok"), "max_tokens": (3, "ok"),
    "metadata": ({"k": "v"}, "refused"), "modalities": (["text", "audio"], "refused"), "n": (2, "ok"),
    "parallel_tool_calls": (False, "ok"), "prediction": ({"type": "content", "content": "x"}, "refused"),
    "presence_penalty": (1.0, "ok"), "prompt_cache_key": ("k", "ok"), "reasoning_effort": ("low", "refused"),
    "response_format": ({"type": "json_object"}, "refused"), "safety_identifier": ("s", "ok"), "seed": (7, "ok"),
    "service_tier": ("flex", "refused"), "stop": ("zzz", "ok"), "store": (True, "refused"),
    "stream": (False, "ok"), "stream_options": ({"include_usage": True}, "ok"), "temperature": (0.5, "ok"),
    "tool_choice": ("required", "refused"), "tools": ([{"type": "function", "function": {"name": "f"}}], "refused"),
    "top_logprobs": (2, "ok"), "top_p": (0.9, "ok"), "user": ("u1", "ok"), "verbosity": ("low", "refused"),
    "web_search_options": ({}, "ok"),
}
VLLM_FIELDS: dict[str, tuple[Any, str]] = {  # vLLM's sampling extensions, honoured
    "top_k": (5, "ok"), "min_p": (0.1, "ok"), "repetition_penalty": (1.3, "ok"), "ignore_eos": (True, "ok"),
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_settings(tiny_model_dir, queue_size=32, served_model_aliases="m, gpt-local")) as url:
        yield url


def post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def complete(url: str, **body: Any) -> dict[str, Any]:
    r = post(url, {"prompt": PROMPT, "max_tokens": 4} | body)
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- every field honoured or refused

@pytest.mark.parametrize(("path", "fields", "base"), [
    ("/v1/completions", COMPLETION_FIELDS | VLLM_FIELDS, {"prompt": PROMPT, "max_tokens": 2}),
    ("/v1/chat/completions", CHAT_FIELDS | VLLM_FIELDS, {"messages": [{"role": "user", "content": PROMPT}],
                                                         "max_tokens": 2}),
])
def test_every_request_field_is_honoured_or_refused(server: str, path: str, fields: dict, base: dict) -> None:
    for name, (value, expect) in fields.items():
        body = base | {name: value}
        if name == "top_logprobs":
            body["logprobs"] = True
        r = post(server, body, path)
        if expect == "ok":
            assert r.status_code == 200, (name, r.text)
        else:
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["param"] == name, (name, err)
            assert name in err["message"]
    published = set(httpx.get(f"{server}/openapi.json").json()["components"]["schemas"][
        "CompletionRequest" if path == "/v1/completions" else "ChatCompletionRequest"]["properties"])
    assert set(fields) <= published  # every field is in the published schema


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_field_is_refused_by_name(server: str, path: str) -> None:
    body = {"prompt": PROMPT, "messages": [{"role": "user", "content": PROMPT}]}
    body.pop("messages" if path == "/v1/completions" else "prompt")
    r = post(server, body | {"frobnicate": 1}, path)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "frobnicate"


def test_empty_values_of_refused_fields_ask_for_nothing(server: str) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2, "tools": [], "tool_choice": "none",
            "response_format": {"type": "text"}, "store": False, "modalities": ["text"], "service_tier": "auto"}
    assert post(server, body, "/v1/chat/completions").status_code == 200
    assert complete(server, suffix="", best_of=1)["choices"][0]["text"]


# ---------------------------------------------------------------- sampling controls over HTTP

def test_sampling_controls_change_what_is_generated(server: str) -> None:
    greedy = complete(server, max_tokens=6, ignore_eos=True)["choices"][0]["text"]
    top1 = complete(server, max_tokens=6, ignore_eos=True, temperature=1.0, top_k=1, seed=1)["choices"][0]["text"]
    assert top1 == greedy
    forced = complete(server, max_tokens=3, ignore_eos=True, logit_bias={"21": 100})["choices"][0]["text"]
    assert forced == "city city city"  # id 21 is "city" in the word tokenizer
    penalised = complete(server, max_tokens=6, ignore_eos=True, repetition_penalty=50.0)["choices"][0]["text"]
    assert len(set(penalised.split())) == 6
    for mode in ("off", "exact"):  # exact mode keeps the penalised greedy output
        body = {"max_tokens": 6, "ignore_eos": True, "frequency_penalty": 1.5, "early_exit": {"mode": mode,
                                                                                              "threshold": 0.0}}
        assert complete(server, **body)["choices"][0]["text"] == complete(server, **body | {
            "early_exit": {"mode": "off"}})["choices"][0]["text"]
    r = post(server, {"prompt": PROMPT, "logit_bias": {"999": 1.0}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logit_bias"


# ---------------------------------------------------------------- n, seeds, lists of prompts

def test_n_choices_are_seeded_and_reproducible(server: str) -> None:
    c = client(server)
    kw = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "n": 3, "seed": 11, "temperature": 1.0,
          "extra_body": {"ignore_eos": True}}
    first, again = c.completions.create(**kw), c.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    assert len({ch.text for ch in first.choices}) > 1
    one = c.completions.create(**kw | {"n": 1, "seed": 12})  # choice i uses seed + i
    assert one.choices[0].text == first.choices[1].text
    assert first.usage.completion_tokens == 18
    assert first.usage.prompt_tokens == 5


def test_streamed_choices_match_the_body(server: str) -> None:
    c = client(server)
    kw = {"model": "m", "prompt": PROMPT, "max_tokens": 5, "n": 2, "seed": 3, "temperature": 1.0}
    body = c.completions.create(**kw)
    texts = ["", ""]
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert texts == [ch.text for ch in body.choices]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == body.usage.completion_tokens


def test_prompts_as_token_ids_and_lists(server: str) -> None:
    ids = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    text = complete(server)["choices"][0]["text"]
    assert complete(server, prompt=ids)["choices"][0]["text"] == text
    many = complete(server, prompt=[PROMPT, "the war"], n=2)
    assert [ch["index"] for ch in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"] == text  # greedy
    assert complete(server, prompt=[ids, ids[:2]])["choices"][0]["text"] == text
    r = post(server, {"prompt": [5, 9999]})
    assert r.status_code == 400
    assert "vocabulary" in r.json()["error"]["message"]


# ---------------------------------------------------------------- logprobs and echo

def test_completion_logprobs_report_the_deciding_layer(server: str) -> None:
    resp = client(server).completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=5, logprobs=3,
                                             extra_body={"ignore_eos": True, **EXACT})
    lp = resp.choices[0].logprobs
    n = resp.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)
    assert lp.model_extra["exit_layers"] == resp.model_extra["early_exit"]["exit_layers"]
    off = complete(server, max_tokens=5, ignore_eos=True, logprobs=1)["choices"][0]["logprobs"]
    assert set(off["exit_layers"]) == {4}  # the full model's


def test_echo_scores_the_prompt(server: str) -> None:
    ids = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    gen = complete(server, prompt=ids, max_tokens=3, ignore_eos=True, logprobs=2)["choices"][0]
    gen_ids = httpx.post(f"{server}/tokenize", json={"prompt": gen["text"]}).json()["tokens"]
    scored = complete(server, prompt=ids + gen_ids, max_tokens=0, echo=True, logprobs=2)["choices"][0]
    assert scored["finish_reason"] == "length"
    lp = scored["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][-3:] == pytest.approx(gen["logprobs"]["token_logprobs"], abs=1e-4)
    with httpx.stream("POST", f"{server}/v1/completions", json={"prompt": ids + gen_ids, "max_tokens": 0,
                                                                 "echo": True, "logprobs": 2, "stream": True}) as r:
        frames = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    streamed = [x for f in frames for ch in f["choices"] if ch["logprobs"] for x in ch["logprobs"]["token_logprobs"]]
    assert streamed == lp["token_logprobs"]
    echoed = complete(server, max_tokens=2, echo=True)["choices"][0]["text"]
    assert echoed.startswith(PROMPT)
    r = post(server, {"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400
    assert "echo" in r.json()["error"]["message"]


def test_chat_logprobs_stream_and_body_agree(server: str) -> None:
    c = client(server)
    kw = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "logprobs": True,
          "top_logprobs": 2}
    body = c.chat.completions.create(**kw)
    content = body.choices[0].logprobs.content
    assert len(content) == body.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.model_extra["exit_layer"] == 4 for t in content)
    streamed = [t for ch in c.chat.completions.create(**kw, stream=True) for choice in ch.choices
                if choice.logprobs for t in choice.logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-5)


# ---------------------------------------------------------------- chat messages

def test_chat_content_parts_and_tool_call_turns(server: str) -> None:
    c = client(server)
    plain = c.chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
    parts = c.chat.completions.create(model="m", max_tokens=4, messages=[
        {"role": "user", "content": [{"type": "text", "text": "the king of"}, {"type": "text", "text": " the north"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    history = [{"role": "user", "content": "the city"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "the river"}]
    assert c.chat.completions.create(model="m", max_tokens=2, messages=history).choices[0].message.content
    r = post(server, {"messages": [{"role": "user", "content": None}]}, "/v1/chat/completions")
    assert r.status_code == 400
    r = post(server, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
             "/v1/chat/completions")
    assert r.status_code == 400


# ---------------------------------------------------------------- models, tokenizer, version

def test_model_names_cards_and_tokenizer_routes(server: str) -> None:
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=1)
    assert c.completions.create(model="gpt-local", prompt=PROMPT, max_tokens=1).model == "gpt-local"
    cards = httpx.get(f"{server}/v1/models").json()["data"]
    assert [m["id"] for m in cards] == ["tiny-llama", "m", "gpt-local"]
    assert {m["created"] for m in cards} == {m["created"] for m in httpx.get(f"{server}/v1/models").json()["data"]}
    card = c.models.retrieve("tiny-llama")
    assert card.model_extra["max_model_len"] > 0
    assert httpx.get(f"{server}/v1/models/gpt-4o").status_code == 404
    tok = httpx.post(f"{server}/tokenize", json={"prompt": PROMPT, "return_token_strs": True}).json()
    assert tok["count"] == len(tok["tokens"]) == 5
    assert tok["token_strs"] == PROMPT.split()
    assert httpx.post(f"{server}/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}
    chat = httpx.post(f"{server}/tokenize", json={"messages": [{"role": "user", "content": "the"}]}).json()
    assert chat["count"] >= 1
    assert httpx.post(f"{server}/detokenize", json={"tokens": [999]}).status_code == 400
    assert "version" in httpx.get(f"{server}/version").json()


# ---------------------------------------------------------------- token accounting

def test_completion_tokens_count_only_the_text_returned(server: str) -> None:
    full = complete(server, max_tokens=12, ignore_eos=True, logprobs=0)["choices"][0]
    words = full["text"].split()
    stop = words[3]
    cut = words.index(stop)
    resp = complete(server, max_tokens=12, ignore_eos=True, stop=[" " + stop], logprobs=0)
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == " ".join(words[:cut])
    assert resp["usage"]["completion_tokens"] == cut + 1  # up to the token that completed the stop string
    assert len(choice["logprobs"]["tokens"]) == len(resp["early_exit"]["exit_layers"]) == cut + 1


# ---------------------------------------------------------------- the published document

def test_openapi_lists_real_errors_and_event_streams(server: str) -> None:
    doc = httpx.get(f"{server}/openapi.json").json()
    text = json.dumps(doc)
    assert '"422"' not in text
    assert "HTTPValidationError" not in text
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"400", "404", "429", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200
    assert "/v1/completions" in page.text
    assert "<script" not in page.text  # nothing to fetch from a CDN: it works offline


# ---------------------------------------------------------------- metrics an SRE expects

def test_metrics_have_spec_decode_kv_process_and_build_series(server: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[str, float]:
        text = httpx.get(f"{server}/metrics").text
        return {f"{s.name}{json.dumps(s.labels, sort_keys=True)}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    assert not [k for k in before if "_created" in k]
    for reason in ("queue_full", "timeout", "cancelled", "error", "shutdown"):
        assert f'onejump_request_failure_total{{"model_name": "tiny-llama", "reason": "{reason}"}}' in before
    for kind in ("early", "full", "verified"):
        assert f'onejump_tokens_total{{"exit": "{kind}", "model_name": "tiny-llama"}}' in before
    assert any(k.startswith("process_resident_memory_bytes") for k in before)
    assert any(k.startswith("python_info") for k in before)
    assert any(k.startswith("onejump_build_info") for k in before)
    assert 0.0 <= before['onejump_kv_cache_usage_perc{"model_name": "tiny-llama"}'] <= 1.0
    resp = complete(server, max_tokens=8, ignore_eos=True, **EXACT)
    after = samples()

    def grew(name: str) -> float:  # over every draft source
        keys = [k for k in after if k.startswith(name + "{") and '"model_name": "tiny-llama"' in k]
        assert keys
        return sum(after[k] - before[k] for k in keys)

    drafted, accepted = grew("onejump_spec_decode_num_draft_tokens_total"), grew(
        "onejump_spec_decode_num_accepted_tokens_total")
    assert drafted > 0
    assert accepted / drafted == pytest.approx(resp["early_exit"]["acceptance_rate"])
