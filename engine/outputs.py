"""What the front end hands back: vLLM-shaped RequestOutput / CompletionOutput.

Whether an output holds everything so far or only what is new is chosen per
request (engine.output_processor.OutputKind): offline callers read one final
output, streams read deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core_messages import TokenLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic()) for latency metrics and logs."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # With prompt_logprobs (vLLM's shape): None for the first prompt token, then {token_id: logprob} of the
    # prompt token and the top-k; prompt_token_ranks: each prompt token's rank (1: the most likely).
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_token_ranks: list[int | None] | None = None

    @classmethod
    def empty_like(cls, delta: RequestOutput) -> RequestOutput:
        """A cumulative output to fold `delta` and its successors into."""
        return cls(delta.request_id, delta.prompt, delta.prompt_token_ids, [], False, delta.metrics)

    def add(self, delta: RequestOutput) -> None:
        """Fold a DELTA output of this request into this (cumulative) one, in place.

        Text, tokens and logprobs are appended, so following a stream costs the
        length of what arrives, not of everything so far, at every step.
        """
        by_index = {output.index: output for output in self.outputs}
        for new in delta.outputs:
            old = by_index.get(new.index)
            if old is None:
                old = by_index[new.index] = CompletionOutput(new.index, "", [])
                self.outputs.append(old)
                self.outputs.sort(key=lambda output: output.index)
            old.text += new.text
            old.token_ids.extend(new.token_ids)
            if new.logprobs is not None:
                if old.logprobs is None:
                    old.logprobs = []
                old.logprobs.extend(new.logprobs)
            old.cumulative_logprob = new.cumulative_logprob
            old.finish_reason, old.stop_reason = new.finish_reason, new.stop_reason
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_token_ranks = delta.prompt_logprobs, delta.prompt_token_ranks
        self.finished = delta.finished
        self.metrics = delta.metrics
        self.num_cached_tokens = delta.num_cached_tokens
