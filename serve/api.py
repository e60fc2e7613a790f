"""The OpenAI-compatible HTTP API: a FastAPI app over a sampler backend (no Ray here).

    GET  /health                 liveness (the ingress is up)
    GET  /ready                  readiness (a sampler replica answers)
    GET  /v1/models              the served model
    POST /v1/completions         prompt(s) -> text; ``stream: true`` gives server-sent events
    POST /v1/chat/completions    messages (tokenizer's chat template) -> message; streams too

The backend is anything with ``stream(SampleRequest)`` (an async iterator of BlockUpdate /
SampleFailure) and ``ready()``: on Ray Serve, a handle to the sampler deployment
(serve/app.py); in unit tests, a model in the same process. Each committed block is sent as
soon as it arrives. Client mistakes get a 4xx in OpenAI's error shape naming the field
(``error.param``); a full queue gets 503 with Retry-After, a request past
``request_timeout_s`` gets 504, a body over ``limits.max_request_bytes`` 413 (declared or
counted as it arrives). /openapi.json documents every status of every operation
(serve/openapi.py); besides them, an unknown path gets 404 and another method on a known path
405, in the same error shape.

``usage`` has OpenAI's token counts and two fields for what a diffusion answer costs, since a
masked-diffusion model commits several tokens per forward: ``model_forwards``, the model
forwards the answer took (the BlockUpdates' ``forwards``, summed over its choices), and
``tokens_per_forward``, completion_tokens / model_forwards rounded to 2 decimals (0 when
there were none). A streamed answer carries them in its usage chunk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol, Sequence

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import openapi, protocol
from serve.batching import BlockUpdate, SampleFailure, SampleRequest
from serve.config import ServeConfig
from serve.protocol import ChatCompletionRequest, CompletionRequest
from serve.text import TextAssembler, make_decoder
from serve.validation import (
    ModelInfo,
    RequestError,
    chat_prompt,
    check_model_name,
    completion_prompts,
    resolve_sampling,
    sample_requests,
)

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-wrap", "function-after"}


class Overloaded(Exception):
    """No sampler can take the request now (queue full, replica gone): answer 503."""


class BodyTooLarge(HTTPException):
    """A request body passed the cap while it was read. An HTTPException because FastAPI passes
    those through from body parsing as they are (any other error there becomes a 400)."""


class SamplerBackend(Protocol):
    def stream(self, request: SampleRequest) -> AsyncIterator[BlockUpdate | SampleFailure]: ...

    async def ready(self) -> dict[str, Any]: ...


class OpenAIServer:
    """Request handling shared by both endpoints: validate, fan prompts out to the sampler,
    assemble text, answer as JSON or SSE."""

    def __init__(self, backend: SamplerBackend, tokenizer: Any, model: ModelInfo, config: ServeConfig,
                 api_key: str | None = None, max_in_flight: int | None = None) -> None:
        self.backend, self.tokenizer, self.model, self.config = backend, tokenizer, model, config
        self.api_key = api_key
        self.max_in_flight = max_in_flight  # prompts being sampled at once (None: no limit here)
        self.in_flight = 0
        self.decode = make_decoder(tokenizer)
        self.stop_ids = frozenset(i for i in (model.eos_id, model.eot_id) if i is not None)
        self.created = int(time.time())

    # ------------------------------------------------------------ endpoints

    async def completions(self, body: CompletionRequest) -> Response:
        check_model_name(body.model, self.config.model_name)
        sampling = resolve_sampling(body, body.max_tokens, self.config)
        prompts = completion_prompts(body, self.tokenizer, self.config)
        requests = sample_requests(prompts, sampling, self.model, self.config, "prompt", body.stream)
        return await self._answer(body, requests, chat=False)

    async def chat_completions(self, body: ChatCompletionRequest) -> Response:
        check_model_name(body.model, self.config.model_name)
        sampling = resolve_sampling(body, body.requested_max_tokens(), self.config)
        prompts = [chat_prompt(body, self.tokenizer, self.config)]
        requests = sample_requests(prompts, sampling, self.model, self.config, "messages", body.stream)
        return await self._answer(body, requests, chat=True)

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [protocol.model_card(self.config.model_name, self.created)]}

    def model_card(self, model_id: str) -> dict[str, Any]:
        check_model_name(model_id, self.config.model_name)
        return protocol.model_card(self.config.model_name, self.created)

    def authorized(self, authorization: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def full(self) -> bool:
        """Whether the samplers hold all the prompts this ingress may send them."""
        return self.max_in_flight is not None and self.in_flight >= self.max_in_flight

    # ------------------------------------------------------------ answering

    async def _answer(self, body: Any, requests: list[SampleRequest], chat: bool) -> Response:
        stop_ids = () if body.ignore_eos else self.stop_ids
        assemblers = [TextAssembler(self.decode, stop_ids, body.stop_sequences()) for _ in requests]
        prompt_tokens = sum(len(r.prompt_ids) for r in requests)
        forwards = [0] * len(requests)  # model forwards of each choice so far
        response_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        events = self._events(requests)
        if body.stream:
            # Wait for the first block before answering, so that 503/504/4xx from the sampler
            # still become the response status instead of an error inside a 200 stream.
            try:
                first = await anext(events, None)
            except BaseException:
                await events.aclose()
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._sse(events, first, assemblers, forwards, response_id, chat, include_usage, prompt_tokens)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              **origin_headers([first[1]] if first else [])})
        updates: list[BlockUpdate] = []
        async with aclosing(events):
            async for index, update in events:
                updates.append(update)
                forwards[index] += update.forwards
                _apply(assemblers[index], update)
                if all(a.finished for a in assemblers):
                    break
        for assembler in assemblers:  # a stream that ended without its final block
            if not assembler.finished:
                assembler.close()
        usage = protocol.usage(prompt_tokens, sum(a.completion_tokens for a in assemblers), sum(forwards))
        if chat:
            choices = [{"index": 0, "message": {"role": "assistant", "content": assemblers[0].text},
                        "logprobs": None, "finish_reason": assemblers[0].finish_reason}]
            return JSONResponse(protocol.chat_body(response_id, self.config.model_name, choices, usage),
                                headers=origin_headers(updates))
        choices = [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                   for i, a in enumerate(assemblers)]
        return JSONResponse(protocol.completion_body(response_id, self.config.model_name, choices, usage),
                            headers=origin_headers(updates))

    async def _events(self, requests: Sequence[SampleRequest]) -> AsyncIterator[tuple[int, BlockUpdate]]:
        """(choice index, block) from every request's stream as they arrive, until all end.
        Raises RequestError (sampler failures, timeout) and Overloaded."""
        if self.max_in_flight is not None and self.in_flight + len(requests) > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} prompts in progress, {len(requests)} more asked for")
        queue: asyncio.Queue = asyncio.Queue()
        end = object()

        async def pump(index: int, request: SampleRequest) -> None:
            try:
                async for item in self.backend.stream(request):
                    queue.put_nowait((index, item))
            except Exception as error:  # handed to the consumer, which raises it
                queue.put_nowait((index, error))
            finally:
                queue.put_nowait((index, end))

        self.in_flight += len(requests)  # all or none: a request is never half answered for lack of room
        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        deadline = requests[0].deadline
        try:
            remaining = len(requests)
            while remaining:
                try:
                    index, item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.time()))
                except asyncio.TimeoutError:
                    raise RequestError(504, f"the request did not finish within this server's request timeout "
                                       f"of {self.config.request_timeout_s:g} s", code="timeout",
                                       kind="timeout_error") from None
                if item is end:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                elif isinstance(item, SampleFailure) and item.status == 503:
                    raise Overloaded(item.message)
                elif isinstance(item, SampleFailure):
                    kind = "invalid_request_error" if item.status < 500 else "server_error"
                    raise RequestError(item.status, item.message, kind=kind)
                else:
                    yield index, item
        finally:
            self.in_flight -= len(requests)
            for task in tasks:
                task.cancel()

    async def _sse(self, events: AsyncIterator[tuple[int, BlockUpdate]], first: tuple[int, BlockUpdate] | None,
                   assemblers: list[TextAssembler], forwards: list[int], response_id: str, chat: bool,
                   include_usage: bool, prompt_tokens: int) -> AsyncIterator[str]:
        model, announced = self.config.model_name, set()

        def chunk(index: int, text: str | None, finish_reason: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
                    ({} if text is None else {"content": text})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                body = protocol.chat_body(response_id, model, [choice], None, chunk=True)
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
                body = protocol.completion_body(response_id, model, [choice], None, chunk=True)
            return _sse_data(body)

        async with aclosing(events):
            try:
                if chat:
                    yield chunk(0, None, None, role=True)
                item: tuple[int, BlockUpdate] | None = first
                while item is not None:
                    index, update = item
                    assembler = assemblers[index]
                    forwards[index] += update.forwards
                    if index not in announced:
                        delta = _apply(assembler, update)
                        if delta or assembler.finished:
                            yield chunk(index, delta or None, assembler.finish_reason)
                        if assembler.finished:
                            announced.add(index)
                    if len(announced) == len(assemblers):
                        break
                    item = await anext(events, None)
            except (RequestError, Overloaded) as error:
                status = error.status if isinstance(error, RequestError) else 503
                yield _sse_data(protocol.error_body(str(error), "server_error" if status >= 500 else
                                                    "invalid_request_error", code=str(status)))
                return
        for index, assembler in enumerate(assemblers):
            if index not in announced:  # a stream that ended without its final block
                yield chunk(index, assembler.close() or None, assembler.finish_reason)
        if include_usage:
            usage = protocol.usage(prompt_tokens, sum(a.completion_tokens for a in assemblers), sum(forwards))
            body = (protocol.chat_body if chat else protocol.completion_body)(response_id, model, [], usage, chunk=True)
            yield _sse_data(body)
        yield "data: [DONE]\n\n"


CHECKPOINT_HEADER = "X-LLaDA-Checkpoint"
REPLICA_HEADER = "X-LLaDA-Replica"


def origin_headers(updates: Sequence[BlockUpdate]) -> dict[str, str]:
    """``X-LLaDA-Checkpoint`` / ``X-LLaDA-Replica``: the checkpoint (serve/checkpoint.py:
    checkpoint_label) and replica that sampled the answer; during a roll-out a request of several
    prompts may be answered by both checkpoints, listed in order. A streamed answer names those
    of its first block (the headers go out before the rest)."""
    headers = {}
    for name, values in ((CHECKPOINT_HEADER, [u.checkpoint for u in updates]),
                         (REPLICA_HEADER, [u.replica for u in updates])):
        distinct = list(dict.fromkeys(value for value in values if value))
        if distinct:
            headers[name] = ", ".join(distinct)
    return headers


def _apply(assembler: TextAssembler, update: BlockUpdate) -> str:
    delta = assembler.add(update.token_ids)
    if update.final and not assembler.finished:
        delta += assembler.close()
    return delta


def _sse_data(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------- the FastAPI app


def create_app(server: OpenAIServer) -> FastAPI:
    """The FastAPI app of the API over ``server``."""
    app = FastAPI(title="llada-platform", version="1", description=__doc__)
    _install_error_handlers(app)
    openapi.install(app)
    app.add_middleware(Guard, server=server)

    @app.get("/health", response_model=None, responses=openapi.responses(
        protocol.Health, openapi.PUBLIC_ERRORS, ok_description="The ingress is up."))
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/ready", response_model=None, responses={
        **openapi.responses(protocol.Ready, openapi.PUBLIC_ERRORS, ok_description="A sampler replica answered."),
        503: {"model": protocol.NotReady, "description": "No sampler replica answered (yet)."}})
    async def ready() -> Response:
        try:
            details = await asyncio.wait_for(server.backend.ready(), READY_TIMEOUT_S)
        except Exception as error:  # not ready, whatever the reason; the message says which
            return JSONResponse({"status": "not ready", "reason": f"{type(error).__name__}: {error}"[:500]},
                                status_code=503)
        return JSONResponse({"status": "ready", "model": server.config.model_name, **details})

    @app.get("/v1/models", response_model=None, openapi_extra=openapi.BEARER,
             responses=openapi.responses(protocol.ModelList, openapi.V1_READ_ERRORS,
                                         ok_description="The served model."))
    async def list_models() -> Response:
        return JSONResponse(server.models())

    @app.get("/v1/models/{model_id:path}", response_model=None, openapi_extra=openapi.BEARER,
             responses=openapi.responses(protocol.ModelCard, openapi.V1_MODEL_ERRORS))
    async def retrieve_model(model_id: str) -> Response:
        return JSONResponse(server.model_card(model_id))

    @app.post("/v1/completions", response_model=None, openapi_extra=openapi.BEARER,
              responses=openapi.responses(protocol.CompletionResponse, openapi.V1_SAMPLE_ERRORS,
                                          chunk=protocol.CompletionChunk))
    async def completions(body: CompletionRequest) -> Response:
        return await server.completions(body)

    @app.post("/v1/chat/completions", response_model=None, openapi_extra=openapi.BEARER,
              responses=openapi.responses(protocol.ChatCompletionResponse, openapi.V1_SAMPLE_ERRORS,
                                          chunk=protocol.ChatCompletionChunk))
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        return await server.chat_completions(body)

    return app


class Guard:
    """ASGI middleware in front of every route: the body cap and the API key.

    A body over ``limits.max_request_bytes`` gets 413: a declared size (Content-Length) is
    refused before anything is read, and a body without one (chunked transfer encoding) is
    counted as it arrives and refused once the count passes the cap, so it is never held in
    memory whole. /v1/* needs the key when the server has one (401 otherwise).

    Admission: while the samplers hold all they can (:meth:`OpenAIServer.full`), a completion or
    chat completion gets 503 with Retry-After before its body is read, so a request they could
    not take costs no parsing, tokenising or call to a replica. Under 4x overload on a laptop
    those refusals took as much CPU as the answers and left the model short of it
    (benchmarks/RESULTS.md, "Serving under real traffic").

    Plain ASGI rather than ``@app.middleware``: Starlette's BaseHTTPMiddleware reads the body in
    a task group, which would wrap the 413 raised while counting in an ExceptionGroup that
    FastAPI turns into a 400.
    """

    def __init__(self, app: ASGIApp, server: OpenAIServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        cap, received = self.server.config.limits.max_request_bytes, 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    raise BodyTooLarge(413, f"request body: more than {cap} bytes received, over this server's cap")
            return message

        await self.app(scope, counted, send)

    def _refusal(self, scope: Scope) -> Response | None:
        headers, cap = Headers(scope=scope), self.server.config.limits.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            return _error(413, f"request body: {declared} bytes exceed this server's cap of {cap}",
                          code="request_too_large")
        if _route(scope).startswith("/v1/") and not self.server.authorized(headers.get("authorization")):
            return _error(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                          kind="authentication_error", code="invalid_api_key",
                          headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] == "POST" and _route(scope) in SAMPLING_ROUTES and self.server.full():
            return _overloaded(f"{self.server.in_flight} prompts in progress")
        return None


SAMPLING_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions"})


def _route(scope: Scope) -> str:
    """The request's path inside the app (without the app's route prefix)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _overloaded(reason: str) -> JSONResponse:
    return _error(503, f"the server is at capacity, retry later ({reason})", kind="server_error",
                  code="overloaded", headers={"Retry-After": "1"})


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param, code), status_code=status, headers=headers)


def validation_message(errors: Sequence[Any]) -> tuple[str | None, str]:
    """(param, message) for the first pydantic error of a request body, naming the field."""
    if not errors:
        return None, "invalid request body"
    error = errors[0]
    kind = error.get("type", "")
    path = [str(p) for p in error.get("loc", ()) if p != "body"
            and not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    field = (error.get("ctx") or {}).get("param")  # a model-level check names its field here
    if isinstance(field, str):
        path.append(field)
    param = ".".join(path) or None
    if kind == "json_invalid":
        return None, f"request body: not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
    if kind in ("missing", "model_attributes_type", "dict_type") and param is None:
        return None, "request body: expected a JSON object"
    if kind == "extra_forbidden":
        return param, f"{param}: unknown field (see /docs for the accepted fields)"
    message = str(error.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    return param, f"{param}: {message}" if param and not message.startswith(f"{param}:") else message


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(_: Request, error: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 503 else None  # as documented for every 503
        return _error(error.status, error.message, error.kind, error.param, error.code, headers)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(_: Request, error: BodyTooLarge) -> JSONResponse:
        return _error(413, str(error.detail), code="request_too_large")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, error: RequestValidationError) -> JSONResponse:
        param, message = validation_message(error.errors())
        return _error(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(
            error.status_code, str(error.detail))
        return _error(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, error: Overloaded) -> JSONResponse:
        return _overloaded(str(error))

    @app.exception_handler(Exception)
    async def internal(_: Request, error: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=error)
        return _error(500, f"internal error: {type(error).__name__}", kind="server_error")
