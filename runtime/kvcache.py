"""The KV cache as one pool of fixed-size blocks that every sequence draws from (paged, as vLLM's).

Keys and values live in slots, (n_layers, n_blocks * block_size, n_kv_heads, head_dim); a
sequence owns a list of blocks and keeps a slot map, the slot of each of its positions, which
every attention kernel reads (kernels/cpu/ops.py, kernels/cuda/ops.cu). Sequences of different
lengths so share one allocation without fragmenting it, and a sequence grows one block at a time.

A full block is immutable once written, so it can be shared: each is published under its
tokens and the key of the block before it (the prefix it continues), and a new sequence whose
prompt starts with the same tokens takes those blocks instead of recomputing them (a system
prompt, a chat's earlier turns). Freed blocks that hold a published prefix stay cached, evicted
least recently used first when the pool runs out of never-used ones.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from qformat.config import ModelArgs
from qformat.kernels import device_ops

# Positions per block: small enough that a sequence wastes little of its last block, large
# enough that block tables stay short.
BLOCK_SIZE = 16


class PoolExhausted(RuntimeError):
    """No free block left in the KV pool (every block holds a live sequence's positions)."""


class BlockPool:
    """n_blocks blocks of block_size slots for every layer's keys and values, on the device."""

    def __init__(self, args: ModelArgs, n_blocks: int, context: int, device: str = "cpu",
                 block_size: int = BLOCK_SIZE):
        if n_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {n_blocks}")
        ops = device_ops(device)
        shape = (args.n_layers, n_blocks * block_size, args.n_kv_heads, args.head_dim)
        self.k = ops.zeros(shape, ops.kv_dtype)  # on the CPU untouched pages stay unmapped
        self.v = ops.zeros(shape, ops.kv_dtype)
        self.n_blocks, self.block_size, self.context = n_blocks, block_size, context
        self.refs = np.zeros(n_blocks, np.int64)  # live sequences holding each block
        self.spare = list(range(n_blocks - 1, -1, -1))  # blocks holding nothing; popped from the end
        self.published: dict[tuple, int] = {}  # (key of the previous block, its tokens) -> block
        self.key_of: dict[int, tuple] = {}  # block -> its key in `published`
        self.idle: OrderedDict[int, None] = OrderedDict()  # published blocks no sequence holds, LRU first

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def blocks_in_use(self) -> int:
        """Blocks some live sequence holds."""
        return int(np.count_nonzero(self.refs))

    @property
    def blocks_free(self) -> int:
        """Blocks a sequence could take now (holding nothing, or cached and idle)."""
        return len(self.spare) + len(self.idle)

    def allocate(self) -> int:
        """A block for one sequence alone: a spare one, else the least recently used idle cached
        one (its published prefix is forgotten)."""
        if self.spare:
            block = self.spare.pop()
        elif self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.published[self.key_of.pop(block)]
        else:
            raise PoolExhausted(f"the KV pool's {self.n_blocks} blocks of {self.block_size} positions are all "
                                "in use; run fewer sequences at once or give the pool more blocks")
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        """One more sequence holds this published block."""
        if self.refs[block] == 0:
            del self.idle[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        """A sequence lets go of the block; kept cached if published, else free for anyone."""
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.key_of:
                self.idle[block] = None
            else:
                self.spare.append(block)

    def lookup(self, key: tuple) -> int | None:
        return self.published.get(key)

    def publish(self, block: int, key: tuple) -> None:
        """Record a full block under its prefix key (first writer wins; a duplicate stays private)."""
        if key not in self.published and block not in self.key_of:
            self.published[key] = block
            self.key_of[block] = key


class SequenceKV:
    """One sequence's blocks in a pool: its slot map, how many positions hold keys and values,
    and the tokens at those positions (the keys of its full blocks)."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.blocks: list[int] = []
        # position -> slot, valid below capacity; whole blocks, so a context that is not a
        # multiple of the block size still maps its last block
        self.slots = np.zeros(-(-pool.context // pool.block_size) * pool.block_size, np.int32)
        self.ids: list[int] = []  # tokens whose keys/values are written, in order
        self.keys: list[tuple] = []  # each full block's key in the pool (its prefix), in order

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def _add(self, block: int) -> None:
        bs = self.pool.block_size
        i = len(self.blocks)
        self.slots[i * bs:(i + 1) * bs] = block * bs + np.arange(bs, dtype=np.int32)
        self.blocks.append(block)

    def reserve(self, n_positions: int) -> None:
        """Blocks for positions up to n_positions (PoolExhausted if the pool cannot give them)."""
        if n_positions > self.pool.context:
            raise ValueError(f"{n_positions} positions exceed the context of {self.pool.context}")
        while self.capacity < n_positions:
            self._add(self.pool.allocate())

    def blocks_needed(self, n_positions: int) -> int:
        """Blocks reserve(n_positions) would take from the pool."""
        bs = self.pool.block_size
        return max(0, -(-n_positions // bs) - len(self.blocks))

    def written(self, ids: list[int]) -> None:
        """The keys and values of `ids` were stored at the next positions: publish the blocks
        they completed."""
        self.ids.extend(ids)
        bs = self.pool.block_size
        while len(self.keys) < len(self.ids) // bs:
            i = len(self.keys)
            key = (self.keys[-1] if self.keys else None, tuple(self.ids[i * bs:(i + 1) * bs]))
            self.pool.publish(self.blocks[i], key)
            self.keys.append(key)

    def truncate(self, n: int) -> None:
        """Keep positions < n. A kept partial block that is shared or published is copied first:
        its later slots are about to be overwritten."""
        bs = self.pool.block_size
        cut = n < self.length
        keep_blocks = -(-min(n, self.length) // bs)
        for block in self.blocks[keep_blocks:]:  # reserved ones past the written positions too
            self.pool.release(block)
        del self.blocks[keep_blocks:]
        del self.ids[n:]
        del self.keys[n // bs:]
        if cut and n % bs:
            last = self.blocks[-1]
            if self.pool.refs[last] > 1 or last in self.pool.key_of:
                fresh = self.pool.allocate()
                src, dst = slice(last * bs, last * bs + n % bs), slice(fresh * bs, fresh * bs + n % bs)
                self.pool.k[:, dst] = self.pool.k[:, src]
                self.pool.v[:, dst] = self.pool.v[:, src]
                self.pool.release(last)
                self.blocks.pop()
                self._add(fresh)

    def match(self, ids: list[int]) -> int:
        """Make the sequence hold the longest prefix of ids it can without computing anything:
        what it holds already, then the pool's published blocks. Returns that prefix's length,
        always < len(ids), so the last token runs and gives its logits."""
        common = 0
        limit = min(len(ids) - 1, self.length)
        while common < limit and ids[common] == self.ids[common]:
            common += 1
        self.truncate(max(common, 0))
        bs = self.pool.block_size
        while self.length % bs == 0 and self.length + bs < len(ids):
            key = (self.keys[-1] if self.keys else None, tuple(ids[self.length:self.length + bs]))
            block = self.pool.lookup(key)
            if block is None:
                break
            self.pool.hold(block)
            self._add(block)
            self.ids.extend(key[1])
            self.keys.append(key)
        return self.length

    def free(self) -> None:
        """Give every block back to the pool (published ones stay cached)."""
        self.truncate(0)
