"""Free the address blocks of Nodes that are gone for good.

Work arrives from the node watcher: a deleted Node's name, or the full set
of existing Node names after a (re)list (blocks of any other node are then
orphans, e.g. of nodes deleted while the controller was down). Work that
fails (etcd or the API unreachable) stays queued and is retried with backoff.

A node's blocks are freed only when BOTH hold:

- the Node object has been gone (GET answers 404) for the grace period,
  counted from the first time this controller saw it gone; a Node that is
  there again at any look keeps everything and the count starts over;
- the node's liveness record ``node-alive/<node>`` is absent: the lease its
  coild renews has expired.

Both are checked again right before the release, and each block is freed
with its addresses in one transaction guarded by the block's mod revision
and by the absence of the liveness record, so a coild that comes back in
between wins. A node gone but with a live coild is looked at again every
``recheck`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from coil import k8s
from coil.controller.watcher import Backoff
from coil.errors import CoilError
from coil.store import liveness
from coil.store.model import validate_node_name

log = logging.getLogger("coil-controller.nodes")

MAX_ATTEMPTS_PER_NODE = 8
DEFAULT_GRACE = 300.0
MIN_GRACE = 60.0
DEFAULT_RECHECK = 30.0


class NodeJanitor:
    """``clock`` (monotonic seconds) is injectable: tests pass a fake one
    and call ``wake()`` after moving it."""

    def __init__(self, store, core, *, stop_event: threading.Event | None = None,
                 metrics=None, backoff: Backoff | None = None, grace: float = DEFAULT_GRACE,
                 recheck: float = DEFAULT_RECHECK, clock=time.monotonic):
        self.store = store
        self.core = core
        self.stop_event = stop_event or threading.Event()
        self.metrics = metrics
        self.backoff = backoff or Backoff(0.5, 30.0)
        self.grace = grace
        self.recheck = recheck
        self.clock = clock
        self._cond = threading.Condition()
        self._due: dict[str, float] = {}         # node -> when to look at it (clock)
        self._sync: set[str] | None = None
        self._gone_since: dict[str, float] = {}  # node -> first seen gone (clock)
        self._alive_logged: set[str] = set()
        self.idle = threading.Event()     # set while nothing is due (tests)
        self.idle.set()

    # -- input (from the watcher thread) -------------------------------------------
    def node_deleted(self, name):
        validate_node_name(name)          # InvalidArgument: logged by the watcher
        with self._cond:
            now = self.clock()
            self._due[name] = min(self._due.get(name, now), now)
            if name in self._gone_since:  # it was back in between: the grace starts again
                self._gone_since[name] = now
            self.idle.clear()
            self._cond.notify()

    def nodes_synced(self, names: set[str]):
        with self._cond:
            self._sync = set(names)
            self.idle.clear()
            self._cond.notify()

    def wake(self):
        with self._cond:
            self._cond.notify_all()

    def waiting(self) -> dict[str, float]:
        """Nodes seen gone whose blocks are kept for now -> since (clock)."""
        with self._cond:
            return dict(self._gone_since)

    # -- worker -------------------------------------------------------------------
    def _next_wait(self) -> float | None:
        """Seconds until something is due (0: now), None when nothing is queued."""
        if self._sync is not None:
            return 0.0
        if not self._due:
            return None
        return max(0.0, min(self._due.values()) - self.clock())

    def run(self):
        while not self.stop_event.is_set():
            with self._cond:
                while not self.stop_event.is_set():
                    wait = self._next_wait()
                    if wait == 0.0:
                        break
                    self.idle.set()
                    # a fake clock does not wake us: look at it at least every second
                    self._cond.wait(1.0 if wait is None else min(wait, 1.0))
                self.idle.clear()
            if self.stop_event.is_set():
                break
            if self.process():
                delay = self.backoff.next()
                log.info("retrying node cleanup later", extra={"retry_s": round(delay, 2)})
                self.stop_event.wait(delay)
            else:
                self.backoff.reset()
        log.info("node cleanup stopped")

    def process(self) -> bool:
        """One pass over the work that is due. Returns True when some of it
        failed (it stays queued)."""
        with self._cond:
            sync, self._sync = self._sync, None
        failed = False
        if sync is not None:
            try:
                orphans = self.orphans(sync)
            except CoilError as exc:
                failed = True
                self._store_error("reading blocks", exc)
                with self._cond:
                    if self._sync is None:
                        self._sync = sync        # retry this sync later
            else:
                if orphans:
                    log.info("blocks of nodes that no longer exist",
                             extra={"nodes": sorted(orphans)})
                with self._cond:
                    now = self.clock()
                    for name in orphans:
                        self._due[name] = min(self._due.get(name, now), now)
        with self._cond:
            now = self.clock()
            due = sorted(n for n, t in self._due.items() if t <= now)
        for name in due:
            if self.stop_event.is_set():
                break
            try:
                _freed, again = self.check_node(name)
            except CoilError as exc:
                failed = True
                self._store_error(f"freeing blocks of node {name}", exc)
                continue
            except k8s.transient_errors() as exc:
                failed = True
                if self.metrics is not None:
                    self.metrics.api_errors.labels("nodes").inc()
                log.warning("cannot confirm that a node is gone; will retry", extra={
                    "node": name, "error": k8s.describe(exc)})
                continue
            with self._cond:
                if again is None:
                    self._due.pop(name, None)
                else:
                    self._due[name] = again
        if self.metrics is not None:
            with self._cond:
                self.metrics.nodes_waiting.set(len(self._gone_since))
        return failed

    def _store_error(self, what, exc):
        if self.metrics is not None:
            self.metrics.store_errors.labels("node-cleanup").inc()
        log.warning(f"{what} failed; will retry", extra={"error": exc.one_line()})

    def orphans(self, existing: set[str]) -> set[str]:
        """Nodes holding blocks in etcd that are not in ``existing``."""
        blocks = self.store.all_blocks()
        if self.metrics is not None:
            self.metrics.set_blocks(blocks)
        return {b.node for b in blocks} - set(existing)

    def node_exists(self, name: str) -> bool:
        """GET the Node. Raises the client's exception unless it is a 404."""
        try:
            resp = self.core.read_node(name, _preload_content=False,
                                       _request_timeout=k8s.REQUEST_TIMEOUT)
            resp.release_conn()
            return True
        except k8s.transient_errors() as exc:
            if k8s.is_api_exception(exc) and k8s.api_status(exc) == 404:
                return False
            raise

    def free_node(self, name: str) -> int:
        """``check_node`` for callers that only want the count of blocks freed."""
        return self.check_node(name)[0]

    def _forget(self, name: str):
        with self._cond:
            self._gone_since.pop(name, None)
        self._alive_logged.discard(name)

    def check_node(self, name: str) -> tuple[int, float | None]:
        """Look at a node and free its blocks if it is gone for good.

        Returns (blocks freed, when to look again: a ``clock`` time, or None
        when there is nothing left to do). Raises InvalidArgument (name),
        CoilError (etcd) or the client's errors (API)."""
        validate_node_name(name)
        blocks = self.store.node_blocks(name)
        if not blocks:
            self._forget(name)
            return 0, None
        if self.node_exists(name):
            if name in self._gone_since:
                log.info("node is back; its blocks are kept", extra={"node": name})
            else:
                log.info("node exists; its blocks are kept", extra={"node": name})
            self._forget(name)
            return 0, None
        now = self.clock()
        with self._cond:
            since = self._gone_since.setdefault(name, now)
        if now - since < self.grace:
            if since == now:
                log.info("node is gone; its blocks are kept for the grace period", extra={
                    "node": name, "blocks": len(blocks), "grace_s": self.grace})
            return 0, since + self.grace
        if liveness.read(self.store.etcd, name) is not None:
            if name not in self._alive_logged:
                self._alive_logged.add(name)
                log.warning("node object is gone but its coild is alive; blocks are kept",
                            extra={"node": name, "blocks": len(blocks)})
            return 0, now + self.recheck
        freed = self._free_blocks(name, blocks)
        if freed is None:                 # coild came back or the Node did
            return 0, self.clock() + self.recheck
        self._forget(name)
        return freed, None

    def _free_blocks(self, name: str, blocks) -> int | None:
        """The guarded release. None when the node turned out alive."""
        freed = 0
        freed_blocks = []
        for attempt in range(MAX_ATTEMPTS_PER_NODE):
            if attempt:
                blocks = self.store.node_blocks(name)
                if not blocks:
                    break
            # the last look, right before the transactions
            if self.node_exists(name):
                log.info("node is back; its blocks are kept", extra={"node": name})
                self._forget(name)
                return None
            if liveness.read(self.store.etcd, name) is not None:
                log.info("coild of a gone node is back; its blocks are kept",
                         extra={"node": name})
                return None
            lost_race = False
            for block in blocks:
                count = self.store.count_addresses(block.cidr)
                if self.store.free_block(block):
                    freed += 1
                    freed_blocks.append(block)
                    if self.metrics is not None:
                        self.metrics.blocks_freed.inc()
                        self.metrics.addresses_freed.inc(count)
                    log.info("freed block of deleted node", extra={
                        "node": name, "pool": block.pool, "block": block.cidr,
                        "addresses": count})
                else:
                    lost_race = True
                    break
            if not lost_race:
                break
        else:
            raise CoilError(f"blocks of node {name} kept changing while being freed")
        if freed:
            if self.metrics is not None:
                self.metrics.nodes_cleaned.inc()
                self.metrics.blocks_released(freed_blocks)
            log.info("freed blocks of deleted node", extra={"node": name, "blocks": freed})
        return freed
