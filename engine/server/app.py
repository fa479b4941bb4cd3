"""The OpenAI-compatible FastAPI app: `build_app(engine, settings)`.

The app owns no model: it is handed an AsyncLLMEngine (started by the app's
lifespan if nobody started it) and reads everything else from ServerSettings,
so tests can build several apps in one process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import AsyncLLMEngine
from engine.generation_defaults import SamplingDefaults
from engine.server.chat import render_chat
from engine.server.errors import APIError, as_api_error, error_response, install_error_handlers
from engine.server.generation import Generation
from engine.server.metrics import ServerMetrics
from engine.server.prompts import PromptChecker
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice
from engine.server.responses import ChatFormat, CompletionFormat, ResponseFormat, ResponseOptions
from engine.server.responses_api import ResponsesFormat, ResponsesRequest
from engine.server.tokenizer_routes import add_tokenizer_routes
from engine.server.tool_parsers import TOOL_CALL_PARSERS, NamedCallParser, RequiredCallsParser, ToolCallParser

if TYPE_CHECKING:  # xgrammar is imported only once a request asks for a structured output
    from engine.structured_output import GrammarCompiler

T = TypeVar("T")

request_logger = logging.getLogger("kubellm.request")

# Status for a request whose client went away before the response (nginx's convention; never sent).
CLIENT_CLOSED_REQUEST = 499
# Proxies (nginx ingress) must pass each event on at once instead of buffering the stream.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Seconds aborted streams get to deliver their final "abort" chunk before shutdown goes on.
ABORT_FLUSH_SECONDS = 5.0


def kubellm_version() -> str:
    try:
        return version("kubellm")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    shutdown_timeout: float = 30.0  # seconds in-flight requests may take to finish on SIGTERM
    sampling_defaults: SamplingDefaults = field(default_factory=SamplingDefaults)  # --generation-config
    root_path: str = ""  # --root-path: the prefix a proxy serves this app under
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    tool_call_parser: str | None = None  # --tool-call-parser: a TOOL_CALL_PARSERS name


class ServerState:
    """What the routes share: the engine, settings, metrics and whether the server is draining."""

    def __init__(self, engine: AsyncLLMEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine, settings.served_model_name)
        self.draining = False
        self.started = int(time.time())
        self._prompt_checker: PromptChecker | None = None  # built once the model (and tokenizer) loaded
        self._grammar_compiler: GrammarCompiler | None = None  # made on first use (it loads xgrammar)

    async def drain(self) -> None:
        """SIGTERM: stop taking requests, let in-flight ones finish up to the timeout, abort the rest."""
        self.draining = True
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while self.engine.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.engine.num_in_flight:
            self.abort_all()
            abort_deadline = time.monotonic() + ABORT_FLUSH_SECONDS
            while self.engine.num_in_flight and time.monotonic() < abort_deadline:
                await asyncio.sleep(0.05)

    def abort_all(self) -> None:
        """Ends every request now with finish_reason "abort", and refuses any that was still on its way in."""
        self.engine.stop_accepting()
        self.engine.abort_all()

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    async def serve(
        self, request: Request, body: CompletionRequest | ChatCompletionRequest, prompts: list[str | list[int]],
        response_format: ResponseFormat | ResponsesFormat,
    ) -> Response:
        params = body.to_sampling_params(self.settings.sampling_defaults)
        generation = Generation(
            engine=self.engine,
            metrics=self.metrics,
            engine_request_id=response_format.id,
            prompts=self.prompt_checker.checked(prompts, body.truncate_prompt_tokens),
            params=params,
            log_fields=request.state.log_fields,
            beam_search=body.to_beam_search_params(self.settings.sampling_defaults),
            best_of_n=body.best_of_n,
        )
        try:
            if body.stream:
                await until_disconnect(request, generation.start())
                return StreamingResponse(
                    response_format.stream(generation), media_type="text/event-stream",
                    headers=SSE_HEADERS,
                )
            finals = await until_disconnect(request, generation.final_outputs())
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error body
            raise as_api_error(exc) from None
        return JSONResponse(response_format.response(finals))

    def check_accepting(self) -> None:
        """503 while draining, loading or overloaded, before any work is done for the request."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining")
        try:
            self.engine.check_accepting()
        except Exception as exc:  # noqa: BLE001 - mapped to the matching status
            raise as_api_error(exc) from None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    async def check_structured_output(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        """An invalid schema, regex or grammar is a 400 naming its field, before the request is queued.

        Compiling proves the constraint valid against this model's tokenizer (off
        the event loop: a large schema takes a while); the engine core compiles it
        again from xgrammar's cache and applies it while sampling.
        """
        spec = body.structured_output
        if spec is not None:
            await asyncio.to_thread(self.grammar_compiler.compile, spec)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            from engine.structured_output import GrammarCompiler

            limits = self.engine.limits
            self._grammar_compiler = GrammarCompiler(self.tokenizer, limits.vocab_size, limits.eos_token_ids)
        return self._grammar_compiler

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[str, ToolCallParser | None]:
        """The rendered prompt and the parser for tool calls in the reply (None: the reply is all content)."""
        tool_parser = self.tool_parser(body)
        if tool_parser is not None and tool_parser.keeps_special_tokens:
            body.skip_special_tokens = False  # the parser reads the special token its calls start with
        return render_chat(self.tokenizer, body), tool_parser

    def tool_parser(self, body: ChatCompletionRequest) -> ToolCallParser | None:
        """The parser that reads tool calls out of this request's reply; None: the reply is all content."""
        choice = body.effective_tool_choice
        if choice == "none":
            return None
        if isinstance(choice, NamedToolChoice):
            return NamedCallParser(choice.function.name)
        if choice == "required":
            return RequiredCallsParser()
        if not (self.settings.enable_auto_tool_choice and self.settings.tool_call_parser):
            raise APIError(400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                                "to be set", param="tool_choice")
        return TOOL_CALL_PARSERS[self.settings.tool_call_parser]()

    @property
    def prompt_checker(self) -> PromptChecker:
        if self._prompt_checker is None:
            self._prompt_checker = PromptChecker(self.engine.tokenize, self.tokenizer, self.engine.limits.max_model_len)
        return self._prompt_checker


def route_path(scope: Scope) -> str:
    """The request path without --root-path, whether or not the proxy in front already stripped it."""
    root, path = scope.get("root_path", ""), scope["path"]
    return path[len(root):] if root and path.startswith(root) else path


class ClientDisconnected(Exception):
    pass


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


class RequestContextMiddleware:
    """Per request: X-Request-Id in and out, the API key check and one JSON log line for /v1 routes.

    Pure ASGI rather than BaseHTTPMiddleware, so streams stay unbuffered.
    """

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = headers.get("x-request-id") or uuid.uuid4().hex
        log_fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=request_id, log_fields=log_fields)
        started = time.monotonic()
        status: int | None = None  # None: no response was started (the client left, or the app crashed)

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        is_api = route_path(scope).startswith("/v1")
        try:
            if self.api_key is not None and is_api and not self._authorized(headers):
                response = error_response(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                          code="invalid_api_key")
                await response(scope, receive, send_with_request_id)
            else:
                await self.app(scope, receive, send_with_request_id)
        finally:
            if is_api:  # probes and scrapes would drown the log
                request_logger.info("request", extra={
                    "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "total_time_s": round(time.monotonic() - started, 6), **log_fields,
                })

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    state = ServerState(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.is_started:
            engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="kubellm", version=kubellm_version(), lifespan=lifespan)
    app.root_path = settings.root_path  # as vLLM sets it: routes answer with and without the prefix
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, api_key=settings.api_key)

    @app.get("/health")
    async def health() -> Response:
        """Liveness: the process runs and the engine core has not died (loading counts as alive)."""
        if not engine.is_alive:
            return error_response(503, f"the engine core is dead: {engine.error}", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Readiness: the model is loaded, the engine core runs and the server is not draining."""
        if state.draining:
            return error_response(503, "the server is shutting down", code="draining")
        if not engine.is_ready:
            reason = "the model is loading" if engine.is_alive else f"the engine core is dead: {engine.error}"
            return error_response(503, reason, code="not_ready")
        return JSONResponse({"status": "ready"})

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": kubellm_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card: dict[str, Any] = {
            "id": settings.served_model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "kubellm",
        }
        if engine.is_loaded:
            card["max_model_len"] = engine.limits.max_model_len
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        body.check_supported()
        state.check_accepting()
        await state.check_structured_output(body)
        prompts = body.prompts
        echo_prompts = [state.prompt_checker.text(p) for p in prompts] if body.echo else None
        response_format = CompletionFormat(settings.served_model_name, state.tokenizer,
                                           _response_options(body, body.logprobs), echo_prompts=echo_prompts,
                                           echo_only=body.echo_only)
        return await state.serve(request, body, prompts, response_format)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_model(body.model)
        body.check_supported()
        state.check_accepting()
        await state.check_structured_output(body)
        prompt, tool_parser = state.chat_prompt(body)
        last = body.messages[-1]
        echo = last.text if body.echo and last.role == body.reply_role else ""
        response_format = ChatFormat(settings.served_model_name, state.tokenizer,
                                     _response_options(body, body.num_top_logprobs), role=body.reply_role, echo=echo,
                                     tool_parser=tool_parser, parallel_tool_calls=body.parallel_tool_calls is not False)
        return await state.serve(request, body, [prompt], response_format)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        state.check_model(body.model)
        chat = body.to_chat()
        chat.check_supported()
        state.check_accepting()
        await state.check_structured_output(chat)
        prompt, tool_parser = state.chat_prompt(chat)
        return await state.serve(request, chat, [prompt], ResponsesFormat(settings.served_model_name, body, tool_parser))

    add_tokenizer_routes(app, state)
    return app


def _response_options(body: CompletionRequest | ChatCompletionRequest, top_logprobs: int | None) -> ResponseOptions:
    return ResponseOptions(n=body.n, top_logprobs=top_logprobs, include_usage=body.include_usage,
                           continuous_usage=body.continuous_usage, return_token_ids=body.return_token_ids,
                           tokens_as_ids=body.return_tokens_as_token_ids,
                           prompt_logprobs=body.prompt_logprobs is not None)
