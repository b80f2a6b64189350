"""Which pool serves a namespace, cached briefly.

A pod's ADD must not pay two etcd reads for a pool lookup; pools change
rarely, so the answer is cached for ``ttl`` seconds (a newly created
namespace pool is used at the latest ``ttl`` seconds after it appears).
"""

from __future__ import annotations

import threading
import time

from coil.store import IPAMStore


class PoolResolver:
    def __init__(self, store: IPAMStore, ttl: float = 2.0):
        self.store = store
        self.ttl = ttl
        self._cache: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def for_namespace(self, namespace: str) -> str:
        """Pool name for ``namespace``. Raises NotFound, StoreUnavailable."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(namespace)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        name = self.store.pool_for_namespace(namespace).name
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[namespace] = (now, name)
        return name

    def invalidate(self):
        with self._lock:
            self._cache.clear()
