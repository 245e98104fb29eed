"""The HTTP service on the real SmolLM2 with its committed OJFA jump, through the openai client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.server import running_server

from service.config import Settings

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def url(smollm2) -> Iterator[str]:  # smollm2: fail early and clearly if the assets are missing
    with running_server(Settings(device="cpu", exit_mode="approximate", exit_threshold=0.9,
                                         served_model_aliases="smollm2")) as base:
        yield base


def test_completions_chat_and_stream(url: str) -> None:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    off = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                               extra_body={"early_exit": {"mode": "off"}})
    assert "Paris" in off.choices[0].text
    assert off.model_extra["early_exit"]["exit_layers"] == [30] * off.usage.completion_tokens
    exact = c.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                 extra_body={"early_exit": {"mode": "exact", "threshold": 0.5}})
    assert exact.choices[0].text == off.choices[0].text  # exact mode: the full model's greedy text
    chat = c.chat.completions.create(model="smollm2", max_tokens=12,
                                     messages=[{"role": "user", "content": "Name one colour."}])
    assert chat.choices[0].message.content.strip()
    assert 1 <= chat.model_extra["early_exit"]["mean_exit_layer"] <= 30
    pieces = c.chat.completions.create(model="smollm2", max_tokens=12, stream=True,
                                       messages=[{"role": "user", "content": "Name one colour."}])
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == chat.choices[0].message.content
    metrics = httpx.get(f"{url}/metrics").text
    assert 'onejump_exit_layer_bucket{le="30.0",model_name="smollm2-135m-instruct"}' in metrics


def test_concurrent_requests_batch_on_the_real_model(url: str) -> None:
    """Three requests at once are decoded in one batch and each gets its text from being alone."""
    from concurrent.futures import ThreadPoolExecutor

    c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    prompts = ["The river Thames flows through", "Water boils at a temperature of", "The largest planet is"]
    exits = [{"mode": "off"}, {"mode": "approximate", "threshold": 0.5}, {"mode": "exact", "threshold": 0.5}]

    def complete(i: int) -> str:
        r = c.completions.create(model="smollm2", prompt=prompts[i], max_tokens=12,
                                 extra_body={"early_exit": exits[i], "ignore_eos": True})
        return r.choices[0].text

    alone = [complete(i) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(complete, range(3)))
    assert together == alone
    sizes = {s.labels.get("le"): s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
             if f.name == "onejump_batch_size" for s in f.samples if s.name.endswith("_bucket")}
    assert sizes["3.0"] > sizes["1.0"]  # some steps decoded more than one request
