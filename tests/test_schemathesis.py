"""Schemathesis against the running server (tiny random Llama, real socket), driven by the OpenAPI document it
publishes: every operation (/tokenize and /detokenize included), schema-valid requests (positive) and broken
ones (negative). Whatever comes in, no 5xx; every response matches the status codes, content types and bodies
the document declares; a schema-valid request is served, or refused with a 400 whose ``param`` the document
describes (a limit the schema cannot state, such as the vocabulary size, is said in that field's
description), or a 404 for a model name the server does not serve.

The default tier runs ``ONEJUMP_SCHEMATHESIS_EXAMPLES`` (6) examples per operation and mode; the slow test
runs 1,000 requests or more (``ONEJUMP_SCHEMATHESIS_BIG``, 150 examples per operation and mode; hypothesis
stops early where an operation has few distinct inputs) and prints the tally:
``pytest -s -m slow tests/test_schemathesis.py``."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support.server import running_server, tiny_settings

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.fuzz]
SMALL = int(os.environ.get("ONEJUMP_SCHEMATHESIS_EXAMPLES", "6"))
BIG = int(os.environ.get("ONEJUMP_SCHEMATHESIS_BIG", "150"))
TALLY: Counter[str] = Counter()
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ: dict[str, Any] = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[str]:
    with running_server(tiny_settings(tiny_model_dir, max_new_tokens=8, default_max_tokens=4, queue_size=32,
                                      max_prompt_tokens=64)) as url:
        yield url
    total = sum(TALLY.values())
    errors = sum(n for k, n in TALLY.items() if k.endswith(" 5xx"))
    print(f"\nschemathesis: {total} requests, {errors} 5xx; by operation and status: {dict(sorted(TALLY.items()))}")


@pytest.fixture(scope="module")
def api(server: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{server}/openapi.json")


def operations(api: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    ops = [r.ok() for r in api.get_all_operations()]
    assert {"/tokenize", "/detokenize", "/v1/completions", "/v1/chat/completions"} <= {op.path for op in ops}
    return ops


def _described(case: schemathesis.Case, param: str | None) -> bool:
    """Whether the request body's schema describes ``param``'s top-level field (it says why it may be refused)."""
    if not param:
        return False
    body = case.operation.definition.raw.get("requestBody", {})
    ref = body.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref", "")
    components = case.operation.schema.raw_schema["components"]["schemas"]
    props = components.get(ref.rsplit("/", 1)[-1], {}).get("properties", {})
    return bool(props.get(param.split(".")[0], {}).get("description"))


def check(case: schemathesis.Case, server: str, mode: schemathesis.GenerationMode) -> None:
    response = case.call(base_url=server, timeout=60)
    status = response.status_code
    TALLY[f"{case.method} {case.path} {'5xx' if status >= 500 else status}"] += 1
    assert status < 500, (status, response.text[:500], case.as_curl_command())
    case.validate_response(response, checks=CHECKS)
    if mode != schemathesis.GenerationMode.POSITIVE or status < 400:
        return
    error = json.loads(response.text)["error"]
    if status == 404:  # a model name the server does not serve; or a path that names no route (an empty id)
        assert error["param"] in ("model", None), error
        return
    assert status == 400, (status, error)
    assert _described(case, error["param"]), (f"a schema-valid body got a 400 the schema does not explain: "
                                              f"{error}", case.as_curl_command())


def fuzz(api: schemathesis.BaseSchema, server: str, examples: int) -> None:
    for op in operations(api):
        breakable = "requestBody" in op.definition.raw  # a path or no parameter: every string is valid
        for mode in schemathesis.GenerationMode if breakable else [schemathesis.GenerationMode.POSITIVE]:
            @settings(max_examples=examples, **FUZZ)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                check(case, server, mode)  # noqa: B023 (run is called at once, in this iteration)

            run()


def test_the_published_api(api: schemathesis.BaseSchema, server: str) -> None:
    fuzz(api, server, SMALL)


@pytest.mark.slow
def test_the_published_api_at_length(api: schemathesis.BaseSchema, server: str) -> None:
    before = sum(TALLY.values())
    fuzz(api, server, BIG)
    assert sum(TALLY.values()) - before >= 1000
