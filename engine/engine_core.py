"""EngineCore: tokenized requests in, one schedule -> execute -> update per step(), token deltas out.

The core owns the scheduler, the KV blocks and the model (through the
Executor); it knows nothing of text. With overlap scheduling (the default) a
step is launched before the previous one's tokens are read back, so the host's
scheduling and input preparation for step n+1 run while the GPU computes step
n (tensor-parallel workers get step n's tokens from rank 0 on the device):

    step():  schedule(n+1) -> launch(n+1) -> read step n's tokens -> update(n) -> deltas of step n

A sequence that finishes in update(n) was already scheduled in step n+1; that
token is dropped (Scheduler.update), so outputs are identical with overlap on
or off. While a request with a structured output runs, every step waits for
its tokens: the grammar's next bitmask needs the token just sampled.
Front ends (engine.llm_engine in-process, engine.core_process across
processes) drive step() and turn deltas into text.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.core_messages import CoreLimits, EngineCoreOutputs, EngineCoreRequest, EngineStats, SequenceDelta
from engine.distributed import Executor, check_tensor_parallel
from engine.errors import InvalidRequestError
from engine.model_config import load_model_config
from engine.model_runner import STEP_FIELDS, InFlightStep, ModelRunner
from engine.sampling import num_top_logprobs
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Request
from engine.tokenizer_loader import load_tokenizer

if TYPE_CHECKING:  # xgrammar is imported only once a request asks for a structured output
    from engine.structured_output import GrammarCompiler


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.model_config = load_model_config(config.model)
        self.config = config.resolve(self.model_config.max_model_len, self.model_config.dtype)
        check_tensor_parallel(
            self.config.tensor_parallel_size,
            self.config.device,
            self.model_config.num_attention_heads,
            self.model_config.num_key_value_heads,
            self.model_config.intermediate_size,
            self.model_config.moe.intermediate_size if self.model_config.moe is not None else None,
        )
        # Runs the model on every tensor-parallel rank; model_runner is this process's (rank 0's).
        self.executor = Executor(self.config, partial(ModelRunner, model_config=self.model_config), STEP_FIELDS)
        self.model_runner: ModelRunner = self.executor.runner
        self.block_manager = BlockManager(
            self.model_runner.num_kv_blocks, self.config.block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            self.config.max_num_seqs,
            self.config.max_num_batched_tokens,
            self.config.max_model_len,
            self.model_config.eos_token_ids,
            self.model_config.kv_window,
        )
        self.limits = CoreLimits(
            max_model_len=self.config.max_model_len,
            vocab_size=self.model_config.vocab_size,
            block_size=self.config.block_size,
            num_kv_blocks=self.block_manager.num_blocks,
            eos_token_ids=self.model_config.eos_token_ids,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            kv_window=self.model_config.kv_window,
            max_logprobs=num_top_logprobs(self.config.max_logprobs, self.model_config.vocab_size),
        )
        self.overlap = self.config.overlap_scheduling
        self.requests: dict[str, Request] = {}
        self.prompt_tokens_total = 0
        self._in_flight: tuple[ScheduledBatch, InFlightStep] | None = None
        self._grammar_compiler: GrammarCompiler | None = None  # made for the first structured output
        self._num_grammar_requests = 0

    # Requests ---------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request that the front end checked with `limits.check_prompt`."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", param="request_id")
        core_request = Request(request)
        spec = request.params.structured_output
        if spec is not None:
            from engine.structured_output import RequestGrammar

            compiled = self.grammar_compiler.compile(spec)
            for seq in core_request.seqs:
                seq.grammar = RequestGrammar(compiled)
            self._num_grammar_requests += 1
        self.requests[request.request_id] = core_request
        self.scheduler.add_request(core_request)
        self.prompt_tokens_total += len(request.prompt_token_ids)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        """Stop requests and free their blocks now; unknown or finished ids are ignored."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            for index in range(len(request.seqs) if request is not None else 0):
                self._finish_sequence(request_id, index, "abort")

    def stop_sequences(self, stopped: Iterable[tuple[str, int]]) -> None:
        """Finish completions (request id, index) that a stop string ended in the front end."""
        for request_id, index in stopped:
            self._finish_sequence(request_id, index, "stop")

    def _finish_sequence(self, request_id: str, index: int, reason: str) -> None:
        request = self.requests.get(request_id)
        if request is None:
            return
        seq = request.seqs[index]
        if not seq.is_finished:
            seq.finish(reason)
            self.scheduler.finish(seq)
        if request.is_finished:
            self._forget(request)

    def _forget(self, request: Request) -> None:
        del self.requests[request.request_id]
        if request.params.structured_output is not None:
            self._num_grammar_requests -= 1

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles structured outputs against the model's tokenizer (loaded on first use)."""
        if self._grammar_compiler is None:
            from engine.structured_output import GrammarCompiler

            tokenizer = load_tokenizer(self.config.model, self.config.tokenizer)
            cfg = self.model_config
            self._grammar_compiler = GrammarCompiler(tokenizer, cfg.vocab_size, cfg.eos_token_ids)
        return self._grammar_compiler

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # The step -----------------------------------------------------------------

    def step(self) -> EngineCoreOutputs:
        outputs = EngineCoreOutputs()
        launched = None
        if self.scheduler.has_unfinished():
            batch = self.scheduler.schedule()
            if batch:
                outputs.scheduled = batch.newly_scheduled
                launched = (batch, self.executor.execute(batch))
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            outputs.deltas = self._update(*previous)
        if launched is not None:
            # A grammar's next bitmask needs the token just sampled: no overlap while one runs.
            if self.overlap and not self._num_grammar_requests:
                self._in_flight = launched
            else:
                outputs.deltas += self._update(*launched)
        return outputs

    def _update(self, batch: ScheduledBatch, in_flight: InFlightStep) -> list[SequenceDelta]:
        sampled = in_flight.result()
        self.executor.check_health()  # tokens of a step during which a rank died are not kept
        deltas = self.scheduler.update(batch, sampled)
        for delta in deltas:
            if delta.finish_reason is not None:
                request = self.requests.get(delta.request_id)
                if request is not None and request.is_finished:
                    self._forget(request)
        return deltas

    # Lifecycle --------------------------------------------------------------------

    def check_health(self) -> None:
        """Raises EngineDeadError once a tensor-parallel worker has died, also between steps."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (a no-op without them); the engine is unusable after."""
        self.executor.shutdown()

    def get_stats(self) -> EngineStats:
        scheduler = self.scheduler
        counters = scheduler.counters
        running = {seq.request.request_id for seq in scheduler.running}
        waiting = {seq.request.request_id for seq in scheduler.waiting} - running
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
            generation_tokens_total=scheduler.generation_tokens_total,
        )
