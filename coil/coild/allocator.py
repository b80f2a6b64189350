"""The node's blocks and addresses in memory (bitmaps), backed by etcd.

Once the node holds a block with room, an allocation costs one guarded etcd
transaction. The in-memory state is a cache of what etcd says the node
holds: every change is written to etcd first (guarded), and a lost guard
means the cache was stale, so the block is reloaded or dropped.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass, field

from coil.bitmap import Bitmap
from coil.errors import AlreadyExists, InvalidArgument, NotFound, PoolExhausted
from coil.store.model import Address, Block, BlockLost, IPAMStore

log = logging.getLogger("coild.allocator")


@dataclass
class HeldBlock:
    block: Block
    bitmap: Bitmap
    records: dict = field(default_factory=dict)   # offset -> Address
    pending: set = field(default_factory=set)     # offsets reserved, etcd write in flight

    @property
    def version(self) -> int:
        return self.block.network.version

    def full(self) -> bool:
        return self.bitmap.count() >= self.bitmap.size


class NodeAllocator:
    """Addresses for the containers of one node.

    ``on_block_added(block)`` / ``on_block_removed(block)`` are called
    (outside the lock) so that the route exporter follows the node's blocks.
    Thread-safe.
    """

    def __init__(self, store: IPAMStore, node: str, on_block_added=None, on_block_removed=None):
        self.store = store
        self.node = node
        self._lock = threading.RLock()
        self._blocks: dict[str, HeldBlock] = {}          # cidr -> HeldBlock
        self._by_container: dict[str, dict[int, Address]] = {}  # container id -> {4|6: Address}
        self._block_locks: dict[tuple, threading.Lock] = {}
        self._on_added = on_block_added or (lambda b: None)
        self._on_removed = on_block_removed or (lambda b: None)

    # -- state ----------------------------------------------------------------
    def load(self):
        """(Re)load the node's blocks and addresses from etcd. Safe to repeat."""
        blocks = self.store.node_blocks(self.node)
        fresh = {}
        for b in blocks:
            held = HeldBlock(b, Bitmap(b.size))
            for rec in self.store.block_addresses(b.cidr):
                held.bitmap.set(rec.offset)
                held.records[rec.offset] = rec
            fresh[b.cidr] = held
        with self._lock:
            removed = [h.block for c, h in self._blocks.items() if c not in fresh]
            added = [h.block for c, h in fresh.items() if c not in self._blocks]
            for cidr, held in fresh.items():
                old = self._blocks.get(cidr)
                if old is not None and old.block.revision == held.block.revision:
                    for off in old.pending:        # keep in-flight reservations
                        held.bitmap.set(off)
                    held.pending = old.pending
            self._blocks = fresh
            self._reindex()
        for b in removed:
            self._on_removed(b)
        for b in added:
            self._on_added(b)

    def _reindex(self):
        index: dict[str, dict[int, Address]] = {}
        for held in self._blocks.values():
            for rec in held.records.values():
                index.setdefault(rec.container_id, {})[held.version] = rec
        self._by_container = index

    def blocks(self) -> list[Block]:
        with self._lock:
            return [h.block for h in self._blocks.values()]

    def snapshot(self) -> dict:
        """Blocks per pool and addresses per pod, for GET /status."""
        with self._lock:
            pools: dict[str, list[str]] = {}
            pods: dict[str, list[str]] = {}
            for h in self._blocks.values():
                pools.setdefault(h.block.pool, []).append(h.block.cidr)
                for rec in h.records.values():
                    pods.setdefault(f"{rec.namespace}/{rec.pod}", []).append(rec.address)
            return {"blocks": {p: sorted(v) for p, v in pools.items()},
                    "pods": {p: sorted(v) for p, v in pods.items()}}

    def count(self) -> int:
        with self._lock:
            return sum(len(h.records) for h in self._blocks.values())

    def lookup(self, container_id: str) -> list[Address]:
        with self._lock:
            return list(self._by_container.get(container_id, {}).values())

    def lookup_pod(self, namespace: str, pod: str, container_id: str) -> list[Address]:
        return [a for a in self.lookup(container_id) if a.namespace == namespace and a.pod == pod]

    def records(self) -> list[Address]:
        with self._lock:
            return [r for h in self._blocks.values() for r in h.records.values()]

    # -- allocation -----------------------------------------------------------
    def _reserve(self, pool: str, version: int):
        """Reserve a free offset in a held block of ``pool``; (held, offset) or None."""
        for held in self._blocks.values():
            if held.block.pool != pool or held.version != version or held.full():
                continue
            offset = held.bitmap.allocate()
            held.pending.add(offset)
            return held, offset
        return None

    def _unreserve(self, held: HeldBlock, offset: int, keep: bool):
        held.pending.discard(offset)
        if not keep:
            held.bitmap.free(offset)

    def allocate(self, pool: str, version: int, namespace: str, pod: str, container_id: str,
                 extra: dict | None = None) -> Address:
        """Assign one IPv``version`` address of ``pool`` to the container.
        ``extra``: optional record fields (origin, network, ifname, ...).

        Raises AlreadyExists when the container holds an address of that
        version already, PoolExhausted, NotFound (pool), StoreUnavailable.
        """
        if version not in (4, 6):
            raise InvalidArgument(f"invalid address version {version}")
        with self._lock:
            if version in self._by_container.get(container_id, {}):
                held_addr = self._by_container[container_id][version]
                raise AlreadyExists(f"container {container_id} already holds {held_addr.address}")
        for _ in range(64):
            with self._lock:
                got = self._reserve(pool, version)
            if got is None:
                self._grow(pool, version)
                continue
            held, offset = got
            try:
                rec = self.store.assign_address(held.block, offset, namespace, pod, container_id,
                                                extra)
            except BlockLost:
                log.warning("block lost, reloading", extra={"block": held.block.cidr})
                with self._lock:
                    self._unreserve(held, offset, keep=False)
                self.load()
                continue
            except BaseException:
                with self._lock:
                    self._unreserve(held, offset, keep=False)
                raise
            with self._lock:
                self._unreserve(held, offset, keep=True)
                if rec is None:      # taken behind our back (e.g. a stale cache): skip it
                    continue
                held.records[offset] = rec
                self._by_container.setdefault(container_id, {})[version] = rec
            return rec
        raise PoolExhausted(pool, f"could not allocate from pool {pool!r}: too many conflicts")

    def _grow(self, pool: str, version: int):
        """Take one more block of ``pool`` (serialised per pool and version)."""
        key = (pool, version)
        with self._lock:
            lock = self._block_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if any(h.block.pool == pool and h.version == version and not h.full()
                       for h in self._blocks.values()):
                    return       # another thread grew it meanwhile
            block = self.store.acquire_block(pool, self.node, version)
            log.info("acquired block", extra={"pool": pool, "block": block.cidr})
            # Route first: an address of this block must never exist without its route.
            try:
                self._on_added(block)
            except BaseException:
                self.store.release_block(block)
                raise
            with self._lock:
                self._blocks[block.cidr] = HeldBlock(block, Bitmap(block.size))

    def release(self, container_id: str) -> list[Address]:
        """Free every address of the container. Returns what was freed
        (empty when it held nothing). Safe to repeat."""
        freed = []
        for rec in self.lookup(container_id):
            self.release_address(rec)
            freed.append(rec)
        return freed

    def release_address(self, rec: Address):
        self.store.release_address(rec.block, rec.offset, rec.revision)
        with self._lock:
            held = self._blocks.get(rec.block)
            if held is not None and held.records.get(rec.offset) == rec:
                del held.records[rec.offset]
                held.bitmap.free(rec.offset)
            by = self._by_container.get(rec.container_id, {})
            version = ipaddress.ip_address(rec.address).version
            if by.get(version) == rec:
                del by[version]
                if not by:
                    del self._by_container[rec.container_id]

    def return_empty_blocks(self) -> list[Block]:
        """Give back every block that holds no address. Returns them."""
        with self._lock:
            empty = [h for h in self._blocks.values() if not h.records and not h.pending]
        returned = []
        for held in empty:
            with self._lock:
                if held.records or held.pending:
                    continue
                if self._blocks.get(held.block.cidr) is held:
                    del self._blocks[held.block.cidr]
            try:
                released = self.store.release_block(held.block)
            except BaseException:
                with self._lock:      # still ours: keep using it
                    self._blocks.setdefault(held.block.cidr, held)
                raise
            if released:
                returned.append(held.block)
                self._on_removed(held.block)
            else:   # changed meanwhile: the next load() tells what it is now
                log.warning("block not returned: changed", extra={"block": held.block.cidr})
                self.load()
        return returned

    def find(self, address: str) -> Address:
        with self._lock:
            for h in self._blocks.values():
                for rec in h.records.values():
                    if rec.address == address:
                        return rec
        raise NotFound(f"address {address} is not held on node {self.node!r}")
