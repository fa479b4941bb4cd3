"""The front end's half of a step: token deltas from the core -> text and RequestOutputs.

Runs where the user is (the offline LLM's thread, the API server's event
loop), never on the core's step loop. Per completion it keeps the text state:
the incremental detokenizer, stop strings (a completion that hits one is
finished here and reported back, so the core stops computing it), the text
held back while it could still become a stop string, and the logprobs.

What a caller gets is chosen per request (vLLM's RequestOutputKind):
CUMULATIVE, everything so far at every step; DELTA, only what is new (what
streams send); FINAL_ONLY, one output when the request ends.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field

from engine.bad_words import bad_words_token_ids
from engine.core_messages import (
    CoreLimits,
    EngineCoreOutputs,
    EngineCoreRequest,
    PromptLogprobs,
    SequenceDelta,
    TokenLogprobs,
)
from engine.detokenizer import Detokenizer, TextState, find_stop_string
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.sampling import SamplingParams
from engine.tokenizer import tokenize_prompt


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class _Completion:
    index: int
    text: TextState
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What DELTA outputs have handed out already.
    sent_text: int = 0
    sent_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.text.finished = True

    def output(self, kind: OutputKind) -> CompletionOutput:
        visible = self.text.visible_text
        if kind is OutputKind.DELTA:
            text, self.sent_text = visible[self.sent_text :], len(visible)
            token_ids, logprobs = self.token_ids[self.sent_tokens :], None
            if self.logprobs is not None:
                logprobs = self.logprobs[self.sent_tokens :]
            self.sent_tokens = len(self.token_ids)
        else:
            text, token_ids = visible, list(self.token_ids)
            logprobs = list(self.logprobs) if self.logprobs is not None else None
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    metrics: RequestMetrics
    completions: list[_Completion]
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # of prompt tokens 1.., once the prefill has ended
    prompt_logprobs_sent: bool = False  # DELTA outputs hand them out once

    @classmethod
    def new(
        cls,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        kind: OutputKind,
        arrival_time: float,
    ) -> RequestState:
        completions = [
            _Completion(i, TextState.after_prompt(params, prompt_token_ids), logprobs=[] if params.logprobs is not None else None)
            for i in range(params.n)
        ]
        return cls(request_id, prompt, prompt_token_ids, params, kind, RequestMetrics(arrival_time), completions)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def output(self, progressed: list[_Completion]) -> RequestOutput:
        completions = progressed if self.kind is OutputKind.DELTA else self.completions
        output = RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[c.output(self.kind) for c in completions],
            finished=self.finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
        if self.prompt_logprobs is not None and not (self.kind is OutputKind.DELTA and self.prompt_logprobs_sent):
            # vLLM's shape: the first prompt token has nothing before it.
            output.prompt_logprobs = [None, *self.prompt_logprobs.entries]
            output.prompt_token_ranks = [None, *self.prompt_logprobs.ranks]
            self.prompt_logprobs_sent = True
        return output


def new_request(
    tokenizer,
    limits: CoreLimits,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    kind: OutputKind,
    arrival_time: float,
) -> tuple[RequestState, EngineCoreRequest]:
    """Tokenizes and checks a prompt: the front end's state for it and the request the core gets.

    Raises InvalidRequestError before anything reaches the core, so a bad request never disturbs it.
    """
    text, token_ids = (prompt, tokenize_prompt(tokenizer, prompt)) if isinstance(prompt, str) else (None, list(prompt))
    if params.bad_words and params.bad_words_token_ids is None:
        params = dataclasses.replace(params, bad_words_token_ids=bad_words_token_ids(tokenizer, params.bad_words))
    max_tokens = limits.check_prompt(token_ids, params)
    state = RequestState.new(request_id, text, token_ids, params, kind, arrival_time)
    return state, EngineCoreRequest(request_id, token_ids, params, arrival_time, max_tokens)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput]
    stopped: list[tuple[str, int]]  # (request id, completion index) finished by a stop string: tell the core


class OutputProcessor:
    def __init__(self, tokenizer):
        self.detokenizer = Detokenizer(tokenizer)
        self.requests: dict[str, RequestState] = {}

    def add_request(self, state: RequestState) -> None:
        self.requests[state.request_id] = state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Forget a request; its last output (finish_reason 'abort') when it was still running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        progressed = [c for c in state.completions if not c.finished]
        for completion in progressed:
            completion.finish("abort")
        state.metrics.finished_time = time.monotonic()
        return state.output(progressed)

    def process(self, core_outputs: EngineCoreOutputs) -> ProcessedOutputs:
        now = time.monotonic()
        for scheduled in core_outputs.scheduled:
            state = self.requests.get(scheduled.request_id)
            if state is not None:
                state.metrics.first_scheduled_time = scheduled.scheduled_time
                state.num_cached_tokens = scheduled.num_cached_tokens
        progressed: dict[str, list[_Completion]] = {}
        ended: set[str] = set()  # requests with a completion that finished in this step
        stopped = []
        for delta in core_outputs.deltas:
            state = self.requests.get(delta.request_id)
            if state is None:
                continue
            if delta.prompt_logprobs is not None:
                state.prompt_logprobs = delta.prompt_logprobs
            completion = state.completions[delta.index]
            if completion.finished:
                continue  # a stop string ended it; the core had a step in flight
            self._apply(completion, delta, state.kind)
            if completion.finished:
                ended.add(delta.request_id)
                if completion.finish_reason == "stop" and isinstance(completion.stop_reason, str):
                    stopped.append((delta.request_id, delta.index))
            progressed.setdefault(delta.request_id, []).append(completion)
        outputs = []
        for request_id, completions in progressed.items():
            state = self.requests[request_id]
            metrics = state.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            finished = request_id in ended and state.finished
            if finished:
                metrics.finished_time = now
                del self.requests[request_id]
            if finished or state.kind is not OutputKind.FINAL_ONLY:
                outputs.append(state.output(completions))
        return ProcessedOutputs(outputs, stopped)

    def _apply(self, completion: _Completion, delta: SequenceDelta, kind: OutputKind) -> None:
        """vLLM's rules: a stop token is not text (unless asked); stop strings before length.

        Text nobody reads before the end (FINAL_ONLY without stop strings) is decoded
        once, when the completion finishes, instead of a window per step.
        """
        params = completion.text.params
        stopped_by_token = delta.finish_reason == "stop"
        completion.token_ids.extend(delta.new_token_ids)
        if delta.new_logprobs is not None:
            for token, entry in zip(delta.new_token_ids, delta.new_logprobs):
                completion.cumulative_logprob += entry[token]
                if completion.logprobs is not None:
                    completion.logprobs.append(entry)
        text_tokens = delta.new_token_ids
        if stopped_by_token and not params.include_stop_str_in_output:
            text_tokens = text_tokens[:-1]
        completion.text.tokens.extend(text_tokens)
        if kind is OutputKind.FINAL_ONLY and not params.stop:
            if delta.finish_reason is not None:
                self.detokenizer.flush(completion.text)
                completion.finish(delta.finish_reason, delta.stop_reason)
            return
        num_new_chars = len(self.detokenizer.decode_new_tokens(completion.text)) if text_tokens else 0
        may_stop = len(completion.token_ids) >= params.min_tokens
        if stopped_by_token:
            completion.finish("stop", delta.stop_reason)
        elif may_stop and (stop := find_stop_string(completion.text, num_new_chars)) is not None:
            completion.finish("stop", stop)
        elif delta.finish_reason is not None:
            self.detokenizer.flush(completion.text)
            completion.finish(delta.finish_reason, delta.stop_reason)
