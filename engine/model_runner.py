"""Runs one scheduled batch through the model and samples the next tokens, without waiting for them.

The runner owns the device side: the model weights, the paged KV cache (one K
and one V tensor per layer, [num_blocks, block_size, num_kv_heads, head_dim]),
the sampler and the persistent input batch. A step is prepare_step (host
arrays from the persistent batch, engine.input_batch), execute_model (copy
in, forward, logits only at the positions that sample) and sample (on the
device; the token ids start their copy back and an InFlightStep hands them
over once they arrive). Nothing here blocks on the GPU, so the host can
schedule and prepare step n+1 while step n runs; step n+1 reads the tokens
that step n sampled straight from the device (placeholders).

KV cache size: `num_kv_blocks` when given. Otherwise, on CUDA, whatever
gpu_memory_utilization of the GPU leaves after the weights, the peak
activations of a profiling forward pass of a full step (max_num_batched_tokens
tokens) and the CUDA graphs' pool (engine.cuda_graphs). On CPU, see
engine.kv_cache_sizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from engine.block_manager import cdiv
from engine.config import EngineConfig
from engine.core_messages import PromptLogprobs, TokenLogprobs
from engine.cuda_graphs import CudaGraphs, StepCounts
from engine.distributed import small_all_reduce
from engine.distributed.parallel_state import broadcast_from_rank0, min_across_ranks
from engine.distributed.step_channel import Field
from engine.errors import ConfigError
from engine.input_batch import InputBatch, StepArrays
from engine.kv_cache_sizing import default_cpu_kv_cache_blocks
from engine.layers.prompt_logprobs import PROMPT_LOGITS_CHUNK, PromptLogprobTensors, compute_prompt_logprobs
from engine.layers.sampler import Sampler, SamplerOutput
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.sampling import num_top_logprobs
from engine.sampling_batch import SamplingState
from engine.scheduler import SampledTokens, ScheduledBatch


# ModelInputs flattened for tensor-parallel ranks: the keys of as_fields(), in a fixed order.
STEP_FIELDS = (
    "input_ids",
    "positions",
    "logits_indices",
    "slot_mapping",
    "query_start_loc",
    "seq_lens",
    "block_tables",
    "max_query_len",
    "max_seq_len",
    "placeholder_dst",
    "placeholder_src",
    "prompt_logits_indices",
    "prompt_logprob_targets",
    "num_prompt_logprobs",
)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [S]: the last new token of each sequence that samples

    @classmethod
    def from_fields(cls, fields: dict[str, Field], device: torch.device) -> ModelInputs:
        """The inputs on `device` (host tensors in pinned memory are copied asynchronously)."""

        def tensor(name: str) -> torch.Tensor:
            return fields[name].to(device, non_blocking=True)

        metadata = AttentionMetadata(
            slot_mapping=tensor("slot_mapping"),
            query_start_loc=tensor("query_start_loc"),
            seq_lens=tensor("seq_lens"),
            block_tables=tensor("block_tables"),
            max_query_len=fields["max_query_len"],
            max_seq_len=fields["max_seq_len"],
        )
        return cls(tensor("input_ids"), tensor("positions"), metadata, tensor("logits_indices"))


def step_fields(arrays: StepArrays, num_prompt_logprobs: int) -> dict[str, Field]:
    fields = {name: getattr(arrays, name) for name in STEP_FIELDS if name != "num_prompt_logprobs"}
    return fields | {"num_prompt_logprobs": num_prompt_logprobs}

@dataclass
class StepLogits:
    """What a forward pass hands to sampling: logits where sequences sample, prompt logprobs where asked."""

    logits: torch.Tensor | None  # [S, vocab]; None when no sequence samples this step
    prompt_logprobs: PromptLogprobTensors | None = None


def _with_top(ids: list[int], values: list[float], wanted: int) -> TokenLogprobs:
    """{token: logprob}: the first (chosen or prompt) token, then the top `wanted` ones."""
    entry = {ids[0]: values[0]}
    for token_id, value in zip(ids[1 : wanted + 1], values[1 : wanted + 1]):
        entry.setdefault(token_id, value)
    return entry


class InFlightStep:
    """A step's sampled tokens (and prompt logprobs) on their way to the host; result() waits for them.

    prompt_spans: (index in the batch's seqs, positions, top-k wanted) of each prompt-logprob span, in
    the order of the rows of `prompt`.
    """

    def __init__(self, output: SamplerOutput | None, logprobs_wanted: dict[int, int], device: torch.device,
                 prompt: PromptLogprobTensors | None = None, prompt_spans: list[tuple[int, int, int]] | None = None):
        self._logprobs_wanted = logprobs_wanted
        self._prompt_spans = prompt_spans or []
        self._event: torch.cuda.Event | None = None
        pin = device.type == "cuda"

        def to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            return host.copy_(tensor, non_blocking=pin)

        if output is None:
            self._token_ids, self._logprob_ids, self._logprobs = torch.empty(0, dtype=torch.int64), None, None
        else:
            self._token_ids = to_host(output.token_ids)
            self._logprob_ids = to_host(output.logprob_token_ids)
            self._logprobs = to_host(output.logprobs)
        self._prompt = None
        if prompt is not None:
            self._prompt = PromptLogprobTensors(to_host(prompt.token_ids), to_host(prompt.logprobs), to_host(prompt.ranks))
        if pin:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampledTokens:
        if self._event is not None:
            self._event.synchronize()
        sampled = SampledTokens(self._token_ids.numpy(), prompt_logprobs=self._prompt_logprobs())
        if self._logprobs is not None:
            ids, values = self._logprob_ids.tolist(), self._logprobs.tolist()
            sampled.logprobs = [None] * len(ids)
            for row, wanted in self._logprobs_wanted.items():
                sampled.logprobs[row] = _with_top(ids[row], values[row], wanted)
        return sampled

    def _prompt_logprobs(self) -> dict[int, PromptLogprobs]:
        if self._prompt is None:
            return {}
        ids, values, ranks = self._prompt.token_ids.tolist(), self._prompt.logprobs.tolist(), self._prompt.ranks.tolist()
        spans, row = {}, 0
        for index, count, wanted in self._prompt_spans:
            rows = range(row, row + count)
            spans[index] = PromptLogprobs([_with_top(ids[r], values[r], wanted) for r in rows], ranks[row : row + count])
            row += count
        return spans


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(
            model_config.path, model_config, config.torch_dtype, self.device, quantization=config.quantization
        )
        if config.small_all_reduce and config.tensor_parallel_size > 1:
            small_all_reduce.enable(self.device, config.torch_dtype)
        # Tensor-parallel ranks must agree on the cache size: the scheduler on rank 0 allocates for all.
        self.num_kv_blocks = min_across_ranks(config.num_kv_blocks or self._default_num_kv_blocks())
        self.kv_cache = self._allocate_kv_cache(self.num_kv_blocks)
        self.sampler = Sampler(config.seed, self.device)
        self.cuda_graphs = self._capture_cuda_graphs()
        self._eager_steps = 0
        # Rank 0's step state, made on first use (tensor-parallel workers only run execute_model).
        self._input_batch: InputBatch | None = None
        self._sampling_state: SamplingState | None = None
        self._step: StepArrays | None = None
        # Last step's token ids, on the device (on every rank: tensor-parallel workers receive rank 0's).
        self._previous_sampled: torch.Tensor | None = None
        self._previous_sample_rows: dict[int, int] = {}  # seq_id -> index in _previous_sampled
        self._inputs: ModelInputs | None = None  # the last step's inputs on the device (bad words read them)

    @property
    def kv_block_shape(self) -> tuple[int, int, int]:
        """(block_size, num_kv_heads, head_dim) of one cache block on this (tensor-parallel) rank.

        With fewer KV heads than ranks each rank holds one replicated head (QKVParallelLinear).
        """
        cfg = self.model_config
        num_kv_heads = max(cfg.num_key_value_heads // self.config.tensor_parallel_size, 1)
        return self.block_size, num_kv_heads, cfg.head_dim

    @property
    def bytes_per_block(self) -> int:
        """K and V of every layer for block_size tokens, on this (tensor-parallel) rank."""
        elements = 2 * self.model_config.num_hidden_layers * math.prod(self.kv_block_shape)
        return elements * self.config.kv_cache_torch_dtype.itemsize

    # A step is split in three so that tensor-parallel workers can run the middle part alone
    # (engine.distributed.Executor): prepare_step and sample run on rank 0 only.

    def prepare_step(self, batch: ScheduledBatch) -> dict[str, Field]:
        """The batch's model inputs as (page-locked) host tensors, keyed by STEP_FIELDS."""
        if self._input_batch is None:
            config = self.config
            pin = self.device.type == "cuda"
            self._input_batch = InputBatch(
                config.max_num_seqs, config.max_model_len, config.max_num_batched_tokens, self.block_size, pin
            )
            cfg = self.model_config
            self._sampling_state = SamplingState(config.max_num_seqs, cfg.vocab_size, cfg.eos_token_ids, self.device)
        self._input_batch.release(batch.released)
        self._step, new_rows = self._input_batch.prepare(batch, self._previous_sample_rows)
        for row in new_rows:
            self._sampling_state.add_row(row, self._input_batch.seqs[row])
        return step_fields(self._step, max((wanted for _, _, wanted in self._prompt_spans(batch)), default=0))

    def _prompt_spans(self, batch: ScheduledBatch) -> list[tuple[int, int, int]]:
        """(index in the batch, positions, top-k wanted) of the batch's prompt-logprob spans."""
        vocab_size = self.model_config.vocab_size
        return [(i, end - first, num_top_logprobs(batch.seqs[i].params.prompt_logprobs, vocab_size))
                for i, first, end in batch.prompt_logprob_spans]

    def execute_model(self, fields: dict[str, Field]) -> StepLogits:
        """Logits at each sampling position, and the prompt logprobs the step's prompt spans ask for."""
        inputs = self._inputs = ModelInputs.from_fields(fields, self.device)
        with torch.inference_mode():
            self._fill_placeholders(inputs.input_ids, fields)
            args = (inputs.input_ids, inputs.positions, inputs.attn_metadata)
            hidden = self.cuda_graphs.run(*args) if self.cuda_graphs else None
            if hidden is None:
                self._eager_steps += 1
                hidden = self.model(*args)
            prompt_indices = fields["prompt_logits_indices"]
            prompt_logprobs = None
            if prompt_indices.numel():
                targets = fields["prompt_logprob_targets"].to(self.device)
                prompt_logprobs = compute_prompt_logprobs(self.model.compute_logits, hidden[prompt_indices.to(self.device)],
                                                          targets, fields["num_prompt_logprobs"])
            if inputs.logits_indices.numel() == 0:
                return StepLogits(None, prompt_logprobs)
            return StepLogits(self.model.compute_logits(hidden[inputs.logits_indices]), prompt_logprobs)

    def sample(self, step_logits: StepLogits, batch: ScheduledBatch) -> InFlightStep:
        """Samples on the device and starts copying the tokens back; does not wait for them."""
        step = self._step
        prompt = (step_logits.prompt_logprobs, self._prompt_spans(batch))
        if step_logits.logits is None:
            return InFlightStep(None, {}, self.device, *prompt)
        seqs = [self._input_batch.seqs[row] for row in step.sampling_rows.tolist()]
        params = self._input_batch.sampling_parameters(step.sampling_rows)
        inputs = self._inputs
        sampling = self._sampling_state.batch(seqs, params, step.sampling_rows,
                                              lambda: inputs.input_ids[inputs.logits_indices])
        with torch.inference_mode():
            output = self.sampler(step_logits.logits, sampling, self._sampling_state.penalties)
            broadcast_from_rank0(output.token_ids)  # the tensor-parallel workers' next placeholders
        self._previous_sampled = output.token_ids
        self._previous_sample_rows = {seq.seq_id: i for i, seq in enumerate(seqs)}
        return InFlightStep(output, sampling.logprobs_wanted, self.device, *prompt)

    def receive_sampled(self, fields: dict[str, Field]) -> None:
        """Tensor-parallel workers, after execute_model: the ids rank 0 sampled in this step, which
        the next step's placeholders read when rank 0 schedules it before they reach the host."""
        num_sampled = fields["logits_indices"].numel()
        if num_sampled == 0:
            return
        token_ids = torch.empty(num_sampled, dtype=torch.int64, device=self.device)
        broadcast_from_rank0(token_ids)
        self._previous_sampled = token_ids

    # Step state ---------------------------------------------------------------------------------

    def _fill_placeholders(self, input_ids: torch.Tensor, fields: dict[str, Field]) -> None:
        """Write the tokens the previous step sampled, still on the device, into this step's inputs."""
        dst, src = fields["placeholder_dst"], fields["placeholder_src"]
        if not dst.numel():
            return
        dst = dst.to(self.device, non_blocking=True)
        src = src.to(self.device, non_blocking=True)
        input_ids[dst] = self._previous_sampled[src]

    @property
    def step_counts(self) -> StepCounts:
        """How this rank's forward passes ran so far: from which graphs, or eagerly."""
        if self.cuda_graphs is None:
            return StepCounts(decode_graph=0, mixed_graph=0, eager=self._eager_steps)
        return self.cuda_graphs.step_counts(self._eager_steps)

    def _graphs_enabled(self) -> bool:
        return self.device.type == "cuda" and not self.config.enforce_eager

    def _capture_cuda_graphs(self) -> CudaGraphs | None:
        """CUDA graphs for steps up to max_cudagraph_capture_size tokens, unless eager mode is asked for.

        Tensor-parallel ranks capture the same shapes in the same order, so the
        NCCL collectives inside the graphs meet; a step replays a graph on
        every rank or on none, as each decides from the same step inputs.
        """
        if not self._graphs_enabled():
            return None
        config = self.config
        max_blocks_per_seq = cdiv(config.max_model_len, self.block_size)
        graphs = CudaGraphs(
            self.model, config.max_num_seqs, config.max_cudagraph_capture_size, max_blocks_per_seq, self.device
        )
        graphs.capture()
        return graphs

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        num_layers = self.model_config.num_hidden_layers
        shape = (2, num_layers, num_blocks, *self.kv_block_shape)
        kv_cache = torch.zeros(shape, dtype=self.config.kv_cache_torch_dtype, device=self.device)
        self.model.bind_kv_cache([(kv_cache[0, i], kv_cache[1, i]) for i in range(num_layers)])
        return kv_cache

    def _default_num_kv_blocks(self) -> int:
        if self.device.type == "cuda":
            num_blocks = self._free_gpu_memory_after_profiling() // self.bytes_per_block
        else:
            num_blocks = default_cpu_kv_cache_blocks(
                self.model, self.config, self.bytes_per_block, self.model_config.kv_window
            )
        if num_blocks < 1:
            raise ConfigError(
                "no memory is left for the KV cache after loading the model; "
                "raise gpu_memory_utilization or lower max_num_batched_tokens"
            )
        return num_blocks

    def _free_gpu_memory_after_profiling(self) -> int:
        """Bytes the cache may take: the utilisation target minus weights, activations and others' use."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._profile_forward()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        graph_pool = self._graph_pool_estimate(peak - before)
        return int(total * self.config.gpu_memory_utilization) - peak - graph_pool - used_by_others

    def _graph_pool_estimate(self, step_activations: int) -> int:
        """Bytes to leave for the CUDA graphs' private pool, which eager steps cannot use.

        The pool holds one step's activations at the largest captured size;
        activations grow about linearly with a step's tokens, and the profiled
        step had max_num_batched_tokens of them.
        """
        if not self._graphs_enabled():
            return 0
        config = self.config
        return step_activations * config.max_cudagraph_capture_size // config.max_num_batched_tokens

    def _profile_forward(self) -> None:
        """A worst-case step without a cache: max_num_batched_tokens tokens, max_num_seqs logits rows."""
        num_tokens = self.config.max_num_batched_tokens
        seq_len = min(num_tokens, self.config.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
        starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])
        metadata = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=self.device),
            query_start_loc=starts.to(self.device),
            seq_lens=torch.tensor(lengths, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros((len(lengths), 1), dtype=torch.int32, device=self.device),
            max_query_len=seq_len,
            max_seq_len=seq_len,
        )
        input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids, positions.to(self.device), metadata)
            rows = torch.full((self.config.max_num_seqs,), num_tokens - 1, device=self.device)
            self.model.compute_logits(hidden[rows])
            # A chunk of prompt logprobs with the most top logprobs a request may ask for.
            positions = hidden[:PROMPT_LOGITS_CHUNK]
            targets = torch.zeros(len(positions), dtype=torch.int64, device=self.device)
            vocab_size = self.model_config.vocab_size
            most = min(num_top_logprobs(self.config.max_logprobs, vocab_size), vocab_size)
            compute_prompt_logprobs(self.model.compute_logits, positions, targets, most)
