"""Fuzzing the running server (tiny random Llama, real socket) with hypothesis, driven by the OpenAPI
schema the server publishes: requests drawn from its request schemas, then the same requests broken
(wrong types, extra nesting, junk bytes, odd Unicode, huge numbers). Whatever comes in, the answer is
never a 5xx, every error has the OpenAI body, a schema-valid request is served (or refused with 400 by
a server-side limit the schema cannot express), and every 200 body validates against the published
response schema. Bounded in time: at most ``ONEJUMP_FUZZ_EXAMPLES`` requests (250) and
``ONEJUMP_FUZZ_BUDGET_S`` seconds (12) per test, under a minute for the four; a longer run, e.g.
``ONEJUMP_FUZZ_EXAMPLES=1000 ONEJUMP_FUZZ_BUDGET_S=600 pytest -s tests/test_fuzz.py``, prints its tally."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import running_server, tiny_settings

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow, pytest.mark.fuzz]
EXAMPLES = int(os.environ.get("ONEJUMP_FUZZ_EXAMPLES", "250"))
BUDGET_S = float(os.environ.get("ONEJUMP_FUZZ_BUDGET_S", "12"))  # per test: then the examples left send nothing
ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
# 400s that a schema-valid request may get: limits the schema does not (or cannot) express
SERVER_LIMITS = ("exceeds this server's limit", "the limit is", "has no tokens", "must not be empty",
                 "exactly one prompt", "early_exit", "lone surrogate", "outside the vocabulary", "not supported",
                 "needs echo", "needs logprobs", "only for stored completions", "chat template", "logit_bias",
                 "content may be null")
FUZZ: dict[str, Any] = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck),
                        "max_examples": EXAMPLES}
TALLY: Counter[str] = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from support.models import build_tiny

    folder = tmp_path_factory.mktemp("fuzz") / "tiny-llama"
    lm = build_tiny("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    with running_server(tiny_settings(Path(folder), max_new_tokens=8, default_max_tokens=4, queue_size=32,
                                      max_prompt_tokens=64)) as url:
        yield url
    print(f"\nfuzz tally: {dict(sorted(TALLY.items()))}")


@pytest.fixture(scope="module")
def openapi(server: str) -> dict[str, Any]:
    return httpx.get(f"{server}/openapi.json").json()


def component(openapi: dict[str, Any], name: str) -> dict[str, Any]:
    """A schema from components, its $refs resolvable (they point into the document's components)."""
    return {**openapi["components"]["schemas"][name], "components": openapi["components"]}


def response_schema(openapi: dict[str, Any], path: str, status: int) -> dict[str, Any]:
    ref = openapi["paths"][path]["post"]["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
    return component(openapi, ref.rsplit("/", 1)[1])


def from_schema(schema: dict[str, Any], root: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values valid under ``schema``: the JSON-schema subset pydantic writes for the request models
    ($ref, anyOf, enum, const, null, boolean, integer and number with bounds, string, array, object)."""
    root = root or schema
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: from_schema(root["components"]["schemas"][name], root))
    if "anyOf" in schema:
        return st.one_of([from_schema(s, root) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    low, high = schema.get("minimum"), schema.get("maximum")
    if kind == "integer":
        low = math.ceil(low) if low is not None else None
        high = math.floor(high) if high is not None else None
        if "exclusiveMaximum" in schema:
            high = int(schema["exclusiveMaximum"]) - 1
        return st.integers(min_value=low, max_value=high)
    if kind == "number":
        if "exclusiveMinimum" in schema:
            return st.floats(min_value=schema["exclusiveMinimum"], max_value=high, exclude_min=True,
                             allow_nan=False, allow_infinity=False)
        return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
    if kind == "object":
        props = schema.get("properties", {})
        required = {k: from_schema(props[k], root) for k in schema.get("required", [])}
        optional = {k: from_schema(v, root) for k, v in props.items() if k not in required}
        return st.fixed_dictionaries(required, optional=optional)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), root), min_size=schema.get("minItems", 0), max_size=4)
    simple = {"null": st.none(), "boolean": st.booleans(), "string": st.text(max_size=40)}
    return simple[kind]


class Budget:
    def __init__(self) -> None:
        self.end = time.monotonic() + BUDGET_S

    def spent(self) -> bool:
        return time.monotonic() > self.end


def send(url: str, path: str, content: bytes) -> tuple[int, Any, list[dict]]:
    """POSTs; returns the status, the JSON body (None for a stream) and a stream's data frames."""
    headers = {"content-type": "application/json"}
    with httpx.stream("POST", f"{url}{path}", content=content, headers=headers, timeout=60) as r:
        text = r.read().decode()
    TALLY[f"{r.status_code}"] += 1
    assert r.status_code < 500, (r.status_code, text, content[:300])
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln.removeprefix("data: ") for ln in text.splitlines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]", text
        frames = [json.loads(ln) for ln in lines[:-1]]
        for f in frames:
            assert "error" not in f or f["error"]["code"] < 500, f
        return r.status_code, None, frames
    return r.status_code, json.loads(text), []


def check_error(body: Any) -> str:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


def check_valid(openapi: dict[str, Any], path: str, status: int, body: Any, frames: list[dict]) -> None:
    if status == 200 and body is not None:
        jsonschema.validate(body, response_schema(openapi, path, 200))
    elif status == 200:
        assert "usage" in frames[-1] or "error" in frames[-1], frames[-1]
    elif status == 404:  # a model name the server does not serve
        assert check_error(body)
        assert body["error"]["param"] == "model", body
    else:
        assert status == 400, (status, body)
        message = check_error(body)
        assert any(s in message for s in SERVER_LIMITS), message


@pytest.mark.parametrize("path", list(ROUTES))
def test_schema_valid_requests_are_served(server: str, openapi: dict[str, Any], path: str) -> None:
    budget = Budget()

    @settings(**FUZZ)
    @given(req=from_schema(component(openapi, ROUTES[path])))
    def run(req: dict[str, Any]) -> None:
        if budget.spent():
            return
        status, body, frames = send(server, path, json.dumps(req).encode())
        check_valid(openapi, path, status, body, frames)

    run()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
FIELDS = ("prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "n", "ignore_eos", "early_exit", "model", "logprobs", "echo", "top_logprobs", "top_k", "min_p",
          "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "best_of", "stream_options",
          "tools", "response_format")
EXIT_FIELDS = ("mode", "gate", "threshold", "min_layer", "stride", "patience")
ODD = st.sampled_from(["\ud800", "\udfff", "\x00", "\u202e", "\ufeff", "é" * 3, "🙂", "the\nking", " "])


@st.composite
def broken(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """A valid request, then one of: a field set to any JSON value, an early_exit field likewise,
    a field dropped, odd Unicode in the prompt, the body as raw junk bytes, or deep nesting."""
    req = dict(valid)
    kind = draw(st.sampled_from(["field", "exit", "drop", "unicode", "junk", "deep", "numbers"]))
    if kind == "field":
        req[draw(st.sampled_from(FIELDS))] = draw(JSON)
    elif kind == "exit":
        req["early_exit"] = {draw(st.sampled_from(EXIT_FIELDS)): draw(JSON)}
    elif kind == "drop" and req:
        req.pop(draw(st.sampled_from(sorted(req))))
    elif kind == "unicode":
        req["prompt"] = draw(st.text(max_size=8)) + draw(ODD) + draw(st.text(max_size=8))
        req["messages"] = [{"role": "user", "content": req["prompt"]}]
    elif kind == "junk":
        return draw(st.binary(max_size=64))
    elif kind == "deep":
        depth = draw(st.integers(1, 5000))
        return b'{"prompt": "a", "stop": ' + b"[" * depth + b"]" * depth + b"}"
    else:
        big = draw(st.sampled_from([2**63, 2**64, -(2**63), 10**400, 1e308, -1e-320, 5e-324]))
        req[draw(st.sampled_from(["seed", "max_tokens", "temperature", "top_p", "n"]))] = big
    return json.dumps(req, allow_nan=True).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("path", list(ROUTES))
def test_broken_requests_never_get_a_5xx(server: str, openapi: dict[str, Any], path: str) -> None:
    budget = Budget()
    valid = from_schema(component(openapi, ROUTES[path]))

    @settings(**FUZZ)
    @given(content=valid.flatmap(broken))
    def run(content: bytes) -> None:
        if budget.spent():
            return
        status, body, frames = send(server, path, content)
        if status != 200:
            check_error(body)
        elif body is not None:
            jsonschema.validate(body, response_schema(openapi, path, 200))

    run()
    assert httpx.get(f"{server}/health", timeout=5).status_code == 200
