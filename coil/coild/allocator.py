"""The node's blocks and addresses in memory (bitmaps), backed by etcd.

Once the node holds a block with room, an allocation costs one guarded etcd
transaction. The in-memory state is a cache of what etcd says the node
holds: every change is written to etcd first (guarded), and a lost guard
means the cache was stale, so the block is reloaded or dropped.

Invariants (docs/design.md, "The allocator's cache"):

- One container at a time: ``allocate`` calls of one container ID run one
  after the other (the CNI service also runs whole requests of a container
  one at a time, its DEL's ``release_address`` included); a retried
  ``allocate`` returns the address the attachment already holds. An
  attachment is what the record fields ``origin``/``network``/``ifname``
  name (``Address.of_attachment``): one container may hold several (CNI
  attachments of two networks or two ifnames, and REST addresses), each
  with its own addresses.
- Unknown outcomes are read back: when etcd may or may not have committed a
  write (``OutcomeUnknown``), the key is read back and its record (which
  names the container, or the node for a block) decides. An address write
  is read back by a fence (``IPAMStore.fence_address``): one transaction
  that moves the block key's mod revision on and reads the address key, so
  the write, if it still waits at an etcd member, can never commit later.
  The fence's new revision becomes the cached block's revision. When the
  fence fails too, the slot stays reserved ("quarantined") until a later
  fence answers: the container's next request (ADD, DEL and CHECK all
  resolve first; a DEL that cannot answers "try again"), or the next
  reload. A reload keeps a quarantined slot while the block's revision is
  the one the write compared (it could still commit).
- A reload never loses a change made while it runs: changes to the cache
  between the start of ``load()`` and its swap are journaled and replayed on
  top of the fresh read. A block's route is removed only when the block
  really left the node in etcd.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from coil.bitmap import Bitmap
from coil.coild.groupcommit import GroupCommit
from coil.coild.serial import KeyedLocks
from coil.errors import (AlreadyExists, BlockLost, Conflict, InvalidArgument, OutcomeUnknown,
                         StoreUnavailable)
from coil.store.model import MAX_TXN_ITEMS, ORIGIN_CNI, ORIGIN_REST, Address, Block, IPAMStore

#: a batched address write that did not commit: the caller writes alone
_ALONE = object()
log = logging.getLogger("coild.allocator")

#: reserve-and-write rounds of one allocation before it gives up with Conflict
#: (each lost round is a race with another writer or a block taken away)
ALLOCATE_ATTEMPTS = 64


@dataclass
class HeldBlock:
    block: Block
    bitmap: Bitmap
    records: dict = field(default_factory=dict)     # offset -> Address
    pending: set = field(default_factory=set)       # offsets reserved, etcd write in flight
    quarantine: dict = field(default_factory=dict)  # offset -> container id, outcome unknown
    # the acquisition this copy belongs to: a load that carries reservations
    # over into a fresh copy gives it the old copy's lineage (``_both``)
    lineage: object = field(default_factory=object, compare=False, repr=False)

    @property
    def version(self) -> int:
        return self.block.network.version

    def full(self) -> bool:
        return self.bitmap.count() >= self.bitmap.size


def attachment_matcher(extra: dict | None):
    """The records an ``allocate`` with record fields ``extra`` is
    idempotent against: a CNI ADD's (``origin`` cni) those of its
    attachment (network, ifname), a REST ``POST /ip``'s the REST ones;
    without an origin (coild's own callers, tests) those of ``ifname``
    (default eth0) of any kind."""
    extra = extra or {}
    origin = extra.get("origin", "")
    ifname = extra.get("ifname", "eth0")
    if origin == ORIGIN_CNI:
        network = extra.get("network", "")
        return lambda rec: rec.of_attachment(network, ifname)
    if origin == ORIGIN_REST:
        return Address.of_rest
    return lambda rec: rec.ifname == ifname


class NodeAllocator:
    """Addresses for the containers of one node.

    ``on_block_added(block)`` / ``on_block_removed(block)`` are called
    (outside the cache lock, one at a time) so that the route exporter
    follows the node's blocks. Thread-safe.
    """

    def __init__(self, store: IPAMStore, node: str, on_block_added=None, on_block_removed=None):
        self.store = store
        self.node = node
        self._lock = threading.RLock()
        self._blocks: dict[str, HeldBlock] = {}          # cidr -> HeldBlock
        self._by_container: dict[str, list[Address]] = {}  # container id -> its records
        self._block_locks: dict[tuple, threading.Lock] = {}
        self._containers = KeyedLocks()
        self._load_lock = threading.Lock()                # one load() at a time
        self._journal: list | None = None                 # cache changes during a load()
        self._limbo: dict[str, Block] = {}                # release_block outcome unknown
        self._route_lock = threading.Lock()
        self._needs_reload = False     # an unknown block acquisition not yet read back
        self._on_added = on_block_added or (lambda b: None)
        self._on_removed = on_block_removed or (lambda b: None)
        # releases that arrive while one is in flight go out together
        self._releases = GroupCommit(self._commit_releases, max_batch=MAX_TXN_ITEMS)
        self._assigns = GroupCommit(self._commit_assigns, max_batch=MAX_TXN_ITEMS // 2)

    def group_commits(self) -> dict:
        """kind -> GroupCommit of the address writes ("assign", "release"),
        for their counters (batches, items)."""
        return {"assign": self._assigns, "release": self._releases}

    def _reached(self, point: str):
        """A no-op pause point; tests monkeypatch it to stop a thread here."""

    # -- cache changes (all under self._lock; journaled while a load runs) -----
    def _note(self, *entry):
        if self._journal is not None:
            self._journal.append(entry)

    def _cache_record(self, rec: Address):
        held = self._blocks.get(rec.block)
        if held is not None:
            held.bitmap.set(rec.offset)
            held.records[rec.offset] = rec
            held.quarantine.pop(rec.offset, None)
        recs = self._by_container.setdefault(rec.container_id, [])
        recs[:] = [r for r in recs if (r.block, r.offset) != (rec.block, rec.offset)]
        recs.append(rec)
        self._note("rec+", rec)

    def _forget_record(self, rec: Address):
        held = self._blocks.get(rec.block)
        if held is not None and held.records.get(rec.offset) == rec:
            del held.records[rec.offset]
            if rec.offset not in held.pending and rec.offset not in held.quarantine:
                held.bitmap.free(rec.offset)
        recs = self._by_container.get(rec.container_id)
        if recs is not None and rec in recs:
            recs.remove(rec)
            if not recs:
                del self._by_container[rec.container_id]
        self._note("rec-", rec)

    def _both(self, held: HeldBlock) -> list[HeldBlock]:
        """``held`` and, when a load replaced it meanwhile and carried its
        reservations over, its successor. By lineage, not by revision: a
        fence may have moved one copy's revision on and not the other's
        (the hammer found a reservation that stayed in the successor for
        good that way, and its block was never given back)."""
        cur = self._blocks.get(held.block.cidr)
        if cur is None or cur is held or cur.lineage is not held.lineage:
            return [held]
        return [held, cur]

    def _settle(self, held: HeldBlock, offset: int, keep: bool):
        """End a reservation made in ``held`` (which a load may have replaced)."""
        for h in self._both(held):
            h.pending.discard(offset)
            if not keep and offset not in h.records and offset not in h.quarantine:
                h.bitmap.free(offset)

    def _moved(self, held: HeldBlock, block: Block, fenced: bool, now: Block | None):
        """A fence of ``block`` answered: etcd holds ``now`` (None: free).
        ``fenced``: this fence moved the revision on from ``block.revision``,
        which the cache adopts (a later assignment compares the new one)."""
        if now is None or now.node != self.node:
            self._needs_reload = True        # not ours any more: a reload drops it
            return
        cur = self._blocks.get(block.cidr)
        if fenced:
            for h in {id(h): h for h in (held, cur) if h is not None}.values():
                if h.block.cidr == block.cidr and h.block.revision == block.revision:
                    h.block = now
            self._note("rev", block.cidr, block.revision, now)
        elif cur is None or cur.block.revision != now.revision:
            # changed by a write the cache does not know (e.g. an earlier
            # fence whose outcome was unknown): a reload reads it
            self._needs_reload = True

    def _fence(self, held: HeldBlock, block: Block, offset: int) -> tuple:
        """Read back an address write of unknown outcome that compared
        ``block.revision``, fencing it off for good: (record or None,
        fenced, the block now). The caller updates the cache (``_moved``).
        Raises StoreUnavailable."""
        fenced, rec, now = self.store.fence_address(block, offset)
        log.info("address write fenced", extra={"block": block.cidr, "offset": offset,
                                                "revision": now.revision if now else None})
        return rec, fenced, now

    def _quarantine(self, held: HeldBlock, offset: int, container_id: str):
        for h in self._both(held):
            h.pending.discard(offset)
            h.bitmap.set(offset)
            h.quarantine[offset] = container_id
        self._note("quar", held.block.cidr, offset, container_id)

    # -- state ----------------------------------------------------------------
    def load(self):
        """(Re)load the node's blocks and addresses from etcd. Safe to repeat,
        safe to run while requests change the cache: their changes are
        replayed on top of the fresh read. Raises StoreUnavailable."""
        with self._load_lock:
            try:
                self._resolve_quarantine(None)
            except StoreUnavailable:
                pass            # they stay quarantined; the read below likely fails too
            with self._lock:
                self._journal = []
            try:
                fresh = {}
                for b in self.store.node_blocks(self.node):
                    held = HeldBlock(b, Bitmap(b.size))
                    for rec in self.store.block_addresses(b.cidr):
                        held.bitmap.set(rec.offset)
                        held.records[rec.offset] = rec
                    fresh[b.cidr] = held
                self._reached("load:read")
            except BaseException:
                with self._lock:
                    self._journal = None
                raise
            with self._lock:
                journal, self._journal = self._journal, None
                limbo_before = dict(self._limbo)
                for entry in journal:
                    self._replay(fresh, entry)
                old = self._blocks
                for cidr, held in fresh.items():
                    prev = old.get(cidr)
                    if prev is not None and prev.block.revision == held.block.revision:
                        held.lineage = prev.lineage     # the same acquisition
                        for off in prev.pending:        # in flight: keep reserved
                            held.bitmap.set(off)
                            held.pending.add(off)
                        # unknown writes that compared this revision could still
                        # commit: only a fence resolves them
                        for off, cid in prev.quarantine.items():
                            if off not in held.records:
                                held.bitmap.set(off)
                                held.quarantine[off] = cid
                removed = [h.block for c, h in old.items() if c not in fresh]
                removed += [b for c, b in limbo_before.items()
                            if c not in fresh and self._limbo.get(c) is b]
                for c, b in limbo_before.items():      # resolved by this read
                    if self._limbo.get(c) is b:
                        del self._limbo[c]
                added = [h.block for c, h in fresh.items() if c not in old]
                self._blocks = fresh
                self._reindex()
                self._needs_reload = False
        for b in removed:
            self._remove_route(b)
        for b in added:
            with self._route_lock:
                self._on_added(b)

    def _replay(self, fresh: dict, entry: tuple):
        kind = entry[0]
        if kind == "rec+":
            rec = entry[1]
            held = fresh.get(rec.block)
            if held is not None:
                held.bitmap.set(rec.offset)
                held.records[rec.offset] = rec
                held.quarantine.pop(rec.offset, None)
        elif kind == "rec-":
            rec = entry[1]
            held = fresh.get(rec.block)
            if held is not None and held.records.get(rec.offset) == rec:
                del held.records[rec.offset]
                if rec.offset not in held.quarantine:
                    held.bitmap.free(rec.offset)
        elif kind == "blk+":
            held = entry[1]
            if held.block.cidr not in fresh:
                fresh[held.block.cidr] = held
        elif kind == "blk-":
            block = entry[1]
            cur = fresh.get(block.cidr)
            if cur is not None and cur.block.revision == block.revision:
                del fresh[block.cidr]
        elif kind == "quar":
            _, cidr, offset, cid = entry
            held = fresh.get(cidr)
            if held is not None and offset not in held.records:
                held.bitmap.set(offset)
                held.quarantine[offset] = cid
        elif kind == "rev":
            _, cidr, old_revision, now = entry
            held = fresh.get(cidr)
            if held is not None and held.block.revision == old_revision:
                held.block = now
        elif kind == "unq":
            _, cidr, offset = entry
            held = fresh.get(cidr)
            if held is not None and held.quarantine.pop(offset, None) is not None:
                if offset not in held.records:
                    held.bitmap.free(offset)

    def _reindex(self):
        index: dict[str, list[Address]] = {}
        for held in self._blocks.values():
            for rec in held.records.values():
                index.setdefault(rec.container_id, []).append(rec)
        self._by_container = index

    def _remove_route(self, block: Block):
        """Remove a block's route, unless the node holds that block (again)."""
        with self._route_lock:
            with self._lock:
                if block.cidr in self._blocks or block.cidr in self._limbo:
                    return
            self._on_removed(block)

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

    def unresolved(self) -> bool:
        """True while a write with an unknown outcome waits for a read
        (quarantined slot, block in limbo, block acquisition): coild then
        reloads soon instead of at the next scan."""
        with self._lock:
            return (self._needs_reload or bool(self._limbo)
                    or any(h.quarantine for h in self._blocks.values()))

    def quarantined(self) -> dict:
        """Slots whose write has an unknown outcome: {cidr: {offset: container id}}."""
        with self._lock:
            return {c: dict(h.quarantine) for c, h in self._blocks.items() if h.quarantine}

    def lookup(self, container_id: str) -> list[Address]:
        """Every address the container holds, of all its attachments."""
        with self._lock:
            return list(self._by_container.get(container_id, ()))

    def lookup_attachment(self, container_id: str, network: str | None,
                          ifname: str) -> list[Address]:
        """The addresses of one CNI attachment (``Address.of_attachment``)."""
        return [a for a in self.lookup(container_id) if a.of_attachment(network, ifname)]

    def lookup_pod(self, namespace: str, pod: str, container_id: str) -> list[Address]:
        return [a for a in self.lookup(container_id) if a.namespace == namespace and a.pod == pod]

    def records(self) -> list[Address]:
        with self._lock:
            return [r for h in self._blocks.values() for r in h.records.values()]

    def has_room(self, pool: str, version: int) -> bool:
        """Whether a held block of ``pool`` has a free IPv``version`` address."""
        with self._lock:
            return any(h.block.pool == pool and h.version == version and not h.full()
                       for h in self._blocks.values())

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

    def _resolve_quarantine(self, container_id: str | None):
        """Fence and read back the container's slots (None: every slot) whose
        write had an unknown outcome. Raises StoreUnavailable (the slots
        not resolved yet stay quarantined)."""
        with self._lock:
            slots = [(h, h.block, off, cid) for h in self._blocks.values()
                     for off, cid in h.quarantine.items()
                     if container_id is None or cid == container_id]
        for held, block, offset, cid in slots:
            rec, fenced, now = self._fence(held, block, offset)
            with self._lock:
                cur = self._blocks.get(block.cidr)
                if cur is not None and cur.quarantine.get(offset) == cid:
                    del cur.quarantine[offset]
                    self._note("unq", block.cidr, offset)
                    if rec is not None:
                        self._cache_record(rec)
                    elif offset not in cur.pending and offset not in cur.records:
                        cur.bitmap.free(offset)
                # else: resolved meanwhile (another fence, or a reload)
                self._moved(held, block, fenced, now)

    def resolve(self, container_id: str) -> list[Address]:
        """The container's addresses (all its attachments: the caller picks
        its own), after reading back (fencing) the container's slots whose
        write had an unknown outcome. DEL and CHECK call it first.
        Quarantined slots are kept per container, not per attachment: a
        DEL of one attachment also waits for a slot of another one of the
        same container to be decided, which is safe (never too early).
        Raises StoreUnavailable when a slot cannot be resolved now: the
        caller answers "try again" (a DEL that succeeded now would leave a
        record that may have committed behind)."""
        with self._containers.hold(container_id):
            self._resolve_quarantine(container_id)
            return self.lookup(container_id)

    def allocate(self, pool: str, version: int, namespace: str, pod: str, container_id: str,
                 extra: dict | None = None) -> Address:
        """Assign one IPv``version`` address of ``pool`` to the container.
        ``extra``: optional record fields (origin, network, ifname, ...).

        Idempotent per attachment: when the attachment that ``extra`` names
        (``attachment_matcher``) holds an address of that version already
        (same namespace and pod), that address is returned; another
        attachment of the same container gets an address of its own.
        Raises AlreadyExists when the attachment holds one for another
        pod, PoolExhausted, NotFound (pool), Conflict (the race for a free
        address lost ALLOCATE_ATTEMPTS times: try again; never reported as
        PoolExhausted), StoreUnavailable (also when the outcome of the write
        stayed unknown: the slot stays reserved and a retry resolves it).
        """
        if version not in (4, 6):
            raise InvalidArgument(f"invalid address version {version}")
        match = attachment_matcher(extra)
        with self._containers.hold(container_id):
            held_addr = self._held(container_id, version, namespace, pod, match)
            if held_addr is not None:
                return held_addr
            self._resolve_quarantine(container_id)
            held_addr = self._held(container_id, version, namespace, pod, match)
            if held_addr is not None:
                return held_addr
            return self._allocate(pool, version, namespace, pod, container_id, extra)

    def _held(self, container_id, version, namespace, pod, match) -> Address | None:
        with self._lock:
            rec = next((r for r in self._by_container.get(container_id, ())
                        if r.version == version and match(r)), None)
        if rec is None:
            return None
        if rec.namespace != namespace or rec.pod != pod:
            raise AlreadyExists(f"container {container_id} already holds {rec.address} "
                                f"for pod {rec.namespace}/{rec.pod}")
        return rec

    def _allocate(self, pool, version, namespace, pod, container_id, extra=None) -> Address:
        for _ in range(ALLOCATE_ATTEMPTS):
            with self._lock:
                got = self._reserve(pool, version)
            if got is None:
                self._grow(pool, version)
                continue
            held, offset = got
            block = held.block     # the revision this write compares
            try:
                rec = self._assigns.submit((block, offset, namespace, pod, container_id,
                                            extra))
                if rec is _ALONE:     # its batch did not commit: this one on its own
                    rec = self.store.assign_address(block, offset, namespace, pod,
                                                    container_id, extra)
            except BlockLost:
                with self._lock:
                    self._settle(held, offset, keep=False)
                    cur = self._blocks.get(block.cidr)
                    moved = cur is not None and cur.block.revision != block.revision
                if not moved:     # else a fence (or reload) moved it on: retry with that
                    log.warning("block lost, reloading", extra={"block": block.cidr})
                    self.load()
                continue
            except OutcomeUnknown as exc:
                rec = self._read_back_assign(held, block, offset, container_id, exc)
                if rec is None or rec.container_id != container_id:
                    continue          # not committed (slot freed), or somebody else's
                return rec
            except BaseException:
                with self._lock:
                    self._settle(held, offset, keep=False)
                raise
            with self._lock:
                self._settle(held, offset, keep=True)
                if rec is None:      # taken behind our back (e.g. a stale cache): skip it
                    continue
                self._cache_record(rec)
            return rec
        raise Conflict(f"could not allocate from pool {pool!r}: lost the race for a free "
                       f"address {ALLOCATE_ATTEMPTS} times", hint="try again")

    def _read_back_assign(self, held: HeldBlock, block: Block, offset: int, container_id: str,
                          exc: OutcomeUnknown) -> Address | None:
        """Decide an address write whose outcome is unknown by fencing it."""
        cidr = block.cidr
        try:
            rec, fenced, now = self._fence(held, block, offset)
        except StoreUnavailable:
            with self._lock:
                self._quarantine(held, offset, container_id)
            log.warning("address write outcome unknown, slot quarantined",
                        extra={"block": cidr, "offset": offset, "container": container_id})
            raise exc from None
        with self._lock:
            self._settle(held, offset, keep=rec is not None)
            if rec is not None:
                self._cache_record(rec)
            self._moved(held, block, fenced, now)
        log.info("address write outcome resolved", extra={
            "block": cidr, "offset": offset, "committed": bool(rec and rec.container_id == container_id)})
        return rec

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
            try:
                block = self.store.acquire_block(pool, self.node, version)
            except OutcomeUnknown:
                # etcd may hold a new block of this node that the cache does not
                # know: a reload adopts it (and adds its route). If the reload
                # fails, the next successful one does.
                log.warning("block acquisition outcome unknown, reloading", extra={"pool": pool})
                with self._lock:
                    self._needs_reload = True
                self.load()
                return
            log.info("acquired block", extra={"pool": pool, "block": block.cidr})
            # Route first: an address of this block must never exist without its route.
            try:
                with self._route_lock:
                    self._on_added(block)
            except BaseException:
                self.store.release_block(block)
                raise
            with self._lock:
                held = HeldBlock(block, Bitmap(block.size))
                self._blocks[block.cidr] = held
                self._note("blk+", held)

    def release_address(self, rec: Address):
        """Delete the record in etcd, then from the cache. When the outcome
        is unknown the key is read back; if that fails too, the record stays
        cached (a retry frees it). Raises StoreUnavailable.

        No fence is needed here: the delete compares the record's own mod
        revision, so a delete that commits late (after the read-back said
        "not committed" and the DEL was retried) can only delete that very
        record. At worst the cache then keeps it until the next reload (the
        slot stays unused meanwhile); it never deletes a newer record of the
        same slot."""
        if not self._releases.submit(rec):
            self._release_one(rec)
        with self._lock:
            self._forget_record(rec)

    def _release_one(self, rec: Address):
        try:
            self.store.release_address(rec.block, rec.offset, rec.revision)
        except OutcomeUnknown:
            cur = self.store.get_address(rec.block, rec.offset)   # may raise: keep cached
            if cur is not None and cur.revision == rec.revision:
                raise                  # not committed: still held, the caller retries

    def _commit_assigns(self, items) -> list:
        """GroupCommit's commit for address writes: a lone item takes the
        one-record path (its result and errors are its caller's). A batch
        is one transaction, all or none, guarded as each write alone would
        be (each block's mod revision, each address key free). When a
        compare fails nothing was written and each caller writes on its own
        (``_ALONE``), which tells which slot was taken or which block moved;
        so does an item that the store refuses (InvalidArgument), so that
        its error reaches its own caller only. When the outcome is unknown
        every caller of the batch gets OutcomeUnknown and fences its own
        slot (``_read_back_assign``): the fence moves the block's revision
        on, so the batch, if it is still on its way, can never commit
        afterwards - as for a write alone."""
        if len(items) == 1:
            return [self.store.assign_address(*items[0])]
        self._reached("assign-batch")
        try:
            recs = self.store.assign_addresses(items)
        except InvalidArgument:
            # one item's own fault (a bad record field): nothing was sent;
            # alone, only its caller gets the error
            return [_ALONE] * len(items)
        return recs if recs is not None else [_ALONE] * len(items)

    def _commit_releases(self, recs: list[Address]) -> list[bool]:
        """GroupCommit's commit: True per record when it is released. A lone
        record takes the one-record path (its errors are its caller's). A
        batch is one transaction, all or none; when it fails or its outcome
        is unknown, each caller falls back to the one-record path: each
        delete compares its record's own revision, so a batch that commits
        late can only delete those very records, and a record it already
        deleted is simply not found again."""
        if len(recs) == 1:
            self._release_one(recs[0])
            return [True]
        if any(not r.revision for r in recs):     # each its own unguarded release
            return [False] * len(recs)
        self._reached("release-batch")
        try:
            ok = self.store.release_addresses([(r.block, r.offset, r.revision) for r in recs])
        except StoreUnavailable as exc:     # OutcomeUnknown included
            log.warning("batched release failed; releasing one by one",
                        extra={"addresses": len(recs), "error": exc.one_line()})
            ok = False
        return [ok] * len(recs)

    def return_empty_blocks(self) -> list[Block]:
        """Give back every block that holds no address. Returns them."""
        with self._lock:
            empty = [h for h in self._blocks.values()
                     if not h.records and not h.pending and not h.quarantine]
        returned = []
        for held in empty:
            block = held.block
            with self._lock:
                if held.records or held.pending or held.quarantine:
                    continue
                if self._blocks.get(block.cidr) is not held:
                    continue
                del self._blocks[block.cidr]
                self._note("blk-", block)
            try:
                released = self.store.release_block(block)
            except OutcomeUnknown:
                released = self._read_back_release(held)
                if released is None:
                    raise
                if not released:         # not committed: still ours
                    self._put_back(held)
                    continue
            except BaseException:
                self._put_back(held)        # still ours: keep using it
                raise
            if released:
                returned.append(block)
                self._remove_route(block)
            else:   # changed meanwhile: the reload tells what it is now
                log.warning("block not returned: changed", extra={"block": block.cidr})
                self._put_back(held)
                self.load()
        return returned

    def _put_back(self, held: HeldBlock):
        with self._lock:
            if held.block.cidr not in self._blocks:
                self._blocks[held.block.cidr] = held
                self._note("blk+", held)

    def _read_back_release(self, held: HeldBlock) -> bool | None:
        """Did a release_block whose outcome is unknown commit? None: unknown
        still (the block stays in limbo, route kept, until the next reload)."""
        block = held.block
        try:
            cur = self.store.get_block(block.pool, block.cidr)
        except StoreUnavailable:
            with self._lock:
                self._limbo[block.cidr] = block
            log.warning("block release outcome unknown", extra={"block": block.cidr})
            return None
        return not (cur is not None and cur.node == self.node and cur.revision == block.revision)
