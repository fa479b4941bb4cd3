"""LLMEngine: requests in, one scheduler iteration per step(), RequestOutputs out.

Synchronous and single-threaded: the offline LLM class drives it in a loop,
the server's AsyncLLMEngine from one step thread. A request is validated
completely in add_request, so a bad one raises there and never reaches the
scheduler or disturbs the requests already running.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer, find_stop_string
from engine.distributed import Executor, check_tensor_parallel
from engine.errors import InvalidRequestError
from engine.model_config import load_model_config
from engine.model_runner import STEP_FIELDS, ModelRunner
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence
from engine.tokenizer_loader import load_tokenizer


@dataclass
class EngineStats:
    """A snapshot of the engine's gauges and counters (totals since start)."""

    num_waiting: int  # requests none of whose sequences is running (preempted ones included)
    num_running: int  # requests with at least one sequence running
    kv_cache_usage: float  # 0..1, blocks referenced by some sequence
    num_blocks_total: int
    num_blocks_free: int  # free or cached-but-evictable
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # prompt tokens found in the cache
    num_preemptions: int
    num_chunked_prefills: int
    prompt_tokens_total: int
    generation_tokens_total: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.model_config = load_model_config(config.model)
        self.config = config.resolve(self.model_config.max_model_len, self.model_config.dtype)
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        check_tensor_parallel(
            self.config.tensor_parallel_size,
            self.config.device,
            self.model_config.num_attention_heads,
            self.model_config.num_key_value_heads,
            self.model_config.intermediate_size,
        )
        # Runs the model on every tensor-parallel rank; model_runner is this process's (rank 0's).
        self.executor = Executor(self.config, partial(ModelRunner, model_config=self.model_config), STEP_FIELDS)
        self.model_runner: ModelRunner = self.executor.runner
        self.block_manager = BlockManager(
            self.model_runner.num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    # Requests ---------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, list(prompt)
        self._validate_prompt(token_ids, params)
        max_tokens = params.max_tokens or self.config.max_model_len - len(token_ids)
        request = Request(request_id, text, token_ids, params, arrival_time or time.monotonic(), max_tokens)
        self.requests[request_id] = request
        self.scheduler.add_request(request)
        self.prompt_tokens_total += len(token_ids)

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        max_len = self.config.max_model_len
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab_size = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
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
        blocks = self.block_manager.blocks_needed(max(total, len(token_ids) + 1))
        if blocks > self.block_manager.num_blocks:
            raise InvalidRequestError(
                f"the request needs {blocks} KV-cache blocks of {self.config.block_size} tokens but the "
                f"whole cache has {self.block_manager.num_blocks}; shorten the prompt or max_tokens",
                param="max_tokens",
            )

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Stop requests and free their blocks now; unknown or finished ids are ignored."""
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish("abort")
                    self.scheduler.finish(seq)
            request.metrics.finished_time = time.monotonic()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # The step loop ------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = now
        sampled = iter(self.executor.execute(batch))
        now = time.monotonic()
        progressed: dict[str, Request] = {}
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if not samples:
                continue
            token = next(sampled)
            seq.append_token(token.token_id, token.logprobs)
            self.generation_tokens_total += 1
            self._check_finished(seq)
            if seq.is_finished:
                self.scheduler.finish(seq)
            metrics = seq.request.metrics
            metrics.first_token_time = metrics.first_token_time or now
            metrics.last_token_time = now
            progressed[seq.request.request_id] = seq.request
        outputs = []
        for request in progressed.values():
            if request.is_finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
            outputs.append(request.output())
        return outputs

    def _check_finished(self, seq: Sequence) -> None:
        """Detokenize seq's new token and decide whether it ends the sequence (vLLM's rules)."""
        params = seq.params
        token = seq.token_ids[-1]
        may_stop = seq.num_output_tokens >= params.min_tokens
        is_eos = not params.ignore_eos and token in self.model_config.eos_token_ids
        stop_token = may_stop and (is_eos or token in params.stop_token_ids)
        num_new_chars = 0
        if not stop_token or params.include_stop_str_in_output:
            num_new_chars = len(self.detokenizer.decode_new_tokens(seq))
        if stop_token:
            seq.finish("stop", None if is_eos else token)
        elif may_stop and (stop := find_stop_string(seq, num_new_chars)) is not None:
            seq.finish("stop", stop)
        elif seq.num_output_tokens >= seq.request.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.detokenizer.flush(seq)
            seq.finish("length")

    # Lifecycle --------------------------------------------------------------------

    def check_health(self) -> None:
        """Raises EngineDeadError once a tensor-parallel worker has died, also between steps."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (a no-op without them); the engine is unusable after."""
        self.executor.shutdown()

    # Introspection --------------------------------------------------------------

    def get_stats(self) -> EngineStats:
        counters = self.scheduler.counters
        running = {seq.request.request_id for seq in self.scheduler.running}
        waiting = {seq.request.request_id for seq in self.scheduler.waiting} - running
        return EngineStats(
            num_waiting=len(waiting),
            num_running=len(running),
            kv_cache_usage=self.block_manager.usage,
            num_blocks_total=self.block_manager.num_blocks,
            num_blocks_free=self.block_manager.num_free_blocks,
            prefix_cache_queries=counters.prefix_cache_queries,
            prefix_cache_hits=counters.prefix_cache_hits,
            num_preemptions=counters.num_preemptions,
            num_chunked_prefills=counters.num_chunked_prefills,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
        )

    # Text -------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, with the tokenizer's special tokens unless the text already has its BOS.

        Chat templates write the BOS token into the text; adding it again would
        give the model a doubled BOS it never saw in training.
        """
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template; use completions instead", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja raises for messages the template rejects
            raise InvalidRequestError(f"the chat template rejected the messages: {error}", param="messages") from None

