"""Blocks of the paged KV cache: a free list, reference counts and a prefix cache.

A full block is keyed by a SHA-256 digest of its parent block's digest and its token ids, and
registered once its K/V are computed. The digest chains the whole prefix, so a block is reused only
after the same tokens from the very first one; a cryptographic hash keeps a client from forging a
collision with another client's prompt (Python's ``hash`` of ints and tuples is predictable), as vLLM's
``--prefix-caching-hash-algo sha256`` does. A new sequence whose leading blocks hash the same reuses them (reference
count + 1) instead of recomputing. Freed blocks keep their hash until they are handed out
again, oldest first, so a shared prefix survives between requests while memory allows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from nemolite.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent_hash: bytes | None, token_ids: tuple[int, ...], extra: bytes = b"") -> bytes:
    """The prefix-cache key of a full block; ``extra`` is whatever else changes its K/V (an adapter)."""
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.handed_out: list[int] = []  # blocks given out since the engine last cleared them
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, seq: Sequence) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False (and changes nothing) when there are not enough free blocks.
        """
        tokens, size = seq.token_ids, self.block_size
        cached: list[Block] = []
        hashes: list[bytes] = []
        parent = None
        # The block holding the last token is always recomputed: the model must see that token.
        # Prompt logprobs need every prompt position computed, so such requests take no cached blocks.
        use_cache = self.enable_prefix_caching and seq.params.prompt_logprobs is None
        for start in range(0, (len(tokens) - 1) // size * size, size) if use_cache else ():
            chunk = tuple(tokens[start:start + size])
            parent = block_hash(parent, chunk, seq.cache_salt)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            cached.append(self.blocks[block_id])
            hashes.append(parent)
        revived = sum(1 for block in cached if block.ref_count == 0)  # cached blocks now on the free list
        fresh = self.blocks_needed(len(tokens)) - len(cached)
        if fresh + revived > self.num_free_blocks:
            return False
        for block in cached:
            if block.ref_count == 0:
                del self.free_block_ids[block.block_id]
            block.ref_count += 1
        seq.block_table = [block.block_id for block in cached] + [self._take_free_block() for _ in range(fresh)]
        seq.block_hashes = hashes
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * size
        if seq.num_output_tokens == 0:
            self.prefix_queries += len(tokens)
            self.prefix_hits += seq.num_cached_tokens
        return True

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for ``num_new_tokens`` more tokens of K/V (call ``can_append`` first)."""
        while len(seq.block_table) * self.block_size < seq.num_computed_tokens + num_new_tokens:
            seq.block_table.append(self._take_free_block())

    def mark_computed(self, seq: Sequence, num_tokens: int) -> None:
        """``num_tokens`` more of the sequence's K/V are in the cache: register blocks that became full."""
        seq.num_computed_tokens += num_tokens
        size = self.block_size
        while (len(seq.block_hashes) + 1) * size <= seq.num_computed_tokens:
            index = len(seq.block_hashes)
            chunk = tuple(seq.token_ids[index * size:(index + 1) * size])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            digest = block_hash(parent, chunk, seq.cache_salt)
            seq.block_hashes.append(digest)
            block = self.blocks[seq.block_table[index]]
            if block.hash is None and self.enable_prefix_caching:
                block.hash, block.token_ids = digest, chunk
                self.hash_to_block.setdefault(digest, block.block_id)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first: they are the least likely to be shared, so they are evicted first.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        self.handed_out.append(block_id)
        return block_id

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
