"""The CPU KV cache is sized by what the model and max_num_seqs need, within memory."""

from __future__ import annotations

import pytest

from engine.errors import ConfigError
from engine.kv_cache_sizing import CPU_KV_CACHE_FRACTION, cpu_kv_cache_blocks

GIB = 1 << 30
BLOCK = 16 * 46080  # 16 tokens of SmolLM2-135M's K and V in float32 (30 layers x 3 heads x 64 x 2 x 4 bytes)


def test_room_for_every_sequence_when_it_is_small():
    assert cpu_kv_cache_blocks(4, 256, 16, BLOCK, weight_bytes=GIB, memory_bytes=64 * GIB) == 4 * 16


def test_capped_at_the_weights_size():
    blocks = cpu_kv_cache_blocks(256, 8192, 16, BLOCK, weight_bytes=540 * 2**20, memory_bytes=64 * GIB)
    assert blocks == 540 * 2**20 // BLOCK


def test_capped_at_a_fraction_of_memory():
    blocks = cpu_kv_cache_blocks(256, 8192, 16, BLOCK, weight_bytes=32 * GIB, memory_bytes=16 * GIB)
    assert blocks == int(16 * GIB * CPU_KV_CACHE_FRACTION) // BLOCK


def test_never_less_than_one_full_length_sequence():
    assert cpu_kv_cache_blocks(8, 8192, 16, BLOCK, weight_bytes=2**20, memory_bytes=64 * GIB) == 8192 // 16


def test_a_sequence_that_does_not_fit_in_memory_is_a_config_error():
    with pytest.raises(ConfigError, match="lower max_model_len"):
        cpu_kv_cache_blocks(1, 131072, 16, BLOCK * 8, weight_bytes=GIB, memory_bytes=8 * GIB)


def test_a_sliding_window_bounds_the_blocks_a_sequence_holds():
    from engine.core_messages import max_live_blocks

    assert max_live_blocks(32768, 16, None, 8192) == 2048
    assert max_live_blocks(32768, 16, 4096, 8192) == 768 + 1  # window + one step's chunk + a partial block
    assert max_live_blocks(100, 16, 4096, 8192) == 7  # short sequences hold all their blocks
