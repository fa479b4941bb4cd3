"""Runs one scheduled batch through the model and samples the next tokens.

The runner owns the device side: the model weights, the paged KV cache (one K
and one V tensor per layer, [num_blocks, block_size, num_kv_heads, head_dim])
and the sampler. Each step it flattens the batch into the tensors attention
needs (built in one place, `prepare_inputs`), runs the model, computes logits
only at the last position of the sequences that sample this step, and copies
the sampled tokens back to the host once.

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
from engine.cuda_graphs import DecodeGraphs
from engine.distributed.parallel_state import min_across_ranks
from engine.distributed.step_channel import Field
from engine.errors import ConfigError
from engine.kv_cache_sizing import default_cpu_kv_cache_blocks
from engine.layers.sampler import SampledToken, Sampler
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.scheduler import ScheduledBatch


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

    def as_fields(self) -> dict[str, Field]:
        meta = self.attn_metadata
        return {
            "input_ids": self.input_ids,
            "positions": self.positions,
            "logits_indices": self.logits_indices,
            "slot_mapping": meta.slot_mapping,
            "query_start_loc": meta.query_start_loc,
            "seq_lens": meta.seq_lens,
            "block_tables": meta.block_tables,
            "max_query_len": meta.max_query_len,
            "max_seq_len": meta.max_seq_len,
        }

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


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        self.model = load_model(model_config.path, model_config, config.torch_dtype, self.device)
        # Tensor-parallel ranks must agree on the cache size: the scheduler on rank 0 allocates for all.
        self.num_kv_blocks = min_across_ranks(config.num_kv_blocks or self._default_num_kv_blocks())
        self.kv_cache = self._allocate_kv_cache(self.num_kv_blocks)
        self.sampler = Sampler(model_config.eos_token_ids, config.seed, self.device)
        self.decode_graphs = self._capture_decode_graphs()

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
        return elements * self.config.torch_dtype.itemsize

    # A step is split in three so that tensor-parallel workers can run the middle part alone
    # (engine.distributed.Executor): prepare_step and sample run on rank 0 only.

    def prepare_step(self, batch: ScheduledBatch) -> dict[str, Field]:
        """The batch's model inputs as host tensors, keyed by STEP_FIELDS."""
        return self.prepare_inputs(batch).as_fields()

    def execute_model(self, fields: dict[str, Field]) -> torch.Tensor | None:
        """Logits at each sampling position (None when no sequence samples this step)."""
        inputs = ModelInputs.from_fields(fields, self.device)
        with torch.inference_mode():
            if self.decode_graphs and self.decode_graphs.can_run(inputs.attn_metadata):
                hidden = self.decode_graphs.run(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, inputs.attn_metadata)
            if inputs.logits_indices.numel() == 0:
                return None
            return self.model.compute_logits(hidden[inputs.logits_indices])

    def sample(self, logits: torch.Tensor | None, batch: ScheduledBatch) -> list[SampledToken]:
        """One SampledToken per sequence in batch.sampling_seqs."""
        if logits is None:
            return []
        with torch.inference_mode():
            return self.sampler(logits, batch.sampling_seqs)

    def prepare_inputs(self, batch: ScheduledBatch) -> ModelInputs:
        """Host tensors (page-locked on CUDA, so that the copies to the GPU are asynchronous)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        size = self.block_size
        for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, batch.samples):
            start = seq.num_computed_tokens
            end = start + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // size] * size + p % size for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            if samples:
                logits_indices.append(query_start_loc[-1] - 1)
        width = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [0] * (width - len(seq.block_table)) for seq in batch.seqs]

        pinned = self.device.type == "cuda"

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, pin_memory=pinned)

        metadata = AttentionMetadata(
            slot_mapping=tensor(slot_mapping, torch.int64),
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        return ModelInputs(
            input_ids=tensor(input_ids, torch.int64),
            positions=tensor(positions, torch.int64),
            attn_metadata=metadata,
            logits_indices=tensor(logits_indices, torch.int64),
        )

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
        kv_cache = torch.zeros(shape, dtype=self.config.torch_dtype, device=self.device)
        self.model.bind_kv_cache([(kv_cache[0, i], kv_cache[1, i]) for i in range(num_layers)])
        return kv_cache

    def _default_num_kv_blocks(self) -> int:
        if self.device.type == "cuda":
            num_blocks = self._free_gpu_memory_after_profiling() // self.bytes_per_block
        else:
            num_blocks = default_cpu_kv_cache_blocks(self.model, self.config, self.bytes_per_block)
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
