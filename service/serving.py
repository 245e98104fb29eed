"""The logic behind /v1/completions and /v1/chat/completions: request → prompts and generation
settings → one job per choice on the engine (n per prompt) → a JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from service.config import Settings
from service.engine import Done, Job, Worker, layers_saved
from service.errors import BadRequestError, ModelNotFoundError, NotReadyError, ServiceError
from service.logprobs import chat_logprobs, completion_logprobs
from service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ExitReport,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from service.support import check_supported
from service.text import StopMatcher, TextAssembler
from shortcuts.calibration import Overrides
from shortcuts.engine.settings import ExitSettings, GenerationSettings

if TYPE_CHECKING:
    from shortcuts.engine.api import TokenTrace, TopLogprobs

AnyRequest = CompletionRequest | ChatCompletionRequest
AnyResponse = CompletionResponse | ChatCompletionResponse
KEEPALIVE_S = 10.0  # an SSE comment this often while a stream waits for its first or next token


@dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo repeats


@dataclass
class Choice:
    """One choice in flight: its job (None: echo with max_tokens 0), its text, the tokens counted."""

    index: int
    prompt: Prompt
    text: TextAssembler
    job: Job | None = None
    score_job: Job | None = None  # echo with logprobs: the prompt's scoring (on the first choice of a prompt)
    scores: list[tuple[float, TopLogprobs]] | None = None  # echo with logprobs: the prompt's after its first token
    traces: list[TokenTrace] = field(default_factory=list)  # the tokens whose text was returned (to a stop string)
    done: Done | None = None

    def add(self, trace: TokenTrace) -> str:
        """One generated token; the text it makes safe to show."""
        if self.text.stopped:
            return ""
        self.traces.append(trace)
        delta = self.text.add(trace.token)
        if self.text.stopped and self.job is not None:
            self.job.cancel(stop_hit=True)
        return delta

    @property
    def finish_reason(self) -> str | None:
        if self.job is None:
            return "length"
        if self.done is None:
            return None
        return "stop" if self.job.stop_hit else self.done.generation.finish_reason


class Serving:
    def __init__(self, engine: Worker, settings: Settings):
        self.engine, self.settings = engine, settings

    # --- request → prompts and settings --------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.settings.served_names:
            raise ModelNotFoundError(f"the model {name!r} does not exist; this server serves "
                                     f"{', '.join(self.settings.served_names)}", "model")

    def prompts(self, req: AnyRequest) -> list[Prompt]:
        tok = self.engine.model.tokenizer
        if isinstance(req, ChatCompletionRequest):
            ids = self.chat_ids([m.for_template() for m in req.messages])
            return [Prompt(self._checked(ids, "messages"), "")]
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                out.append(Prompt(self._checked(list(tok(p, add_special_tokens=True)["input_ids"])), p))
            else:
                out.append(Prompt(self._checked(list(p)), tok.decode(p)))
        return out

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        tok = self.engine.model.tokenizer
        if not getattr(tok, "chat_template", None):
            raise BadRequestError("this model has no chat template; use /v1/completions", "messages")
        try:
            return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=True, return_dict=True)["input_ids"])
        except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
            raise BadRequestError(f"the chat template cannot render these messages: {e}", "messages") from e

    def _checked(self, ids: list[int], param: str = "prompt") -> list[int]:
        """The prompt's ids within the limits; a 400 naming ``param`` (``messages`` for a chat) otherwise."""
        limit = min(self.settings.max_prompt_tokens, self.engine.model.context_length - 1)
        vocab = len(self.engine.model.tokenizer)
        if not ids:
            raise BadRequestError("the prompt has no tokens", param)
        if len(ids) > limit:
            raise BadRequestError(f"the prompt has {len(ids)} tokens; the limit is {limit}", param)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param)
        return ids

    def generation_settings(self, req: AnyRequest) -> GenerationSettings:
        s = self.settings
        max_tokens = self.max_tokens(req)
        temperature = s.default_temperature if req.temperature is None else req.temperature
        bias = req.bias
        vocab = len(self.engine.model.tokenizer)
        if any(t >= vocab for t, _ in bias):
            raise BadRequestError(f"logit_bias names token ids outside the vocabulary [0, {vocab})", "logit_bias")
        try:
            return GenerationSettings(
                max_new_tokens=max(max_tokens, 1), temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, exit=self.exit_settings(req),
                stop_token_ids=() if req.ignore_eos else None, top_k=max(req.top_k or 0, 0), min_p=req.min_p or 0.0,
                repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, logprobs=req.top_n)
        except ValueError as e:
            raise BadRequestError(str(e)) from e

    def max_tokens(self, req: AnyRequest) -> int:
        s = self.settings
        given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = s.default_max_tokens if given is None else given
        if max_tokens > s.max_new_tokens:
            raise BadRequestError(f"max_tokens={max_tokens} exceeds this server's limit of {s.max_new_tokens}",
                                  "max_tokens")
        if max_tokens == 0 and not (isinstance(req, CompletionRequest) and req.echo):
            raise BadRequestError("max_tokens=0 needs echo=true (prompt scoring); otherwise give at least 1",
                                  "max_tokens")
        return max_tokens

    def exit_settings(self, req: AnyRequest) -> ExitSettings:
        """The request's ``early_exit`` over the server's defaults (``ExitPolicy.resolve``); 400 for a
        setting the engine cannot run."""
        policy = self.engine.exit_policy
        if policy is None:
            raise NotReadyError("the model is still loading; try again when /ready answers 200")
        given = Overrides() if req.early_exit is None else Overrides(**req.early_exit.model_dump(exclude_none=True))
        try:
            exit_settings = policy.resolve(given).settings
            self.engine.model.check_settings(GenerationSettings(exit=exit_settings))
        except ValueError as e:
            raise BadRequestError(f"early_exit: {e}", "early_exit") from e
        return exit_settings

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        tok = self.engine.model.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise BadRequestError("give exactly one of prompt and messages", "prompt")
        if req.messages is not None:
            ids = self.chat_ids([m.for_template() for m in req.messages], req.add_generation_prompt)
        else:
            ids = list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.engine.model.context_length, tokens=ids,
                                token_strs=strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        vocab = len(self.engine.model.tokenizer)
        if any(not 0 <= t < vocab for t in req.tokens):
            raise BadRequestError(f"token ids must be in [0, {vocab})", "tokens")
        return DetokenizeResponse(prompt=self.engine.model.tokenizer.decode(req.tokens))

    # --- running -------------------------------------------------------------------------------
    def _prepare(self, req: AnyRequest) -> tuple[list[Prompt], GenerationSettings, StopMatcher]:
        """Everything that grows with the body, in a worker thread: the prompts tokenized (a 4 MiB
        prompt takes a while), the generation settings (logit_bias checked), the stop strings compiled."""
        return self.prompts(req), self.generation_settings(req), StopMatcher(req.stop_strings)

    async def handle(self, req: AnyRequest, request: Request) -> StreamingResponse | Response:
        self.engine.check_admitting()  # 503 before any work
        self.check_model(req.model)
        check_supported(req)
        prompts, settings, stops = await asyncio.to_thread(self._prepare, req)
        choices = [Choice(k * req.n + i, p, TextAssembler(self.engine.model.tokenizer, stops))
                   for k, p in enumerate(prompts) for i in range(req.n)]
        if len(choices) > self.settings.queue_size:
            raise BadRequestError(f"{len(prompts)} prompt(s) x n={req.n} = {len(choices)} choices exceeds this "
                                  f"server's limit of {self.settings.queue_size} (ONEJUMP_QUEUE_SIZE)", "n")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, choices))  # scoring included
        try:
            await self._score(req, choices)
            self._submit(req, choices, settings)  # 429/503 keep their HTTP status
        except BaseException:
            watcher.cancel()
            _cancel(choices)
            raise
        if req.stream:  # headers and a first frame at once; a later error (504 included) is an error frame
            watcher.cancel()  # the stream's own end (a client that left included) cancels its choices
            return StreamingResponse(self._sse(req, choices), media_type="text/event-stream")
        return await self._collect(req, choices, watcher)

    async def _score(self, req: AnyRequest, choices: list[Choice]) -> None:
        """echo with logprobs: the full model scores each prompt once (a job of its own, which a client
        that leaves cancels between two chunks)."""
        if not (isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None):
            return
        scores = None
        for c in choices:
            if c.index % req.n == 0:
                c.score_job = self.engine.submit(c.prompt.ids, GenerationSettings(), score_top_n=req.logprobs)
                scores = await c.score_job.scores()
            c.scores = scores

    def _submit(self, req: AnyRequest, choices: list[Choice], settings: GenerationSettings) -> None:
        if self.max_tokens(req) == 0:
            return
        for c in choices:
            seed = None if settings.seed is None else (settings.seed + c.index % req.n) % (2**63)
            c.job = self.engine.submit(c.prompt.ids, dataclasses.replace(settings, seed=seed))

    async def _collect(self, req: AnyRequest, choices: list[Choice], watcher: asyncio.Task[None]) -> Response:
        try:
            await asyncio.gather(*(_run(c) for c in choices))
        finally:
            watcher.cancel()
            _cancel(choices)
        for c in choices:
            c.text.finish()
        # the body, logprobs of long echoes included, is built and serialized in a worker thread (FastAPI would
        # encode a returned model on the event loop)
        body = await asyncio.to_thread(lambda: self._response(req, choices).model_dump_json().encode())
        return Response(body, media_type="application/json")

    async def _sse(self, req: AnyRequest, choices: list[Choice]) -> AsyncIterator[str]:
        base = self._response(req, [])
        events: asyncio.Queue[tuple[Choice, TokenTrace | Done | ServiceError | None]] = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(c, events)) for c in choices]
        left = len(choices)
        try:
            for c in choices:  # the role (chat) or the echo, before the first token (in a thread: long logprobs)
                echo = c.prompt.text if _echo(req) else ""
                yield _frame(await asyncio.to_thread(self._chunk, base, c, echo, [], echo=_echo(req)))
            while left:
                try:
                    c, event = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if isinstance(event, ServiceError):
                    raise event
                if event is None or isinstance(event, Done):
                    left -= 1
                    c.done = event
                    final = None
                    if not left and not _include_usage(req):
                        final = await asyncio.to_thread(self._response, req, choices)
                    yield _frame(self._chunk(base, c, c.text.finish(), [], c.finish_reason, final))
                    continue
                n = len(c.traces)
                delta = c.add(event)
                if delta or len(c.traces) > n and req.top_n is not None:
                    yield _frame(self._chunk(base, c, delta, c.traces[n:]))
            if _include_usage(req):
                last = await asyncio.to_thread(self._response, req, choices)
                yield _frame(base.model_dump(include={"id", "created", "model"})
                             | {"object": _object(base), "choices": [], "usage": _dump(last.usage),
                                "early_exit": last.early_exit.model_dump() if last.early_exit else None})
        except ServiceError as e:  # after the first byte an error becomes an error frame
            yield _frame({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}})
        finally:
            for p in pumps:
                p.cancel()
            _cancel(choices)  # a client that went away cancels its generations
        yield "data: [DONE]\n\n"

    # --- bodies --------------------------------------------------------------------------------
    def _response(self, req: AnyRequest, choices: list[Choice]) -> AnyResponse:
        prompt_tokens = sum(len(c.prompt.ids) for c in choices if c.index % req.n == 0)
        n = sum(len(c.traces) for c in choices)
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=n, total_tokens=prompt_tokens + n)
        report = self._report(req, choices) if choices else None
        name = req.model or self.settings.model_name
        if isinstance(req, ChatCompletionRequest):
            chat = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text.text),
                               finish_reason=c.finish_reason, logprobs=self._chat_logprobs(req, c.traces))
                    for c in choices]
            return ChatCompletionResponse(model=name, usage=usage, early_exit=report, choices=chat)
        out = [CompletionChoice(index=c.index, text=(c.prompt.text if req.echo else "") + c.text.text,
                                finish_reason=c.finish_reason, logprobs=self._completion_logprobs(req, c))
               for c in choices]
        return CompletionResponse(model=name, usage=usage, early_exit=report, choices=out)

    def _completion_logprobs(self, req: CompletionRequest, c: Choice, traces: list[TokenTrace] | None = None,
                             offset: int | None = None) -> CompletionLogprobs | None:
        if req.logprobs is None:
            return None
        tok = self.engine.model.tokenizer
        if traces is None:  # the whole choice: the echoed prompt, then every counted token
            prompt = c.prompt if req.echo else None
            return completion_logprobs(tok, c.traces, prompt.ids if prompt else None, c.scores,
                                       len(prompt.text) if prompt else 0, self.engine.model.num_layers)
        return completion_logprobs(tok, traces, None, None, offset or 0, self.engine.model.num_layers)

    def _chat_logprobs(self, req: ChatCompletionRequest, traces: list[TokenTrace]) -> ChatLogprobs | None:
        return chat_logprobs(self.engine.model.tokenizer, traces) if req.logprobs else None

    def _report(self, req: AnyRequest, choices: list[Choice]) -> ExitReport:
        layers = [t.exit_layer for c in choices for t in c.traces]
        gens = [c.done.generation for c in choices if c.done is not None]
        computed = sum(g.stats.layers_computed for g in gens)
        skipped = sum(g.stats.layers_skipped for g in gens)
        saved = sum(layers_saved(g, self.engine.model.num_layers) for g in gens)
        drafted = sum(g.stats.drafted for g in gens)
        accepted = sum(g.stats.accepted for g in gens)
        mode = choices[0].job.settings.exit.mode if choices[0].job else "off"
        exact = mode == "exact" and bool(gens)
        by: dict[str, dict[str, int]] = {"drafted": {}, "accepted": {}}
        for g in gens:
            for key, counts in (("drafted", g.stats.drafted_by), ("accepted", g.stats.accepted_by)):
                for source, n in counts.items():
                    by[key][source] = by[key].get(source, 0) + n
        return ExitReport(mode=mode, num_layers=self.engine.model.num_layers, exit_layers=layers,
                          mean_exit_layer=sum(layers) / max(len(layers), 1), layers_computed=computed,
                          layers_skipped=skipped, layers_saved=saved,
                          acceptance_rate=accepted / drafted if drafted else None,
                          drafted=by["drafted"] if exact else None, accepted=by["accepted"] if exact else None,
                          verifications=sum(g.stats.verifications for g in gens) if exact else None)

    def _chunk(self, base: AnyResponse, c: Choice, delta: str, traces: list[TokenTrace], finish: str | None = None,
               final: AnyResponse | None = None, echo: bool = False) -> dict[str, Any]:
        """One SSE body: choice ``c``'s text ``delta`` with the logprobs of ``traces`` (or, for the echo,
        of the prompt) when asked, its finish reason, and on the last frame usage and the exit report."""
        req_logprobs = None
        body: dict[str, Any] = {"id": base.id, "created": base.created, "model": base.model, "object": _object(base)}
        if isinstance(base, ChatCompletionResponse):
            if traces and c.job is not None and c.job.settings.logprobs is not None:
                req_logprobs = chat_logprobs(self.engine.model.tokenizer, traces).model_dump()
            body["choices"] = [{"index": c.index, "delta": {"role": "assistant", "content": delta},
                                "logprobs": req_logprobs, "finish_reason": finish}]
        else:
            tok, layers = self.engine.model.tokenizer, self.engine.model.num_layers
            if echo and c.scores is not None:
                req_logprobs = completion_logprobs(tok, [], c.prompt.ids, c.scores, 0, layers).model_dump()
            elif traces and c.job is not None and c.job.settings.logprobs is not None:
                start = len(c.text.text) - len(delta)
                req_logprobs = completion_logprobs(tok, traces, None, None, start, layers).model_dump()
            body["choices"] = [{"index": c.index, "text": delta, "finish_reason": finish, "logprobs": req_logprobs}]
        if final is not None:
            body |= {"usage": _dump(final.usage),
                     "early_exit": final.early_exit.model_dump() if final.early_exit else None}
        return body


def _dump(usage: Usage | None) -> dict[str, Any] | None:
    return None if usage is None else usage.model_dump()


def _echo(req: AnyRequest) -> bool:
    return isinstance(req, CompletionRequest) and req.echo


def _include_usage(req: AnyRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _object(base: AnyResponse) -> str:
    return "chat.completion.chunk" if isinstance(base, ChatCompletionResponse) else "text_completion"


async def _run(c: Choice) -> None:
    if c.job is None:
        return
    async for event in c.job.stream():
        if isinstance(event, Done):
            c.done = event
        else:
            c.add(event)


async def _pump(c: Choice, events: asyncio.Queue[tuple[Choice, TokenTrace | Done | ServiceError | None]]) -> None:
    """A choice's events onto the stream's queue, its error included; an echo alone is done at once."""
    if c.job is None:
        await events.put((c, None))
        return
    try:
        async for event in c.job.stream():
            await events.put((c, event))
    except ServiceError as e:
        await events.put((c, e))


def _cancel(choices: list[Choice]) -> None:
    for c in choices:
        for job in (c.score_job, c.job):
            if job is not None:
                job.cancel()


def _frame(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _cancel_on_disconnect(request: Request, choices: list[Choice]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        _cancel(choices)
