"""The HTTP API: OpenAI-compatible invocation, the admin API, /healthz and /metrics.

Every error leaves as OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
the status code a client can act on. A request finds its instance (and pays any cold start)
before the response starts, so overload is a real 429/503 with `Retry-After` and the cold-start
facts travel as headers (`x-stoke-cold-start`, `x-stoke-node`, `x-stoke-load-ms`,
`x-stoke-tier`) on streaming responses too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.registry import FunctionRecord
from controller.router import (
    LoadRejected,
    Overloaded,
    Placement,
    TokenStream,
    UpstreamError,
    new_request_id,
)
from controller.schemas import ChatCompletionRequest, CompletionRequest, error_body
from controller.service import AdminError, Controller, unknown_function
from controller.spec import SpecError, spec_from_dict
from controller.state import RequestState
from node_agent.facts.errors import TokenizerError
from node_agent.proto import node_agent_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(
            error_body(str(self), self.type, self.code, self.param),
            status_code=self.status,
            headers=self.headers,
        )


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps(
            error_body(
                f"request body is larger than {self.limit} bytes; send a shorter prompt.",
                "invalid_request_error",
                "request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def create_app(controller: Controller) -> ASGIApp:
    config = controller.config
    app = FastAPI(title="stoke", docs_url=None, redoc_url=None, openapi_url=None)
    invoke_keys = [k.encode() for k in (*config.invoke_keys, *config.admin_keys)]
    admin_keys = [k.encode() for k in config.admin_keys]

    def check_key(request: Request, keys: list[bytes], role: str) -> None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                f"missing API key: send 'Authorization: Bearer <{role} key>' "
                "(the openai client sends its api_key this way).",
                "authentication_error",
                "missing_api_key",
            )
        got = token.strip().encode()
        if not any(hmac.compare_digest(got, key) for key in keys):
            raise ApiError(
                401, f"invalid {role} API key.", "authentication_error", "invalid_api_key"
            )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(AdminError)
    async def _admin_error(request: Request, exc: AdminError) -> JSONResponse:
        return ApiError(exc.status, str(exc), code=exc.code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        raw = await request.body()
        try:
            return model.model_validate_json(raw)  # one pass, no dict in between
        except ValidationError as exc:
            if not any(e["type"] == "json_invalid" for e in exc.errors()):
                raise _ValidationFailed(exc.errors()) from None
        # pydantic's parser refuses some JSON that json accepts (a byte-order mark, UTF-16,
        # nesting past 200 levels): the body is judged by json, as OpenAI's clients expect.
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the body nests too deeply.", code="invalid_json") from None
        try:
            return model.model_validate(doc)
        except ValidationError as exc:
            raise _ValidationFailed(exc.errors()) from None

    @app.exception_handler(_ValidationFailed)
    async def _invalid(request: Request, exc: _ValidationFailed) -> JSONResponse:
        return _validation_response(exc.errors)

    # ---- OpenAI-compatible ---------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_key(request, invoke_keys, "invoke")
        return {"object": "list", "data": [_model_card(f) for f in controller.functions()]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, request: Request) -> dict[str, Any]:
        check_key(request, invoke_keys, "invoke")
        return _model_card(_function(controller, name))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_key(request, invoke_keys, "invoke")
        body: CompletionRequest = await parse(request, CompletionRequest)
        fn = _function(controller, body.model)
        _refuse_unsupported(body)
        if body.prompt_count() != 1:
            raise ApiError(400, "prompt: send one prompt per request.", param="prompt")
        prompt = body.prompt_input()
        tokenizer = fn.model.tokenizer
        if isinstance(prompt, str):
            prompt_ids = tokenizer.encode(prompt)
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= t < tokenizer.vocab_size for t in prompt_ids):
                raise ApiError(400, f"prompt: token ids must be in [0, {tokenizer.vocab_size}).")
        return await _invoke(controller, request, fn, body, prompt_ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request, invoke_keys, "invoke")
        body: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        fn = _function(controller, body.model)
        _refuse_unsupported(body)
        tokenizer = fn.model.tokenizer
        if not tokenizer.has_chat_template:
            raise ApiError(
                400,
                f"model {fn.name} has no chat template; use /v1/completions with a plain prompt.",
                code="no_chat_template",
            )
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages)
        except TokenizerError as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from None
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)
        return await _invoke(
            controller, request, fn, body, prompt_ids, body.wanted_tokens(), chat=True
        )

    # ---- admin ---------------------------------------------------------------------------

    @app.get("/admin/functions")
    async def admin_list(request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        return {"functions": [controller.describe(f) for f in controller.functions()]}

    @app.get("/admin/functions/{name}")
    async def admin_get(name: str, request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        return controller.describe(_function(controller, name))

    @app.put("/admin/functions/{name}")
    async def admin_put(name: str, request: Request) -> JSONResponse:
        check_key(request, admin_keys, "admin")
        raw = await request.body()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(doc, dict):
            raise ApiError(400, 'the body must be a function spec object, e.g. {"model": ...}.')
        try:
            spec = spec_from_dict(doc)
        except SpecError as exc:
            raise ApiError(422, f"invalid function spec: {exc}", code="invalid_spec") from None
        record, created = await controller.deploy(name, spec)
        return JSONResponse(controller.describe(record), status_code=201 if created else 200)

    @app.delete("/admin/functions/{name}")
    async def admin_delete(name: str, request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        controller.delete(name)
        return {"deleted": name}

    @app.get("/admin/nodes")
    async def admin_nodes(request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        return {"nodes": controller.describe_nodes()}

    @app.post("/admin/nodes/{node_id}/drain")
    async def admin_drain(node_id: str, request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        return await controller.drain(node_id)

    @app.post("/admin/nodes/{node_id}/undrain")
    async def admin_undrain(node_id: str, request: Request) -> dict[str, Any]:
        check_key(request, admin_keys, "admin")
        return await controller.undrain(node_id)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        alive = sum(n.alive for n in controller.state.nodes.values())
        return {"status": "ok", "nodes_alive": alive, "functions": len(controller.functions())}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_key(request, admin_keys, "admin")
        return Response(controller.metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    hot = {"/v1/completions": completions, "/v1/chat/completions": chat_completions}
    return _HotPath(app, hot, config.max_body_bytes)


_Handler = Callable[[Request], Awaitable[Response]]


class _HotPath:
    """ASGI: `POST` to an invocation endpoint goes straight to its handler, past FastAPI's
    middleware and routing layers (~0.2 ms of each request's way to its first token, measured);
    everything else (and every other method on those paths) goes to `app`."""

    def __init__(self, app: ASGIApp, routes: Mapping[str, _Handler], limit: int) -> None:
        self.app, self.routes = app, routes
        self._limited = BodyLimit(self._serve, limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            await self._limited(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await self.routes[scope["path"]](request)
        except ApiError as exc:
            response = exc.response()
        except _ValidationFailed as exc:
            response = _validation_response(exc.errors)
        await response(scope, receive, send)


class _ValidationFailed(Exception):
    def __init__(self, errors: Any) -> None:
        super().__init__("validation failed")
        self.errors = errors


def _validation_response(errors: Any) -> JSONResponse:
    problems = []
    first_param = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        problems.append(f"{where}: {err.get('msg')}")
    return ApiError(
        400, "; ".join(problems) or "invalid request", code="invalid_value", param=first_param
    ).response()


def _function(controller: Controller, name: str) -> FunctionRecord:
    fn = controller.function(name)
    if fn is None:
        raise ApiError(404, unknown_function(name), code="model_not_found", param="model")
    return fn


def _model_card(fn: FunctionRecord) -> dict[str, Any]:
    return {"id": fn.name, "object": "model", "created": int(fn.created_at), "owned_by": "stoke"}


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    problem = body.unsupported()
    if problem is not None:
        raise ApiError(400, problem, param=problem.split(":")[0])


def _sampling(
    fn: FunctionRecord,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    wanted: int | None,
) -> dict[str, Any]:
    gen = fn.spec.generation
    max_tokens = wanted or gen.max_tokens
    if gen.max_tokens_limit is not None and max_tokens > gen.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} is over this function's limit of {gen.max_tokens_limit}.",
            param="max_tokens",
            code="max_tokens_too_large",
        )
    if not prompt_ids:
        raise ApiError(400, "prompt: empty; send at least one token of text.", param="prompt")
    context = fn.context_length
    if len(prompt_ids) + max_tokens > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the prompt, "
            f"{max_tokens} for the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return {
        "max_tokens": max_tokens,
        "temperature": body.temperature if body.temperature is not None else gen.temperature,
        "top_p": body.top_p if body.top_p is not None else gen.top_p,
        "seed": body.seed if body.seed is not None else secrets.randbits(63),
        "stop": body.stop_list(),
    }


async def _invoke(
    controller: Controller,
    request: Request,
    fn: FunctionRecord,
    body: CompletionRequest | ChatCompletionRequest,
    prompt_ids: list[int],
    wanted: int | None,
    *,
    chat: bool,
) -> Response:
    endpoint = "chat" if chat else "completions"
    metrics = controller.metrics
    arrived = time.perf_counter()
    params = _sampling(fn, body, prompt_ids, wanted)
    state = RequestState(
        new_request_id("chatcmpl" if chat else "cmpl"), fn.name, prompt_ids, params
    )
    try:
        placement = controller.router.try_route(fn) or await _acquire_unless_gone(
            controller, request, fn
        )
    except Overloaded as exc:
        metrics.requests.labels(fn.name, endpoint, str(exc.status)).inc()
        raise ApiError(
            exc.status,
            str(exc),
            "overloaded_error",
            "overloaded",
            headers={"Retry-After": str(max(1, round(exc.retry_after_s)))},
        ) from None
    except LoadRejected as exc:
        metrics.requests.labels(fn.name, endpoint, "503").inc()
        raise ApiError(
            503,
            f"{fn.name} cannot be started as deployed: {exc}. Fix its spec and deploy it again.",
            "server_error",
            "load_rejected",
        ) from None
    headers = {
        "x-stoke-cold-start": "true" if placement.cold_start else "false",
        "x-stoke-node": placement.node_id,
        "x-stoke-load-ms": f"{placement.load_ms:.1f}",
        "x-stoke-tier": placement.tier or "",
        "x-stoke-instance": placement.instance.instance_id,
        "x-request-id": state.request_id,
    }
    # The node starts generating now, while the response is set up; the stream holds the slot
    # until it is closed, which both paths below do however the request ends.
    stream = controller.router.open_stream(fn, state, placement)
    await asyncio.sleep(0)  # the call's send task runs now, before the response is built
    shape = _Shape(state.request_id, fn.name, chat)
    first_token: list[float] = []

    def on_token() -> None:
        if not first_token:
            first_token.append(time.perf_counter())
            metrics.ttft.labels(fn.name, str(placement.cold_start).lower()).observe(
                first_token[0] - arrived
            )
        metrics.tokens.labels(fn.name).inc()

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        metrics.requests.labels(fn.name, endpoint, "200").inc()
        return _TokenResponse(
            stream,
            _sse(shape, stream, state, include_usage, on_token),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    collect = asyncio.ensure_future(_collect(stream, on_token))
    # a collector cancelled before it ever ran never closes the stream itself
    collect.add_done_callback(lambda _: stream.close_soon())
    try:
        text, finish = await _unless_disconnected(request, collect)
    except UpstreamError as exc:
        metrics.requests.labels(fn.name, endpoint, "502").inc()
        raise ApiError(502, f"the node failed this request: {exc}", "server_error") from None
    except (Overloaded, LoadRejected) as exc:  # its node failed and no other could take over
        metrics.requests.labels(fn.name, endpoint, "503").inc()
        raise ApiError(
            503, f"the node failed this request and no other could resume it: {exc}",
            "server_error", "resume_failed",
        ) from None  # fmt: skip
    metrics.requests.labels(fn.name, endpoint, "200").inc()
    return JSONResponse(shape.whole(text, finish, state), headers=headers)


async def _acquire_unless_gone(
    controller: Controller, request: Request, fn: FunctionRecord
) -> Placement:
    """Find an instance; give up (and free what was held) if the client disconnects."""
    task = asyncio.ensure_future(controller.router.acquire(fn))
    try:
        return await _unless_disconnected(request, task)
    except asyncio.CancelledError:
        if task.done() and not task.cancelled() and task.exception() is None:
            controller.router.release(task.result().instance)
        raise


async def _unless_disconnected(request: Request, task: asyncio.Future[Any]) -> Any:
    """`await task`, but cancel it if the client goes away first."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError("client disconnected")


class _TokenResponse(StreamingResponse):
    """The SSE response of one `TokenStream`, which it closes however the response ends:
    streamed to the end, the client gone before or during it, or the response start failing."""

    def __init__(self, stream: TokenStream, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._stream.aclose()


async def _collect(events: TokenStream, on_token: Callable[[], None]) -> tuple[str, str]:
    parts: list[str] = []
    finish = "stop"
    async with contextlib.aclosing(events) as stream:
        async for event in stream:
            if event.has_token:
                on_token()
            parts.append(event.text)
            if event.finish_reason == pb.FINISH_REASON_ERROR:
                raise UpstreamError(event.error or "the instance failed")
            if event.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                finish = _FINISH.get(event.finish_reason, "stop")
    return "".join(parts), finish


async def _sse(
    shape: _Shape,
    events: TokenStream,
    state: RequestState,
    include_usage: bool,
    on_token: Callable[[], None],
) -> AsyncIterator[bytes]:
    def data(doc: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"

    if shape.chat:
        yield data(shape.chunk({"role": "assistant", "content": ""}, None))
    try:
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if event.has_token:
                    on_token()
                if event.finish_reason == pb.FINISH_REASON_ERROR:
                    raise UpstreamError(event.error or "the instance failed")
                finish = _FINISH.get(event.finish_reason)
                if event.text:
                    yield data(shape.chunk({"content": event.text}, None))
                if finish:
                    yield data(shape.chunk({}, finish))
    except UpstreamError as exc:
        yield data(error_body(f"the node failed this request: {exc}", "server_error"))
        return
    except (Overloaded, LoadRejected) as exc:  # its node failed and no other could take over
        message = f"the node failed this request and no other could resume it: {exc}"
        yield data(error_body(message, "server_error", "resume_failed"))
        return
    if include_usage:
        yield data(shape.usage_chunk(state))
    yield b"data: [DONE]\n\n"


class _Shape:
    """OpenAI's response documents for one request."""

    def __init__(self, request_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = request_id, model, chat
        self.created = int(time.time())

    def _doc(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return self._doc("chat.completion.chunk", [choice])
        choice = {
            "index": 0,
            "text": delta.get("content", ""),
            "logprobs": None,
            "finish_reason": finish,
        }
        return self._doc("text_completion", [choice])

    def usage_chunk(self, state: RequestState) -> dict[str, Any]:
        doc = self._doc("chat.completion.chunk" if self.chat else "text_completion", [])
        doc["usage"] = _usage(state)
        return doc

    def whole(self, text: str, finish: str, state: RequestState) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            doc = self._doc("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            doc = self._doc("text_completion", [choice])
        doc["usage"] = _usage(state)
        return doc


def _usage(state: RequestState) -> dict[str, int]:
    prompt, completion = len(state.prompt_ids), len(state.output_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
