"""AsyncLLMEngine: the API server's engine: requests in, asyncio streams of RequestOutputs out.

It keeps everything about text in the API process (the tokenizer, chat
templates, prompt checks, detokenizing) and drives an engine core that runs
in a process of its own (engine.core_client, engine.core_process), so the
step loop never shares a GIL with the HTTP event loop. A request is
tokenized and checked against the core's limits before it is sent, so a bad
one fails alone (a 400) and never reaches the core. If the core dies, every
open stream receives EngineDeadError and `is_alive` turns false, so health
checks fail instead of requests hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from functools import partial

from engine.beam_search import BeamSearch, BeamSearchParams, completion_outputs, new_search
from engine.config import EngineConfig
from engine.core_client import CoreClient
from engine.core_messages import CoreLimits, EngineStats, TokenLogprobs
from engine.errors import EngineDeadError, InvalidRequestError, KubellmError
from engine.output_processor import OutputKind, OutputProcessor, new_request
from engine.outputs import RequestMetrics, RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import ChatTemplate, tokenize_prompt
from engine.tokenizer_loader import load_tokenizer


# A loaded core sends a message at least every second (a step's outputs or an idle heartbeat);
# this much silence means it is stuck (e.g. a collective waiting on a wedged tensor-parallel rank).
# Far above any real step, first-use kernel compilation included.
CORE_HANG_TIMEOUT_S = 300.0


class EngineNotReadyError(KubellmError):
    """The model is still loading, or the server is draining; the client should retry later."""


class QueueFullError(KubellmError):
    """More requests are waiting than --max-pending-requests allows."""


class AsyncLLMEngine:
    """The tokenizer and output processing here, the engine core in its own process (or a thread: in_process)."""

    def __init__(self, config: EngineConfig, max_pending_requests: int | None = None, in_process: bool = False,
                 log_level: str | None = None, served_address: str | None = None,
                 hang_timeout: float = CORE_HANG_TIMEOUT_S):
        self.config = config
        self.max_pending_requests = max_pending_requests
        self.hang_timeout = hang_timeout
        self.client = CoreClient(config, in_process=in_process, log_level=log_level, served_address=served_address)
        self.tokenizer = None  # set once loaded, with the chat template
        self.chat_template: ChatTemplate | None = None
        self._load_error: BaseException | None = None
        self._loading: asyncio.Task | None = None
        self._beam_searches: dict[str, BeamSearch] = {}  # running, by request id
        self._accepting = True

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the core and loads the tokenizer; call from the event loop that serves requests."""
        self.client.start()
        self._loading = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        try:
            tokenizer = await asyncio.to_thread(load_tokenizer, self.config.model, self.config.tokenizer)
        except Exception as error:  # noqa: BLE001 - reported through `error`
            # When both fail, the core's error is the one that names the file (config.json, weights).
            with contextlib.suppress(Exception):
                await self.client.wait_until_ready()
                self._load_error = error
            return
        self.client.output_processor = OutputProcessor(tokenizer)
        self.tokenizer, self.chat_template = tokenizer, ChatTemplate(tokenizer)

    def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        self.client.stop()

    async def shutdown(self) -> None:
        """stop(), letting the core finish its step and exit while the event loop keeps running."""
        if self._loading is not None:
            self._loading.cancel()
        await self.client.shutdown()

    def kill_core(self) -> None:
        """Ends the engine core now, mid-step if need be (a second SIGTERM): abort_all() first."""
        self.client.kill_core()

    def stop_accepting(self) -> None:
        """From now on new requests are refused (503): the server is shutting down."""
        self._accepting = False

    @property
    def error(self) -> BaseException | None:
        """Why the engine cannot serve: a load failure, the core's death or silence (None while it is fine)."""
        if self._load_error is not None or self.client.error is not None:
            return self._load_error or self.client.error
        silence = time.monotonic() - self.client.last_heard
        if self.client.ready is not None and silence > self.hang_timeout:
            return EngineDeadError(f"the engine core has sent nothing for {silence:.0f} s; it is hung")
        return None

    @property
    def is_started(self) -> bool:
        return self.client.is_started

    @property
    def is_loaded(self) -> bool:
        return self.client.ready is not None and self.chat_template is not None

    @property
    def is_alive(self) -> bool:
        """Liveness: the core runs (or is still loading), nothing has failed and the core is not hung."""
        return self.client.is_alive and self.error is None

    @property
    def is_ready(self) -> bool:
        return self.is_alive and self.is_loaded

    async def wait_until_loaded(self, poll_interval: float = 0.05) -> None:
        """Returns once the model is loaded; raises the load error if loading failed."""
        while not self.is_loaded:
            if self.error is not None:
                raise self.error
            await asyncio.sleep(poll_interval)

    # --- what the server reads -------------------------------------------------------------

    @property
    def limits(self) -> CoreLimits:
        """The loaded core's limits (max_model_len, ...)."""
        return self.client.limits

    @property
    def stats(self) -> EngineStats | None:
        """The core's EngineStats as of its last message (None before the model is loaded)."""
        return self.client.stats

    @property
    def num_unscheduled(self) -> int:
        """Requests sent to the core that it has not taken in yet."""
        return self.client.num_unscheduled

    @property
    def num_waiting(self) -> int:
        """Queue depth: requests on their way to the core plus the core's waiting requests."""
        core_waiting = self.stats.num_waiting if self.stats is not None else 0
        return self.num_unscheduled + core_waiting

    @property
    def num_in_flight(self) -> int:
        """Requests running: streams, and beam searches (also between their steps)."""
        return len(self.client.streams) + len(self._beam_searches)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.chat_template.render(messages)

    def tokenize(self, text: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, text)

    # --- requests --------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes.

        Leaving the iteration early (client disconnect, cancellation) aborts the
        request, which frees its KV blocks at the core's next step boundary.
        """
        self.check_accepting()
        async for output in self._generate(request_id, prompt, params, arrival_time, output_kind):
            yield output

    async def _generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None,
        output_kind: OutputKind,
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self.client.streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", param="request_id")
        state, core_request = new_request(self.tokenizer, self.limits, request_id, prompt, params, output_kind,
                                          arrival_time or time.monotonic())
        queue = self.client.add_request(core_request, state)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    async def beam_search(
        self,
        request_id: str,
        prompt: str | list[int],
        params: BeamSearchParams,
        arrival_time: float | None = None,
        skip_special_tokens: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """transformers' beam search (engine.beam_search); yields one RequestOutput, when it ends.

        Each step runs every beam as a one-token request (their common full blocks come from
        the prefix cache). abort_all ends it with the best beams so far, finish_reason "abort".
        """
        self.check_accepting()
        if request_id in self._beam_searches:
            raise InvalidRequestError(f"request id {request_id!r} is already in flight", param="request_id")
        arrival_time = arrival_time or time.monotonic()
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        search = new_search(token_ids, params, self.limits)
        self._beam_searches[request_id] = search
        try:
            step = 0
            while not search.done:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._next_token_logprobs(f"{request_id}-{step}-{i}", tokens,
                                                                         search.step_params()))
                             for i, tokens in enumerate(search.pending())]
                results = [task.result() for task in tasks]
                if search.done:  # aborted while the step ran
                    break
                if any(entry is None for entry in results):
                    search.abort()
                else:
                    search.advance(results)
                step += 1
        finally:
            self._beam_searches.pop(request_id, None)
        decode = partial(self.tokenizer.decode, skip_special_tokens=skip_special_tokens)
        yield RequestOutput(request_id, prompt if isinstance(prompt, str) else None, token_ids,
                            completion_outputs(search, decode), finished=True, metrics=RequestMetrics(arrival_time))

    async def _next_token_logprobs(
        self, request_id: str, token_ids: list[int], params: SamplingParams
    ) -> TokenLogprobs | None:
        """The top logprobs of the token after token_ids; None if the request was aborted."""
        async for output in self._generate(request_id, token_ids, params, None, OutputKind.FINAL_ONLY):
            completion = output.outputs[0]
            if completion.finish_reason == "abort":
                return None
            return completion.logprobs[0]
        return None

    def abort(self, request_id: str, notify_client: bool = False) -> None:
        """Abort one request. With notify_client its stream ends with finish_reason 'abort'."""
        self.client.abort_requests([request_id], notify_client)

    def abort_all(self) -> None:
        """Abort every request in flight; their clients see finish_reason 'abort'."""
        for search in self._beam_searches.values():
            search.abort()
        self.client.abort_requests(list(self.client.streams), notify_client=True)

    def check_accepting(self) -> None:
        if self.error is not None:
            raise self.error if isinstance(self.error, EngineDeadError) else EngineDeadError(
                f"the engine failed: {self.error}")
        if not self._accepting:
            raise EngineNotReadyError("the server is shutting down")
        if not self.is_loaded:
            raise EngineNotReadyError("the model is still loading")
        if self.max_pending_requests is not None and self.num_waiting >= self.max_pending_requests:
            raise QueueFullError(
                f"{self.num_waiting} requests are already waiting (--max-pending-requests={self.max_pending_requests})"
            )
