"""Two replicas behind a round-robin proxy, as a Kubernetes Service spreads them (docs/scale.md): session-less
requests spread by connection, not by request, and exit metrics summed over replicas give the token-weighted
figures that one server would report, where averaging per-replica means does not."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from support.server import metric, running_server, tiny_settings


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextmanager
def round_robin_proxy(backends: list[str]) -> Iterator[str]:
    """A TCP proxy on a free loopback port that sends each new connection to the next backend, as kube-proxy
    does for a Service's endpoints; yields its URL."""
    targets = itertools.cycle([b.split("://")[1].split(":") for b in backends])
    loop = asyncio.new_event_loop()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = next(targets)
        up_r, up_w = await asyncio.open_connection(host, int(port))
        await asyncio.gather(_pipe(client_r, up_w), _pipe(up_r, client_w))

    server = loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def completion(send: httpx.Client | None, url: str, mode: str) -> list[int]:
    body = {"prompt": "the king of the", "max_tokens": 6, "early_exit": {"mode": mode, "threshold": 0.0}}
    r = (send or httpx).post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["early_exit"]["exit_layers"]


def served(replicas: list[str]) -> list[float]:
    return [metric(u, "onejump_request_success_total") for u in replicas]


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_two_replicas_behind_a_round_robin_proxy(tiny_folder: Path) -> None:
    settings = tiny_settings(tiny_folder, served_model_name="tiny")  # one model name on every replica
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_server(settings)) for _ in range(2)]
        proxy = stack.enter_context(round_robin_proxy(replicas))

        # a new connection per request: the requests alternate between the replicas
        full = [completion(None, proxy, "off") for _ in range(4)]
        assert served(replicas) == [2, 2]

        # one keep-alive client: every request rides its one connection to the same replica
        with httpx.Client() as client:
            early = [completion(client, proxy, "approximate") for _ in range(4)]
        assert sorted(served(replicas)) == [2, 6]
    assert {layer for response in full for layer in response} == {4}  # mode off: full depth
    assert {layer for response in early for layer in response} == {1, 4}  # threshold 0: exits at the first check


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_exit_metrics_add_up_across_replicas(tiny_folder: Path) -> None:
    """sum(exit_layer_sum) / sum(exit_layer_count) over the replicas is the mean over every token served (what
    the dashboard plots); the mean of the replicas' own means is not, once they served different traffic."""
    settings = tiny_settings(tiny_folder, served_model_name="tiny")
    with ExitStack() as stack:
        replicas = [stack.enter_context(running_server(settings)) for _ in range(2)]
        proxy = stack.enter_context(round_robin_proxy(replicas))
        layers = [completion(None, proxy, "off") for _ in range(2)]  # one full-depth request each
        with httpx.Client() as client:  # then early exits, all on one replica
            layers += [completion(client, proxy, "approximate") for _ in range(3)]
        sums = [metric(u, "onejump_exit_layer_sum") for u in replicas]
        counts = [metric(u, "onejump_exit_layer_count") for u in replicas]
        skipped = [metric(u, "onejump_layers_skipped_total") for u in replicas]
        computed = [metric(u, "onejump_layers_computed_total") for u in replicas]

    tokens = [layer for response in layers for layer in response]
    assert sum(counts) == len(tokens)
    pooled = sum(sums) / sum(counts)
    assert pooled == pytest.approx(sum(tokens) / len(tokens))
    assert pooled == pytest.approx(75 / 30)  # 2 x 6 tokens at layer 4, 3 x (4 + 5 x 1)
    mean_of_means = sum(s / c for s, c in zip(sums, counts, strict=True)) / len(replicas)
    assert mean_of_means == pytest.approx((4 + 51 / 24) / 2)  # 3.06: the busy replica weighs as much as the idle
    skipped_share = sum(skipped) / (sum(skipped) + sum(computed))
    assert 0 < skipped_share < 1
