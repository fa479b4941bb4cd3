"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

A decode step of a small model is a few hundred short kernels; launched one
by one from Python, the CPU, not the GPU, sets the pace. A captured graph
launches them all at once. The graphs read their inputs from static buffers:
a step copies its tensors in, pads the batch up to the next captured size
(padding rows have slot -1, so nothing is stored, and length 0, so nothing is
read), replays, and takes the first rows of the static output.

The block-table buffer is as wide as max_model_len needs, so the decode
kernel's launch (its split count depends on that width) is the same for every
step the graph serves.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.distributed import parallel_state


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        self.model = model
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        size = self.batch_sizes[-1]
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, batch_size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1],  # no kernel reads max_seq_len; a placeholder, in blocks
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first, all sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for batch_size in reversed(self.batch_sizes):
            args = (self.input_ids[:batch_size], self.positions[:batch_size], self._metadata(batch_size))
            self.model(*args)  # compiles the Triton kernels and warms the allocator outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch_size] = self.model(*args)
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()
        # Graphs that captured NCCL collectives keep their communicator from being destroyed.
        parallel_state.release_before_teardown(self.release)

    def release(self) -> None:
        """Destroys the graphs and frees their memory pool; later steps run eagerly."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_run(self, metadata: AttentionMetadata) -> bool:
        return bool(self.graphs) and metadata.decode_only and metadata.num_seqs <= self.batch_sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """The hidden states of a decode step [num_seqs, hidden_size], from the smallest graph that fits."""
        num_seqs = metadata.num_seqs
        batch_size = next(b for b in self.batch_sizes if b >= num_seqs)
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[num_seqs:batch_size].fill_(-1)
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs:batch_size].fill_(0)
        width = metadata.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(metadata.block_tables, non_blocking=True)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][:num_seqs]
