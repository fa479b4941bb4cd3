"""Paged KV-cache allocator with hash-chained prefix caching.

The cache is `num_blocks` fixed-size blocks of `block_size` token slots. A
sequence owns a block table (logical block i -> physical block id); blocks are
reference counted so several sequences can share the same prefix.

Prefix caching: once a block is full and its K/V computed, it is registered
under a chain hash of (hash of the previous block, its token ids), so equal
hashes mean equal whole prefixes. A registered block whose ref count drops to
zero stays in the cache, reusable by a later request, until the allocator
needs it (least recently freed first). Only full, computed blocks are ever
shared, so no block is written by two sequences and copy-on-write is not
needed.

All free blocks, evictable cached ones included, sit in one ordered queue:
never-cached blocks at the front (handed out first), cached ones appended at
the back as they are freed (evicted in LRU order).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf

from engine.sequence import Sequence


def hash_block(parent_hash: bytes, token_ids: SequenceOf[int]) -> bytes:
    """Stable (unsalted, process-independent) hash of a block and everything before it."""
    return hashlib.blake2b(parent_hash + array("q", token_ids).tobytes(), digest_size=16).digest()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# A block-table entry whose block was released because it lies wholly outside the sliding window:
# the entry keeps later blocks at their index (position // block_size), and attention never reads it.
FREED_BLOCK = -1


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached_blocks: dict[bytes, int] = {}  # chain hash -> physical block
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never used, freed, or cached but unreferenced."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # Prefix cache lookups -------------------------------------------------

    def full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chain hashes of seq's first num_blocks full blocks (memoised on the sequence)."""
        size = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else b""
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * size : (i + 1) * size]))
        return seq.block_hashes[:num_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Physical blocks already holding seq's leading full blocks.

        At most (num_tokens - 1) // block_size blocks: the last token is always
        computed again, because its logits are needed to sample the next one.
        """
        if not self.enable_prefix_caching:
            return []
        hits = []
        for block_hash in self.full_block_hashes(seq, (seq.num_tokens - 1) // self.block_size):
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    # Allocation -----------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, shared_prefix: SequenceOf[int] = ()) -> bool:
        """Give seq the blocks to compute num_new_tokens more tokens; False (and no change) if short.

        shared_prefix: for a sequence without blocks yet, computed full blocks it
        can reuse (prefix-cache hits or a sibling's prompt); they count as computed.
        """
        if not shared_prefix and len(seq.block_table) * self.block_size >= seq.num_computed_tokens + num_new_tokens:
            return True  # most decode steps: the last block has room
        assert not shared_prefix or not seq.block_table, "a shared prefix goes only to a fresh sequence"
        num_computed = len(shared_prefix) * self.block_size if shared_prefix else seq.num_computed_tokens
        num_owned = len(seq.block_table) + len(shared_prefix)
        num_missing = self.blocks_needed(num_computed + num_new_tokens) - num_owned
        # Shared blocks nobody references yet are in the free queue but cannot be handed out too.
        num_reclaimed = sum(1 for block in shared_prefix if self.ref_counts[block] == 0)
        if num_missing > self.num_free_blocks - num_reclaimed:
            return False
        for block in shared_prefix:
            self._take(block)
        if shared_prefix:
            seq.block_table.extend(shared_prefix)
            seq.num_computed_tokens = num_computed
            seq.num_cached_blocks = len(shared_prefix) if self.enable_prefix_caching else 0
        for _ in range(num_missing):
            block = next(iter(self.free_queue))
            self._forget_hash(block)
            self._take(block)
            seq.block_table.append(block)
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's newly full and computed blocks in the prefix cache."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full == seq.num_cached_blocks:
            return  # most decode steps fill no block: skip copying the sequence's hash list
        hashes = self.full_block_hashes(seq, num_full)
        for i in range(seq.num_cached_blocks, num_full):
            block = seq.block_table[i]
            if self.block_hash[block] is None and hashes[i] not in self.cached_blocks:
                self.block_hash[block] = hashes[i]
                self.cached_blocks[hashes[i]] = block
        seq.num_cached_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks; its K/V must be recomputed if it runs again."""
        # Tail blocks first, so that a prefix's deeper blocks are evicted before its root.
        for block in reversed(seq.block_table):
            if block != FREED_BLOCK:
                self._release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0

    # Sliding-window attention ---------------------------------------------
    # Scheduler.update calls this after each step when every layer has a window
    # (ModelConfig.kv_window).

    def free_blocks_outside_window(self, seq: Sequence, window: int) -> int:
        """Release seq's blocks that no query to come can attend to; returns how many were released.

        Every layer attends to the last `window` positions only, and the next
        query sits at position num_computed_tokens, so blocks wholly before
        num_computed_tokens - window + 1 are never read again. Their entries
        become FREED_BLOCK. A released block that is in the prefix cache stays
        there, reusable by another request until it is evicted.
        """
        first_live = max(0, seq.num_computed_tokens - window + 1) // self.block_size
        released = 0
        # Newest first, as free() does; earlier calls freed everything before the first FREED_BLOCK met.
        for index in range(min(first_live, len(seq.block_table)) - 1, -1, -1):
            block = seq.block_table[index]
            if block == FREED_BLOCK:
                break
            self._release(block)
            seq.block_table[index] = FREED_BLOCK
            released += 1
        return released

    def _release(self, block: int) -> None:
        """Drop one reference; an unreferenced block becomes free (uncached ones are handed out first)."""
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None
            if self.block_hash[block] is None:
                self.free_queue.move_to_end(block, last=False)

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _forget_hash(self, block: int) -> None:
        """Evict a cached block's content before it is reused for other tokens."""
        block_hash = self.block_hash[block]
        if block_hash is not None:
            del self.cached_blocks[block_hash]
            self.block_hash[block] = None
