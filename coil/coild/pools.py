"""Which pool serves a namespace, without an etcd read on the ADD path.

The pool names are kept in memory and refreshed in the background every
``refresh_interval`` seconds (2 s), so an ADD costs only its one address
transaction; a namespace pool created a moment ago is used by its
namespace's pods at the latest after one refresh. Only when no pool matches
at all (not even ``default``) is etcd asked at once, at most every
``min_sync_interval`` seconds. Without the background thread (tests, tools)
the names are re-read when older than ``refresh_interval``.
"""

from __future__ import annotations

import logging
import threading
import time

from coil.errors import CoilError, NotFound
from coil.store.model import DEFAULT_POOL

log = logging.getLogger("coild.pools")


class PoolResolver:
    def __init__(self, store, refresh_interval: float = 2.0, min_sync_interval: float = 0.5):
        self.store = store
        self.refresh_interval = refresh_interval
        self.min_sync_interval = min_sync_interval
        self._names: frozenset[str] | None = None
        self._refreshed_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0          # pool list reads started (one etcd Range each)

    def refresh(self) -> frozenset[str]:
        """Read the pool names from etcd. Raises StoreUnavailable."""
        self.reads += 1
        names = frozenset(p.name for p in self.store.list_pools())
        with self._lock:
            self._names = names
            self._refreshed_at = time.monotonic()
        return names

    def _pick(self, names, namespace: str) -> str | None:
        if namespace in names:
            return namespace
        if DEFAULT_POOL in names:
            return DEFAULT_POOL
        return None

    def for_namespace(self, namespace: str) -> str:
        """Pool name for ``namespace``: the pool named like it, else
        ``default``. Raises NotFound, StoreUnavailable."""
        with self._lock:
            names, age = self._names, time.monotonic() - self._refreshed_at
        refreshed = False
        if names is None or (age >= self.refresh_interval and not self._running()):
            names, refreshed = self.refresh(), True
        picked = self._pick(names, namespace)
        if picked is None and not refreshed and age >= self.min_sync_interval:
            picked = self._pick(self.refresh(), namespace)   # maybe created a moment ago
        if picked is None:
            raise NotFound(f"no pool for namespace {namespace!r}: neither pool {namespace!r} "
                           f"nor pool 'default' exists",
                           hint="create one with 'coilctl pool create default SUBNET SIZE'")
        return picked

    # -- background refresh ---------------------------------------------------
    def _running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self):
        """Refresh in a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._loop, name="pool-refresh", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh()
            except CoilError as exc:
                log.warning("refreshing pools failed", extra={"error": exc.one_line()})

    def stop(self):
        self._stop.set()
