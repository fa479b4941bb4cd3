"""LLMEngine: the in-process front end: text in, RequestOutputs out, one EngineCore step per step().

Synchronous and single-threaded: the offline LLM class drives it in a loop.
It tokenizes and checks each request completely in add_request (so a bad one
raises there and never disturbs the requests already running), steps the
core, and turns the core's token deltas into text with an OutputProcessor.
The API server runs the same two halves in two processes (engine.core_process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from engine.config import EngineConfig
from engine.core_messages import EngineStats
from engine.engine_core import EngineCore
from engine.errors import InvalidRequestError
from engine.output_processor import OutputKind, OutputProcessor, new_request
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import ChatTemplate, tokenize_prompt
from engine.tokenizer_loader import load_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.core = EngineCore(config)
        self.config = self.core.config
        self.model_config = self.core.model_config
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        self.chat_template = ChatTemplate(self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> None:
        if request_id in self.output_processor.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        state, core_request = new_request(self.tokenizer, self.core.limits, request_id, prompt, params, output_kind,
                                          arrival_time or time.monotonic())
        self.output_processor.add_request(state)
        self.core.add_request(core_request)

    def abort_request(self, request_id: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests and free their blocks now; unknown or finished ids are ignored.

        Returns the last output of each request that was still running (finish_reason "abort").
        """
        request_ids = [request_id] if isinstance(request_id, str) else list(request_id)
        aborted = [self.output_processor.abort_request(rid) for rid in request_ids]
        self.core.abort_requests(request_ids)
        return [output for output in aborted if output is not None]

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        processed = self.output_processor.process(self.core.step())
        self.core.stop_sequences(processed.stopped)
        return processed.outputs

    def check_health(self) -> None:
        self.core.check_health()

    def shutdown(self) -> None:
        self.core.shutdown()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    def tokenize(self, text: str) -> list[int]:
        return tokenize_prompt(self.tokenizer, text)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.chat_template.render(messages)
