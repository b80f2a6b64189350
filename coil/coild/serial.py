"""One lock per key (a container ID), held only while somebody uses it.

coild runs the requests of one container one at a time and the requests of
different containers in parallel. The registry holds an entry only while a
request holds or waits for it, so it never grows beyond the number of
requests in flight.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager


class KeyedLocks:
    """``with locks.hold(key, timeout=None):`` runs the block alone for ``key``.

    ``hold`` raises TimeoutError when the lock was not had within
    ``timeout`` seconds (None: wait for ever). Thread-safe.
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._entries: dict = {}          # key -> [Lock, holders and waiters]

    @contextmanager
    def hold(self, key, timeout: float | None = None):
        with self._mutex:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
                raise TimeoutError(f"lock for {key!r} not free within {timeout:g} s")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._mutex:
            return len(self._entries)
