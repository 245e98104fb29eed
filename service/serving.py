"""The logic behind /v1/completions and /v1/chat/completions: request → prompt ids and
generation settings → a job on the engine → a JSON body or an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from service.config import Settings
from service.engine import Done, Engine, Job
from service.errors import BadRequestError, NotReadyError, ServiceError
from service.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ExitReport,
    Usage,
)
from service.text import TextAssembler

AnyRequest = CompletionRequest | ChatCompletionRequest
KEEPALIVE_S = 10.0  # an SSE comment this often while a stream waits for its first or next token


class Serving:
    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings

    # --- request → prompt and settings ---------------------------------------------------------
    def prompt_ids(self, req: AnyRequest) -> list[int]:
        tok = self.engine.model.tokenizer
        if isinstance(req, CompletionRequest):
            ids = list(tok(req.prompt, add_special_tokens=True)["input_ids"])
        else:
            if not getattr(tok, "chat_template", None):
                raise BadRequestError("this model has no chat template; use /v1/completions", "messages")
            messages = [m.model_dump() for m in req.messages]
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"])
        limit = min(self.settings.max_prompt_tokens, self.engine.model.context_length - 1)
        if not ids:
            raise BadRequestError("the prompt has no tokens", "prompt")
        if len(ids) > limit:
            raise BadRequestError(f"the prompt has {len(ids)} tokens; the limit is {limit}", "prompt")
        return ids

    def generation_settings(self, req: AnyRequest) -> Any:
        from shortcuts.engine import ExitSettings, GenerationSettings

        s, ee = self.settings, req.early_exit
        max_tokens = req.max_completion_tokens or req.max_tokens or s.default_max_tokens
        if max_tokens > s.max_new_tokens:
            raise BadRequestError(f"max_tokens={max_tokens} exceeds this server's limit of {s.max_new_tokens}",
                                  "max_tokens")
        defaults = self.engine.exit_defaults
        if defaults is None:
            raise NotReadyError("the model is still loading; try again when /ready answers 200")
        exits: dict[str, Any] = {"mode": s.exit_mode, "gate": defaults.gate, "threshold": defaults.threshold,
                                 "min_layer": defaults.min_layer, "stride": defaults.stride}
        if ee is not None:
            exits |= ee.model_dump(exclude_none=True)
        try:
            exit_settings = ExitSettings(**exits)
            self.engine.model.check_settings(GenerationSettings(exit=exit_settings))
        except ValueError as e:
            raise BadRequestError(f"early_exit: {e}", "early_exit") from e
        temperature = s.default_temperature if req.temperature is None else req.temperature
        try:
            return GenerationSettings(
                max_new_tokens=max_tokens, temperature=temperature,
                top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, exit=exit_settings,
                stop_token_ids=() if req.ignore_eos else None)
        except ValueError as e:
            raise BadRequestError(str(e)) from e

    # --- running -------------------------------------------------------------------------------
    async def handle(self, req: AnyRequest, request: Request) -> Any:
        self.engine.check_admitting()  # 503 before any work
        prompt_ids = await asyncio.to_thread(self.prompt_ids, req)  # a 4 MiB prompt takes a while to tokenize
        job = self.engine.submit(prompt_ids, self.generation_settings(req))  # 429/503 keep their HTTP status
        text = TextAssembler(self.engine.model.tokenizer, req.stop_strings)
        if req.stream:  # headers and a first frame at once; a later error (504 included) is an error frame
            return StreamingResponse(self._sse(req, job, job.stream(), text), media_type="text/event-stream")
        return await self._collect(req, request, job, text)

    async def _collect(self, req: AnyRequest, request: Request, job: Job, text: TextAssembler) -> Any:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            done = None
            async for event in job.stream():
                if isinstance(event, Done):
                    done = event
                elif not text.stopped:
                    text.add(event.token)
                    if text.stopped:
                        job.cancel(stop_hit=True)
        finally:
            watcher.cancel()
            job.cancel()
        assert done is not None
        text.finish()
        return self._response(req, job, done, text.text)

    async def _sse(self, req: AnyRequest, job: Job, events: AsyncIterator[Any],
                   text: TextAssembler) -> AsyncIterator[str]:
        base = self._response(req, job, None, "")
        nxt: asyncio.Future[Any] | None = None
        try:
            yield _frame(_chunk(base, "", None))  # the role (chat) or an empty text, before the first token
            event: Any = None
            while not isinstance(event, Done):
                if event is not None and not text.stopped:
                    delta = text.add(event.token)
                    if text.stopped:
                        job.cancel(stop_hit=True)
                    if delta:
                        yield _frame(_chunk(base, delta, None))
                nxt = asyncio.ensure_future(anext(events))
                while not (await asyncio.wait({nxt}, timeout=KEEPALIVE_S))[0]:
                    yield ": keep-alive\n\n"
                event = nxt.result()
            final = self._response(req, job, event, text.text)
            yield _frame(_chunk(base, text.finish(), final.choices[0].finish_reason, final))
        except ServiceError as e:  # after the first byte an error becomes an error frame
            yield _frame({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}})
        finally:
            if nxt is not None:
                nxt.cancel()
            job.cancel()  # a client that went away cancels its generation
        yield "data: [DONE]\n\n"

    def _response(self, req: AnyRequest, job: Job, done: Done | None, text: str) -> Any:
        gen = done.generation if done else None
        n = len(gen.tokens) if gen else 0
        usage = Usage(prompt_tokens=len(job.prompt_ids), completion_tokens=n, total_tokens=len(job.prompt_ids) + n)
        reason = None if gen is None else ("stop" if job.stop_hit else gen.finish_reason)
        report = _report(gen, job.settings.exit.mode, self.engine.model.num_layers) if gen else None
        if isinstance(req, ChatCompletionRequest):
            return ChatCompletionResponse(model=self.settings.model_name, usage=usage, early_exit=report,
                                          choices=[ChatChoice(message=AssistantMessage(content=text),
                                                              finish_reason=reason)])
        return CompletionResponse(model=self.settings.model_name, usage=usage, early_exit=report,
                                  choices=[CompletionChoice(text=text, finish_reason=reason)])


def _report(gen: Any, mode: str, num_layers: int) -> ExitReport:
    layers = [t.exit_layer for t in gen.trace]
    st = gen.stats
    return ExitReport(mode=mode, num_layers=num_layers, exit_layers=layers,
                      mean_exit_layer=sum(layers) / max(len(layers), 1), layers_computed=st.layers_computed,
                      layers_skipped=st.layers_skipped, acceptance_rate=st.acceptance_rate if st.drafted else None)


def _chunk(base: Any, delta: str, finish: str | None, final: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": base.id, "created": base.created, "model": base.model}
    if isinstance(base, ChatCompletionResponse):
        body |= {"object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": {"role": "assistant", "content": delta}, "finish_reason": finish}]}
    else:
        body |= {"object": "text_completion",
                 "choices": [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]}
    if final is not None:
        body |= {"usage": final.usage.model_dump(), "early_exit": final.early_exit.model_dump()}
    return body


def _frame(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        job.cancel()
