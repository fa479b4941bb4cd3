"""What crosses between a front end (offline LLM, API server) and the engine core.

The core sees token ids only: requests come in tokenized and validated, and
each step sends back, per sequence that progressed, just the tokens it added
(deltas). Text, stop strings and the cumulative outputs users read are the
front end's business (engine.output_processor), so the core's step loop never
detokenizes and never copies a request's whole output.

Every type here is plain data, so that it travels between processes as a
msgpack array (engine.core_codec) instead of a pickled object.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError
from engine.sampling import DEFAULT_MAX_LOGPROBS, SamplingParams, num_top_logprobs

# One entry per generated token: {token_id: logprob} holding the chosen token
# plus the top-`logprobs` alternatives.
TokenLogprobs = dict[int, float]


@dataclass
class PromptLogprobs:
    """Logprobs of a run of prompt tokens (vLLM's prompt_logprobs), each given the tokens before it.

    entries[i]: {token_id: logprob} holding the prompt token first, then the top-k
    (all of them for k = -1); ranks[i]: the prompt token's rank in its distribution
    (1: the most likely; tokens of equal logprob share the lower rank, as vLLM counts).
    """

    entries: list[TokenLogprobs] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def extend(self, more: PromptLogprobs) -> None:
        self.entries.extend(more.entries)
        self.ranks.extend(more.ranks)


@dataclass
class EngineCoreRequest:
    """A tokenized, validated request; `max_tokens` is resolved against the context length."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    max_tokens: int


@dataclass
class SequenceDelta:
    """What one sequence (completion `index` of a request) added in one step."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None  # one entry per new token when logprobs were asked
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | None = None  # the stop token id that ended it (stop strings: the front end)
    # With prompt_logprobs: those of prompt tokens 1.., whole, on completion 0's first token.
    prompt_logprobs: PromptLogprobs | None = None


@dataclass
class RequestScheduled:
    """A request reached the GPU for the first time: its queue time ends, its cache hits are known."""

    request_id: str
    scheduled_time: float
    num_cached_tokens: int


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and counters (totals since start)."""

    num_waiting: int = 0  # requests none of whose sequences is running (preempted ones included)
    num_running: int = 0  # requests with at least one sequence running
    kv_cache_usage: float = 0.0  # 0..1, blocks referenced by some sequence
    num_blocks_total: int = 0
    num_blocks_free: int = 0  # free or cached-but-evictable
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # prompt tokens found in the cache
    num_preemptions: int = 0
    num_chunked_prefills: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0


@dataclass
class EngineCoreOutputs:
    """One step's results: deltas of the sequences that progressed, and (from the core process,
    which sends them to the API process's metrics) the stats after it."""

    deltas: list[SequenceDelta] = field(default_factory=list)
    scheduled: list[RequestScheduled] = field(default_factory=list)
    stats: EngineStats | None = None


def max_live_blocks(num_tokens: int, block_size: int, kv_window: int | None, max_num_batched_tokens: int) -> int:
    """KV blocks a sequence of num_tokens holds at once: all of them, or, when every layer has a
    sliding window (blocks behind it are freed), the window, one step's chunk and a partial block."""
    blocks = -(-num_tokens // block_size)
    if kv_window is None:
        return blocks
    return min(blocks, -(-(kv_window + max_num_batched_tokens) // block_size) + 1)


@dataclass(frozen=True)
class CoreLimits:
    """What a front end needs to validate a request before the core sees it."""

    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    eos_token_ids: tuple[int, ...]
    max_num_batched_tokens: int
    kv_window: int | None = None  # every layer's sliding window: blocks behind it are freed as it moves
    max_logprobs: int = DEFAULT_MAX_LOGPROBS  # the most top logprobs a request may ask for (all: vocab_size)

    def check_prompt(self, token_ids: list[int], params: SamplingParams) -> int:
        """Raises InvalidRequestError for a prompt the engine cannot serve; returns the resolved max_tokens."""
        max_len = self.max_model_len
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab_size = self.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
        bad_word_ids = [t for word in params.bad_words_token_ids or () for t in word]
        for param, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                           ("bad_words", bad_word_ids)):
            if any(t >= vocab_size for t in ids):
                raise InvalidRequestError(f"{param} names token ids outside the vocabulary [0, {vocab_size})", param=param)
        for param, kind in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            wanted = getattr(params, param)
            if wanted is not None and num_top_logprobs(wanted, vocab_size) > self.max_logprobs:
                raise InvalidRequestError(
                    f"Requested {kind} logprobs of {num_top_logprobs(wanted, vocab_size)}, which is greater than "
                    f"max allowed: {self.max_logprobs} (the server's --max-logprobs)", param=param)
        if len(token_ids) >= max_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{max_len} tokens, which must also leave room for at least one generated token",
                param="prompt",
            )
        total = len(token_ids) + (params.max_tokens or 0)
        if total > max_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {max_len} tokens, but {total} were requested "
                f"({len(token_ids)} in the prompt, {params.max_tokens} in max_tokens)",
                param="max_tokens",
            )
        num_tokens = max(total, len(token_ids) + 1)
        blocks = max_live_blocks(num_tokens, self.block_size, self.kv_window, self.max_num_batched_tokens)
        if blocks > self.num_kv_blocks:
            raise InvalidRequestError(
                f"the request needs {blocks} KV-cache blocks of {self.block_size} tokens but the "
                f"whole cache has {self.num_kv_blocks}; shorten the prompt or max_tokens",
                param="max_tokens",
            )
        return params.max_tokens or max_len - len(token_ids)
