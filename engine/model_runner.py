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
gpu_memory_utilization of the GPU leaves after the weights and the peak
activations of a profiling forward pass of a full step (max_num_batched_tokens
tokens). On CPU, see engine.kv_cache_sizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.attention_metadata import AttentionMetadata
from engine.block_manager import cdiv
from engine.config import EngineConfig
from engine.core_messages import TokenLogprobs
from engine.cuda_graphs import DecodeGraphs
from engine.distributed.parallel_state import min_across_ranks
from engine.distributed.step_channel import Field
from engine.errors import ConfigError
from engine.input_batch import InputBatch, StepArrays
from engine.kv_cache_sizing import default_cpu_kv_cache_blocks
from engine.layers.sampler import Sampler, SamplerOutput
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.sampling_batch import SamplingState, device_tensor
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


def step_fields(arrays: StepArrays) -> dict[str, Field]:
    return {name: getattr(arrays, name) for name in STEP_FIELDS}


class InFlightStep:
    """A step's sampled tokens on their way to the host; result() waits for them."""

    def __init__(self, output: SamplerOutput | None, logprobs_wanted: list[int | None], device: torch.device):
        self._logprobs_wanted = logprobs_wanted
        self._event: torch.cuda.Event | None = None
        if output is None:
            self._token_ids, self._logprob_ids, self._logprobs = torch.empty(0, dtype=torch.int64), None, None
            return
        pin = device.type == "cuda"

        def to_host(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
            return host.copy_(tensor, non_blocking=pin)

        self._token_ids = to_host(output.token_ids)
        self._logprob_ids = to_host(output.logprob_token_ids)
        self._logprobs = to_host(output.logprobs)
        if pin:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> SampledTokens:
        if self._event is not None:
            self._event.synchronize()
        token_ids = self._token_ids.numpy()
        if self._logprobs is None:
            return SampledTokens(token_ids)
        ids, values = self._logprob_ids.tolist(), self._logprobs.tolist()
        logprobs: list[TokenLogprobs | None] = []
        for row, wanted in enumerate(self._logprobs_wanted):
            if wanted is None:
                logprobs.append(None)
                continue
            entry = {ids[row][0]: values[row][0]}
            for token_id, value in zip(ids[row][1 : wanted + 1], values[row][1 : wanted + 1]):
                entry.setdefault(token_id, value)
            logprobs.append(entry)
        return SampledTokens(token_ids, logprobs)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(
            model_config.path, model_config, config.torch_dtype, self.device, quantization=config.quantization
        )
        # Tensor-parallel ranks must agree on the cache size: the scheduler on rank 0 allocates for all.
        self.num_kv_blocks = min_across_ranks(config.num_kv_blocks or self._default_num_kv_blocks())
        self.kv_cache = self._allocate_kv_cache(self.num_kv_blocks)
        self.sampler = Sampler(config.seed, self.device)
        self.decode_graphs = self._capture_decode_graphs()
        # Rank 0's step state, made on first use (tensor-parallel workers only run execute_model).
        self._input_batch: InputBatch | None = None
        self._sampling_state: SamplingState | None = None
        self._step: StepArrays | None = None
        self._previous_sampled: torch.Tensor | None = None  # last step's token ids, on the device
        self._previous_sample_rows: dict[int, int] = {}  # seq_id -> index in _previous_sampled

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
        return step_fields(self._step)

    def execute_model(self, fields: dict[str, Field]) -> torch.Tensor | None:
        """Logits at each sampling position (None when no sequence samples this step)."""
        inputs = ModelInputs.from_fields(fields, self.device)
        with torch.inference_mode():
            self._fill_placeholders(inputs.input_ids)
            if self.decode_graphs and self.decode_graphs.can_run(inputs.attn_metadata):
                hidden = self.decode_graphs.run(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            if inputs.logits_indices.numel() == 0:
                return None
            return self.model.compute_logits(hidden[inputs.logits_indices])

    def sample(self, logits: torch.Tensor | None, batch: ScheduledBatch) -> InFlightStep:
        """Samples on the device and starts copying the tokens back; does not wait for them."""
        step = self._step
        seqs = [self._input_batch.seqs[row] for row in step.sampling_rows]
        logprobs_wanted = [seq.params.logprobs for seq in seqs]
        if logits is None:
            return InFlightStep(None, logprobs_wanted, self.device)
        params = self._input_batch.sampling_parameters(step.sampling_rows)
        sampling = self._sampling_state.batch(seqs, params, step.sampling_rows)
        with torch.inference_mode():
            output = self.sampler(logits, sampling, self._sampling_state.penalties)
        self._previous_sampled = output.token_ids
        self._previous_sample_rows = {seq.seq_id: i for i, seq in enumerate(seqs)}
        return InFlightStep(output, logprobs_wanted, self.device)

    # Rank 0's step state ----------------------------------------------------------------------

    def _fill_placeholders(self, input_ids: torch.Tensor) -> None:
        """Write the tokens the previous step sampled, still on the device, into this step's inputs."""
        step = self._step
        if step is None or not len(step.placeholder_dst):
            return
        dst = device_tensor(step.placeholder_dst.tolist(), torch.int64, self.device)
        src = device_tensor(step.placeholder_src.tolist(), torch.int64, self.device)
        input_ids[dst] = self._previous_sampled[src]

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        """CUDA graphs for decode steps, unless eager mode is asked for.

        Tensor-parallel ranks capture the same batch sizes in the same order, so
        the NCCL collectives inside the graphs meet; a step replays a graph on
        every rank or on none, as each decides from the same step inputs.
        """
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        max_blocks_per_seq = cdiv(self.config.max_model_len, self.block_size)
        graphs = DecodeGraphs(self.model, self.config.max_num_seqs, max_blocks_per_seq, self.device)
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
        self._profile_forward()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        return int(total * self.config.gpu_memory_utilization) - peak - used_by_others

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
