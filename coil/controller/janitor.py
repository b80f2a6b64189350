"""Free the address blocks of deleted Nodes.

Work arrives from the node watcher: a deleted Node's name, or the full set
of existing Node names after a (re)list (blocks of any other node are then
orphans, e.g. of nodes deleted while the controller was down). Work that
fails (etcd or the API unreachable) stays queued and is retried with backoff.

Before freeing anything the Node's absence is confirmed with a direct GET
(404), so a node that registered after a list, or that was re-created under
the same name, keeps its blocks. Each block is freed with its addresses in
one transaction guarded by the block's mod revision.
"""

from __future__ import annotations

import logging
import threading

from coil import k8s
from coil.controller.watcher import Backoff
from coil.errors import CoilError
from coil.store.model import validate_node_name

log = logging.getLogger("coil-controller.nodes")

MAX_ATTEMPTS_PER_NODE = 8


class NodeJanitor:
    def __init__(self, store, core, *, stop_event: threading.Event | None = None,
                 metrics=None, backoff: Backoff | None = None):
        self.store = store
        self.core = core
        self.stop_event = stop_event or threading.Event()
        self.metrics = metrics
        self.backoff = backoff or Backoff(0.5, 30.0)
        self._cond = threading.Condition()
        self._pending: set[str] = set()
        self._sync: set[str] | None = None
        self.idle = threading.Event()     # set while there is nothing to do (tests)
        self.idle.set()

    # -- input (from the watcher thread) -------------------------------------------
    def node_deleted(self, name):
        validate_node_name(name)          # InvalidArgument: logged by the watcher
        with self._cond:
            self._pending.add(name)
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

    # -- worker -------------------------------------------------------------------
    def run(self):
        while not self.stop_event.is_set():
            with self._cond:
                while not self._pending and self._sync is None and not self.stop_event.is_set():
                    self.idle.set()
                    self._cond.wait(1.0)
                sync, self._sync = self._sync, None
                pending = sorted(self._pending)
            if self.stop_event.is_set():
                break
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
                        self._pending |= orphans
                        pending = sorted(self._pending)
            for name in pending:
                if self.stop_event.is_set():
                    break
                try:
                    self.free_node(name)
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
                    self._pending.discard(name)
            if failed:
                delay = self.backoff.next()
                log.info("retrying node cleanup later", extra={"retry_s": round(delay, 2)})
                self.stop_event.wait(delay)
            else:
                self.backoff.reset()
        log.info("node cleanup stopped")

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
        """Free every block of ``name`` if the Node does not exist. Returns the
        number of blocks freed. Raises CoilError (etcd) or the client's errors."""
        validate_node_name(name)
        freed = 0
        for _attempt in range(MAX_ATTEMPTS_PER_NODE):
            blocks = self.store.node_blocks(name)
            if not blocks:
                break
            if self.node_exists(name):
                log.info("node exists (again); its blocks are kept", extra={"node": name})
                return freed
            lost_race = False
            for block in blocks:
                count = self.store.count_addresses(block.cidr)
                if self.store.free_block(block):
                    freed += 1
                    if self.metrics is not None:
                        self.metrics.blocks_freed.inc()
                        self.metrics.addresses_freed.inc(count)
                    log.info("freed block of deleted node", extra={
                        "node": name, "pool": block.pool, "block": block.cidr,
                        "addresses": count})
                else:
                    lost_race = True
            if not lost_race:
                break
        else:
            raise CoilError(f"blocks of node {name} kept changing while being freed")
        if freed:
            if self.metrics is not None:
                self.metrics.nodes_cleaned.inc()
                try:
                    self.metrics.set_blocks(self.store.all_blocks())
                except CoilError:
                    pass
            log.info("freed blocks of deleted node", extra={"node": name, "blocks": freed})
        return freed
