"""Steps replayed from CUDA graphs: decode steps, and steps that carry prompt tokens.

A step of a small model is a few hundred short kernels; launched one by one
from Python, the CPU, not the GPU, sets the pace. A captured graph launches
them all at once. Graphs are full-model graphs over padded shapes: a step
copies its tensors into static buffers, pads them up to the smallest captured
shape that holds it, replays, and takes the first rows of the static output.

Two sets of graphs, one memory pool:
- decode steps (one token per sequence) pad the batch to a captured batch size
  and run the split-K decode kernel;
- steps that carry prompt tokens ("mixed": prefill chunks, with or without
  decode rows) pad the token count to a captured bucket and run the varlen
  kernel, whose flat grid depends on shapes only (kernels/attention.py).
  Their sequence count is padded to min(bucket, max_num_seqs + 1): a mixed
  step has more tokens than sequences (one has two or more), so that holds
  its sequences and one more for the padding tokens.

Padding never touches real data: padding tokens have cache slot -1 (the
cache store skips them) and form one padding sequence of length 0; padding
sequences have length 0, so attention reads no K/V for them and writes zeros
(finite rows, whatever stale ids and positions the static buffers hold), and
every other layer works row by row (activations are quantized per token), so
padding rows cannot leak into real ones. Steps larger than the largest graph
(max_cudagraph_capture_size) run eagerly.

The block-table buffer is as wide as max_model_len needs, so the decode
kernel's launch (its split count depends on that width) is the same for every
step a graph serves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.distributed import parallel_state


@dataclass(frozen=True)
class GraphShape:
    """The padded size of the steps one graph serves."""

    num_tokens: int
    num_seqs: int


def decode_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


def mixed_token_counts(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then every multiple of 128 to 2048 and of 256 beyond, up to and including max_tokens.

    A step pads to the next count: at most 128 tokens (256 past 2048), which
    costs little next to the step's own work at those sizes.
    """
    sizes = [t for t in (16, 32, 64) if t < max_tokens]
    sizes += [t for t in range(128, 2048, 128) if t < max_tokens]
    sizes += [t for t in range(2048, max_tokens, 256)]
    return sizes + [max_tokens]


def decode_shapes(max_num_seqs: int, max_tokens: int) -> list[GraphShape]:
    return [GraphShape(b, b) for b in decode_batch_sizes(min(max_num_seqs, max_tokens))]


def mixed_shapes(max_num_seqs: int, max_tokens: int) -> list[GraphShape]:
    """Mixed steps have at least two tokens: no graph when the bound is below that."""
    if max_tokens < 2:
        return []
    return [GraphShape(t, min(t, max_num_seqs + 1)) for t in mixed_token_counts(max_tokens)]


def smallest_fitting(shapes: list[GraphShape], num_tokens: int, num_seqs: int) -> GraphShape | None:
    """The first shape (ascending) that holds the step; None when none does."""
    return next((s for s in shapes if s.num_tokens >= num_tokens and s.num_seqs >= num_seqs), None)


class StaticInputs:
    """The buffers a set of graphs reads, sized for its largest shape."""

    def __init__(self, largest: GraphShape, max_blocks_per_seq: int, device: torch.device):
        tokens, seqs = largest.num_tokens, largest.num_seqs
        self.input_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.int64, device=device)
        # Decode steps have one token per sequence: 0..B is right for every decode shape and never copied.
        self.query_start_loc = torch.arange(seqs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    def metadata(self, shape: GraphShape, decode_only: bool) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: shape.num_tokens],
            query_start_loc=self.query_start_loc[: shape.num_seqs + 1],
            seq_lens=self.seq_lens[: shape.num_seqs],
            block_tables=self.block_tables[: shape.num_seqs],
            # Only its being 1 or not is read (the kernel choice); the varlen grid depends on shapes only.
            max_query_len=1 if decode_only else shape.num_tokens,
            max_seq_len=self.block_tables.shape[1],  # no kernel reads max_seq_len; a placeholder, in blocks
        )

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
             shape: GraphShape, decode_only: bool) -> None:
        """Copy a step in and pad it to `shape` (see the module docstring for what padding means)."""
        num_tokens, num_seqs = input_ids.shape[0], meta.num_seqs
        self.input_ids[:num_tokens].copy_(input_ids, non_blocking=True)
        self.positions[:num_tokens].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_tokens].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[num_tokens : shape.num_tokens].fill_(-1)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[num_seqs : shape.num_seqs].fill_(0)
        width = meta.block_tables.shape[1]
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables, non_blocking=True)
        if not decode_only:
            # The padding tokens are sequence num_seqs's queries (it has length 0); later ones have none.
            self.query_start_loc[: num_seqs + 1].copy_(meta.query_start_loc, non_blocking=True)
            self.query_start_loc[num_seqs + 1 : shape.num_seqs + 1].fill_(shape.num_tokens)


class StepGraphs:
    """One graph per padded shape, for the steps of one kind (decode-only, or carrying prompt tokens)."""

    def __init__(self, model: nn.Module, shapes: list[GraphShape], decode_only: bool, max_blocks_per_seq: int,
                 device: torch.device):
        self.model = model
        self.shapes = shapes
        self.decode_only = decode_only
        self.inputs = StaticInputs(shapes[-1], max_blocks_per_seq, device)
        self.graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self.hidden: torch.Tensor | None = None  # [largest num_tokens, hidden_size]: every graph's output
        self.replays = 0

    def _forward(self, shape: GraphShape) -> torch.Tensor:
        inputs = self.inputs
        metadata = inputs.metadata(shape, self.decode_only)
        return self.model(inputs.input_ids[: shape.num_tokens], inputs.positions[: shape.num_tokens], metadata)

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int]) -> None:
        """Capture every shape, largest first, into the shared pool.

        Each graph ends by copying its hidden states into one static buffer, so
        its own output returns to the pool for the next capture to reuse: the
        pool holds one step's activations, not one per shape.
        """
        for shape in reversed(self.shapes):
            warm_up = self._forward(shape)  # compiles the Triton kernels and warms the allocator outside the graph
            if self.hidden is None:
                self.hidden = torch.empty_like(warm_up)
            del warm_up
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.hidden[: shape.num_tokens].copy_(self._forward(shape))
            self.graphs[shape] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def shape_for(self, num_tokens: int, num_seqs: int) -> GraphShape | None:
        """The smallest shape that holds a step of this kind; None when it is too large for every graph."""
        padding_seqs = 0 if self.decode_only else 1  # a mixed step's padding tokens need a sequence of their own
        return smallest_fitting(self.shapes, num_tokens, num_seqs + padding_seqs)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            shape: GraphShape) -> torch.Tensor:
        """The step's hidden states [num_tokens, hidden_size] (a view of the static output)."""
        self.inputs.fill(input_ids, positions, meta, shape, self.decode_only)
        self.graphs[shape].replay()
        self.replays += 1
        return self.hidden[: input_ids.shape[0]]


@dataclass(frozen=True)
class StepCounts:
    """How a run's forward passes ran (rank 0's, or this rank's, counts)."""

    decode_graph: int
    mixed_graph: int
    eager: int

    def since(self, earlier: StepCounts) -> StepCounts:
        return StepCounts(self.decode_graph - earlier.decode_graph, self.mixed_graph - earlier.mixed_graph,
                          self.eager - earlier.eager)


class CudaGraphs:
    """The decode and mixed graph sets of one model, captured together into one memory pool.

    Tensor-parallel ranks capture the same shapes in the same order, so the
    NCCL collectives inside the graphs meet; every rank picks the graph (or
    eager) from the same step inputs, so they replay the same one.
    """

    def __init__(self, model: nn.Module, max_num_seqs: int, max_tokens: int, max_blocks_per_seq: int,
                 device: torch.device):
        self.device = device

        def step_graphs(shapes: list[GraphShape], decode_only: bool) -> StepGraphs | None:
            return StepGraphs(model, shapes, decode_only, max_blocks_per_seq, device) if shapes else None

        self.mixed = step_graphs(mixed_shapes(max_num_seqs, max_tokens), decode_only=False)
        self.decode = step_graphs(decode_shapes(max_num_seqs, max_tokens), decode_only=True)
        self.memory_bytes = 0  # device memory the capture took: pool, static buffers, library workspaces
        self.capture_seconds = 0.0

    def sets(self) -> list[StepGraphs]:
        return [graphs for graphs in (self.mixed, self.decode) if graphs is not None]

    def capture(self) -> None:
        """Capture every graph (mixed first: the largest shapes size the pool) and measure what it took."""
        # Measured as the driver sees it, with the caching allocator's unused blocks handed back on
        # both sides: otherwise the capture's new segments are offset by cached blocks the allocator
        # frees to make room for them (the figure read 0.00 GiB on an H200).
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        for graphs in self.sets():
            graphs.capture(pool)
        self.capture_seconds = time.perf_counter() - start
        torch.cuda.empty_cache()
        free_after, _ = torch.cuda.mem_get_info(self.device)
        self.memory_bytes = max(free_before - free_after, 0)
        # Graphs that captured NCCL collectives keep their communicator from being destroyed.
        parallel_state.release_before_teardown(self.release)

    def release(self) -> None:
        """Destroys the graphs and frees their memory pool; later steps run eagerly."""
        for graphs in self.sets():
            graphs.release()

    def sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(decode batch sizes, mixed-step token counts) with a graph."""

        def token_counts(graphs: StepGraphs | None) -> tuple[int, ...]:
            return tuple(shape.num_tokens for shape in graphs.shapes) if graphs else ()

        return token_counts(self.decode), token_counts(self.mixed)

    def step_counts(self, eager_steps: int) -> StepCounts:
        def replays(graphs: StepGraphs | None) -> int:
            return graphs.replays if graphs else 0

        return StepCounts(decode_graph=replays(self.decode), mixed_graph=replays(self.mixed), eager=eager_steps)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor | None:
        """The step's hidden states from the graph that serves it; None when none does (run it eagerly)."""
        graphs = self.decode if meta.decode_only else self.mixed
        if graphs is None or not graphs.graphs:  # none of this kind, or released
            return None
        shape = graphs.shape_for(input_ids.shape[0], meta.num_seqs)
        return None if shape is None else graphs.run(input_ids, positions, meta, shape)
