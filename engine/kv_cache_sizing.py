"""How many KV-cache blocks the CPU gets when --num-kv-blocks is not given.

On a GPU the cache takes what profiling leaves of the memory budget. On CPU it
shares host memory with everything else and is filled with zeros up front, so
it is sized by what the model and the batch need: room for max_num_seqs
sequences of max_model_len tokens, but no larger than the model's weights (a
CPU serves few long sequences at once) nor CPU_KV_CACHE_FRACTION of the
machine's memory, and never smaller than one full-length sequence (else the
longest allowed request could not run).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from engine.block_manager import cdiv
from engine.config import EngineConfig
from engine.core_messages import max_live_blocks
from engine.errors import ConfigError

CPU_KV_CACHE_FRACTION = 0.1
CGROUP_MEMORY_LIMIT = Path("/sys/fs/cgroup/memory.max")


def cpu_kv_cache_blocks(
    max_num_seqs: int, max_model_len: int, block_size: int, bytes_per_block: int, weight_bytes: int, memory_bytes: int,
    per_seq: int | None = None,
) -> int:
    """max_num_seqs full-length sequences, capped by the weights' size and a fraction of memory; one at least.

    per_seq: the blocks one sequence holds at once, when fewer than max_model_len's (sliding windows).
    """
    per_seq = per_seq or cdiv(max_model_len, block_size)
    wanted = max_num_seqs * per_seq
    budget = min(weight_bytes, int(memory_bytes * CPU_KV_CACHE_FRACTION)) // bytes_per_block
    blocks = max(per_seq, min(wanted, budget))
    if blocks * bytes_per_block > memory_bytes // 2:
        raise ConfigError(
            f"one sequence of max_model_len={max_model_len} tokens needs {blocks * bytes_per_block / 2**30:.1f} GiB "
            f"of KV cache, over half of this machine's {memory_bytes / 2**30:.1f} GiB; lower max_model_len"
        )
    return blocks


def default_cpu_kv_cache_blocks(
    model: nn.Module, config: EngineConfig, bytes_per_block: int, kv_window: int | None = None
) -> int:
    """cpu_kv_cache_blocks for a loaded model on this machine (kv_window: every layer's sliding window)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_seq = max_live_blocks(config.max_model_len, config.block_size, kv_window, config.max_num_batched_tokens)
    return cpu_kv_cache_blocks(
        config.max_num_seqs, config.max_model_len, config.block_size, bytes_per_block, weight_bytes, memory_bytes(),
        per_seq,
    )


def memory_bytes() -> int:
    """The machine's RAM, or the container's memory limit (cgroup v2) when that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_MEMORY_LIMIT.read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical
