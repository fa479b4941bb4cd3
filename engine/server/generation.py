"""One HTTP request's engine work: its prompts (each with n outputs) merged into one stream.

A completions request may carry several prompts; each becomes one engine
request and their outputs are merged in arrival order. This module also owns
what is measured per request: the latency histograms, the success counter and
the token and timing fields of the request's log line (written by the
middleware when the HTTP request ends, however it ends).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

from engine.async_engine import AsyncLLMEngine
from engine.beam_search import BeamSearchParams
from engine.output_processor import OutputKind
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.server.metrics import ServerMetrics

_END = object()


async def merge(streams: Sequence[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(stream index, item) pairs from several async iterators as they arrive.

    Leaving the merge early cancels every pump, which closes (and so aborts)
    the engine requests that have not finished.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _Progress:
    """Timing of one engine request, for the latency metrics and the log line."""

    arrival: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0  # the longest output's length so far
    queue_time: float | None = None
    total: RequestOutput | None = None  # everything so far: the stream's deltas folded together


@dataclass
class Generation:
    engine: AsyncLLMEngine
    metrics: ServerMetrics
    engine_request_id: str  # unique per HTTP request; engine requests are "<this>-<prompt index>"
    prompts: list[str | list[int]]
    params: SamplingParams
    log_fields: dict  # filled in when the generation ends, for the request's log line
    arrival: float = field(default_factory=time.monotonic)
    beam_search: BeamSearchParams | None = None  # set: beam search instead of sampling `params`
    best_of_n: int | None = None  # set: of params.n outputs per prompt return the n most likely (best_of)

    def __post_init__(self) -> None:
        self._progress = [_Progress(self.arrival) for _ in self.prompts]
        self._merged = merge([self._stream(f"{self.engine_request_id}-{i}", prompt)
                              for i, prompt in enumerate(self.prompts)])
        self._buffered: list[tuple[int, RequestOutput]] = []
        self._finished = False

    def _stream(self, request_id: str, prompt: str | list[int]) -> AsyncIterator[RequestOutput]:
        if self.beam_search is not None:
            return self.engine.beam_search(request_id, prompt, self.beam_search, arrival_time=self.arrival,
                                           skip_special_tokens=self.params.skip_special_tokens)
        return self.engine.generate(request_id, prompt, self.params, arrival_time=self.arrival,
                                    output_kind=OutputKind.DELTA)

    async def start(self) -> None:
        """Waits until the engine accepted every prompt (its first output arrived).

        Errors such as a prompt longer than the context surface here, while the
        HTTP status can still say 400; a stream only sends its headers after this.
        """
        started: set[int] = set()
        try:
            while len(started) < len(self.prompts):
                item = await anext(self._merged)
                self._observe(*item)
                self._buffered.append(item)
                started.add(item[0])
        except StopAsyncIteration:
            pass
        except BaseException as exc:
            self._finish(exc)
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, RequestOutput with what is new) pairs until every prompt finished.

        total(prompt index) has everything so far.
        """
        error: BaseException | None = None
        try:
            for item in self._buffered:
                yield item
            async for prompt_index, output in self._merged:
                self._observe(prompt_index, output)
                yield prompt_index, output
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._finish(error)
            await self._merged.aclose()

    async def final_outputs(self) -> list[RequestOutput]:
        """The whole output of every prompt, in prompt order (for non-streaming responses)."""
        async for _ in self.outputs():
            pass
        finals = [progress.total for progress in self._progress]
        return finals if self.best_of_n is None else [most_likely(final, self.best_of_n) for final in finals]

    def total(self, prompt_index: int) -> RequestOutput:
        """Everything prompt `prompt_index` produced so far (what a client has been sent, in one piece)."""
        return self._progress[prompt_index].total

    def _observe(self, prompt_index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        progress = self._progress[prompt_index]
        if progress.total is None:
            progress.total = RequestOutput.empty_like(output)
        progress.total.add(output)
        tokens = max((len(o.token_ids) for o in progress.total.outputs), default=0)
        new_tokens = tokens - progress.tokens
        if new_tokens > 0:
            if progress.first_token is None:
                progress.first_token = now
                self.metrics.time_to_first_token.observe(now - progress.arrival)
            else:
                gap = (now - progress.last_token) / new_tokens
                for _ in range(new_tokens):
                    self.metrics.inter_token_latency.observe(gap)
            progress.last_token = now
            progress.tokens = tokens
        scheduled = output.metrics.first_scheduled_time if output.metrics is not None else None
        if progress.queue_time is None and scheduled is not None:
            progress.queue_time = max(0.0, scheduled - progress.arrival)
            self.metrics.request_queue_time.observe(progress.queue_time)
        if output.finished:
            self.metrics.e2e_request_latency.observe(now - progress.arrival)
            self.metrics.observe_finished(progress.total.outputs[0].finish_reason or "stop")

    def _finish(self, error: BaseException | None) -> None:
        """Records how the generation ended (once) in log_fields."""
        if self._finished:
            return
        self._finished = True
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            outcome = "client_disconnected"
        elif error is not None:
            outcome = f"error: {type(error).__name__}: {error}"
        else:
            outcome = "ok"
        finals = [p.total for p in self._progress if p.total is not None]
        first_tokens = [p.first_token - p.arrival for p in self._progress if p.first_token is not None]
        queue_times = [p.queue_time for p in self._progress if p.queue_time is not None]
        prompt_tokens, output_tokens = token_counts(finals)
        self.log_fields.update(
            outcome=outcome,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            queue_time_s=_rounded(max(queue_times, default=None)),
            ttft_s=_rounded(min(first_tokens, default=None)),
            generation_time_s=_rounded(time.monotonic() - self.arrival),
            finish_reasons=[o.finish_reason for f in finals for o in f.outputs],
        )


def most_likely(final: RequestOutput, n: int) -> RequestOutput:
    """best_of: the n outputs with the highest cumulative logprob, best first, numbered 0..n-1."""
    ranked = sorted(final.outputs, key=lambda output: -output.cumulative_logprob)[:n]
    outputs = [replace(output, index=index) for index, output in enumerate(ranked)]
    return replace(final, outputs=outputs)


def token_counts(finals: Sequence[RequestOutput]) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of a generation's outputs: its usage and its log line."""
    prompt_tokens = sum(len(final.prompt_token_ids) for final in finals)
    return prompt_tokens, sum(len(output.token_ids) for final in finals for output in final.outputs)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)
