"""Driving the load: the interleaved schedule, the closed and open loops, and the duration bound."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import httpx
from tqdm import tqdm

from loadtest.client import Scrape, auth_headers, scrape_metrics, stream_request
from loadtest.records import Arm, Job, LoadPoint, Prompt, Record

AtDeadline = Literal["wait", "cancel"]


@dataclass(frozen=True)
class Plan:
    """What every load point runs: ``requests`` per arm, bounded by ``duration`` seconds per load point."""

    arms: tuple[Arm, ...]
    requests: int
    duration: float
    at_deadline: AtDeadline
    max_tokens: int
    ignore_eos: bool
    seed: int
    model: str | None = None
    timeout: float = 300.0


@dataclass
class PointResult:
    point: LoadPoint
    records: list[Record]
    planned: int
    wall: float
    stopped_by: Literal["requests", "duration"]
    in_flight_at_deadline: int  # awaited or cancelled, as ``Plan.at_deadline`` says
    before: Scrape | None = None
    after: Scrape | None = None


def schedule(arms: Sequence[Arm], prompts: Sequence[Prompt], requests: int) -> list[Job]:
    """Round-robin over the arms, request by request; the arms of one round share a prompt."""
    jobs = []
    for i in range(requests * len(arms)):
        p = (i // len(arms)) % len(prompts)
        jobs.append(Job(index=i, arm=arms[i % len(arms)], prompt_index=p, prompt=prompts[p]))
    return jobs


class Runner:
    """One load point: sends jobs, keeps their records, and enforces the deadline."""

    def __init__(self, client: httpx.AsyncClient, plan: Plan, bar: tqdm):
        self.client, self.plan, self.bar = client, plan, bar
        self.records: list[Record] = []
        self.start = time.perf_counter()
        self.deadline = self.start + plan.duration
        self.in_flight_at_deadline = 0

    def expired(self) -> bool:
        return time.perf_counter() >= self.deadline

    def body(self, job: Job) -> dict[str, object]:
        chat = isinstance(job.prompt, list)
        body: dict[str, object] = {"messages" if chat else "prompt": job.prompt, "max_tokens": self.plan.max_tokens,
                                   "stream": True, "ignore_eos": self.plan.ignore_eos,
                                   "early_exit": job.arm.early_exit()}
        if self.plan.model:
            body["model"] = self.plan.model
        return body

    async def send(self, job: Job) -> None:
        rec = Record(index=job.index, arm=job.arm.label, mode=job.arm.mode, threshold=job.arm.threshold,
                     prompt_index=job.prompt_index, sent=time.perf_counter() - self.start)
        self.records.append(rec)
        path = "/v1/chat/completions" if isinstance(job.prompt, list) else "/v1/completions"
        await stream_request(self.client, self.body(job), rec, path)
        self.bar.update()
        if rec.failed:
            self.bar.set_postfix_str(f"errors {sum(r.failed for r in self.records)}", refresh=False)

    async def finish(self, tasks: list[asyncio.Task[None]]) -> None:
        """Waits for ``tasks`` until the deadline; then awaits or cancels what is still in flight."""
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(self.deadline - time.perf_counter(), 0.0))
        if not pending:
            return
        self.in_flight_at_deadline = sum(r.outcome == "pending" for r in self.records)
        if self.plan.at_deadline == "cancel":
            for task in pending:
                task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def closed_loop(runner: Runner, jobs: list[Job], concurrency: int) -> None:
    """``concurrency`` clients, each sending its next request as soon as the last one ends."""
    queue = iter(jobs)

    async def client() -> None:
        for job in queue:
            if runner.expired():
                return
            await runner.send(job)

    await runner.finish([asyncio.create_task(client()) for _ in range(concurrency)])


async def open_loop(runner: Runner, jobs: list[Job], rate: float, seed: int) -> None:
    """Poisson arrivals at ``rate`` requests/s (seeded), each sent whatever is still in flight."""
    rng, tasks, at = random.Random(seed), [], 0.0
    for job in jobs:
        at += rng.expovariate(rate)
        if runner.start + at >= runner.deadline:
            break
        await asyncio.sleep(max(0.0, runner.start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(runner.send(job)))
    await runner.finish(tasks)


async def run_point(client: httpx.AsyncClient, plan: Plan, point: LoadPoint, jobs: list[Job],
                    progress: bool) -> PointResult:
    before = await scrape_metrics(client)
    with tqdm(total=len(jobs), desc=point.label, unit="req", disable=not progress, leave=True) as bar:
        runner = Runner(client, plan, bar)
        if point.loop == "closed":
            await closed_loop(runner, jobs, int(point.value))
        else:
            await open_loop(runner, jobs, point.value, plan.seed)
        wall = time.perf_counter() - runner.start
    after = await scrape_metrics(client)
    cut = runner.in_flight_at_deadline or len(runner.records) < len(jobs)
    stopped: Literal["requests", "duration"] = "duration" if cut else "requests"
    return PointResult(point=point, records=sorted(runner.records, key=lambda r: r.index), planned=len(jobs),
                       wall=wall, stopped_by=stopped, in_flight_at_deadline=runner.in_flight_at_deadline,
                       before=before, after=after)


async def run_all(url: str, api_key: str | None, plan: Plan, points: Sequence[LoadPoint],
                  prompts: Sequence[Prompt],
                  progress: bool = True) -> list[PointResult]:
    jobs = schedule(plan.arms, prompts, plan.requests)
    timeout = httpx.Timeout(plan.timeout, connect=5.0)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=auth_headers(api_key), timeout=timeout,
                                 limits=limits) as client:
        return [await run_point(client, plan, point, jobs, progress) for point in points]
