"""Watch Nodes the way client-go's reflector does: list, then watch from the
list's resourceVersion; resume the watch from the last seen resourceVersion
after a dropped stream; relist on 410 Gone. Errors back off exponentially
with a log line each; nothing here ever gives up while the controller runs.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time

from coil import k8s
from coil.errors import CoilError, InvalidArgument

log = logging.getLogger("coil-controller.watch")


class Backoff:
    """Exponential backoff with jitter: initial, x2 per failure, capped."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, jitter: float = 0.2):
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self.maximum)
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self):
        self._next = self.initial


class WatchExpired(CoilError):
    """The watch's resourceVersion is too old (HTTP 410 Gone): relist."""


class WatchError(CoilError):
    """The server sent an ERROR event other than 410."""


def iter_pages(list_func, page_size: int = 500, request_timeout=k8s.REQUEST_TIMEOUT, **kwargs):
    """The pages of a paginated list call (``limit``/``continue``) as lists of
    raw dicts; after the last page, ``StopIteration.value`` is the list's
    resourceVersion. Only one page is in memory at a time. Any failure
    raises (a 410 Gone when the continue token expired: list again)."""
    token = None
    resource_version = ""
    while True:
        resp = list_func(limit=page_size, _continue=token, _preload_content=False,
                         _request_timeout=request_timeout, **kwargs)
        try:
            body = json.loads(resp.data)
        except ValueError:
            raise WatchError("the API server sent invalid JSON for a list") from None
        finally:
            resp.release_conn()
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise WatchError("the API server sent a list without items")
        meta = body.get("metadata") or {}
        resource_version = meta.get("resourceVersion", "") or resource_version
        token = meta.get("continue") or None
        yield body["items"]
        if not token:
            return resource_version


def list_all(list_func, page_size: int = 500, request_timeout=k8s.REQUEST_TIMEOUT, **kwargs):
    """All items of a paginated list call as raw dicts, and the list's
    resourceVersion. Any failure raises: a partial list is never returned."""
    items: list[dict] = []
    pages = iter_pages(list_func, page_size, request_timeout, **kwargs)
    while True:
        try:
            items.extend(next(pages))
        except StopIteration as done:
            return items, done.value or ""


def collect_pages(pages, fn) -> str:
    """Call ``fn(items)`` for every page of ``iter_pages``; returns the
    list's resourceVersion."""
    while True:
        try:
            fn(next(pages))
        except StopIteration as done:
            return done.value or ""


class NodeWatcher:
    """Calls ``on_sync(names)`` after every (re)list with the set of existing
    Node names, and ``on_deleted(name)`` for every deleted Node.

    Run ``run()`` in a thread; ``stop()`` ends it promptly.
    """

    def __init__(self, core, on_sync, on_deleted, *, stop_event: threading.Event | None = None,
                 metrics=None, backoff: Backoff | None = None, watch_timeout: int = 300,
                 page_size: int = 500):
        self.core = core
        self.on_sync = on_sync
        self.on_deleted = on_deleted
        self.stop_event = stop_event or threading.Event()
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.watch_timeout = watch_timeout
        self.page_size = page_size
        self.synced = threading.Event()      # set after the first successful list
        self.resource_version: str | None = None
        self._resp = None
        self._resp_lock = threading.Lock()

    # -- public -----------------------------------------------------------------
    def stop(self):
        self.stop_event.set()
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            try:
                if hasattr(resp, "shutdown"):
                    resp.shutdown()
                else:   # older urllib3: unblock the reading thread by hand
                    import socket
                    sock = getattr(getattr(resp, "connection", None), "sock", None)
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
            except Exception:   # noqa: BLE001 - best effort, the loop checks stop_event
                pass

    def run(self, resource_version: str | None = None):
        """Until stopped. ``resource_version``: resume a watch from there
        instead of starting with a list."""
        rv = resource_version
        while not self.stop_event.is_set():
            try:
                if rv is None:
                    names, rv = self.list_nodes()
                    self.resource_version = rv
                    log.info("listed nodes", extra={"nodes": len(names), "resource_version": rv})
                    self.synced.set()
                    self.on_sync(names)
                started = time.monotonic()
                rv = self.watch(rv)
                if time.monotonic() - started < 1.0 and not self.stop_event.is_set():
                    # the server ended the watch at once: do not spin
                    delay = self.backoff.next()
                    log.debug("node watch ended at once", extra={"retry_s": round(delay, 2)})
                    self.stop_event.wait(delay)
                else:
                    self.backoff.reset()
            except WatchExpired as exc:
                log.info("node watch expired, relisting", extra={"reason": str(exc)})
                self._count("expired")
                rv = None
            except WatchError as exc:
                delay = self.backoff.next()
                log.warning("node watch failed, relisting after backoff",
                            extra={"error": str(exc), "retry_s": round(delay, 2)})
                self._count("error")
                rv = None
                self.stop_event.wait(delay)
            except k8s.transient_errors() as exc:
                if self.stop_event.is_set():
                    break
                if rv is not None:      # resume after the last event handled
                    rv = self.resource_version or rv
                if k8s.is_api_exception(exc) and k8s.api_status(exc) == 410:
                    log.info("node list or watch expired (410 Gone), relisting")
                    self._count("expired")
                    rv = None
                    continue
                delay = self.backoff.next()
                what = "listing nodes" if rv is None else "watching nodes"
                log.warning(f"{what} failed; retrying", extra={
                    "error": k8s.describe(exc), "retry_s": round(delay, 2),
                    "resume_from": rv})
                self._count("error")
                if self.metrics is not None:
                    self.metrics.api_errors.labels("nodes").inc()
                self.stop_event.wait(delay)
        log.info("node watch stopped")

    # -- list and watch -----------------------------------------------------------
    def list_nodes(self) -> tuple[set[str], str]:
        """Names of all Nodes, listed in pages of ``page_size``: only the
        names are kept, so memory is one page plus one name per Node."""
        names = set()

        def keep_names(items):
            for item in items:
                name = (item.get("metadata") or {}).get("name")
                if isinstance(name, str) and name:
                    names.add(name)

        rv = collect_pages(iter_pages(self.core.list_node, self.page_size), keep_names)
        return names, rv

    def watch(self, rv: str) -> str:
        """Watch from ``rv`` until the server ends the stream; returns the last
        resourceVersion seen. Raises WatchExpired on 410."""
        from kubernetes.watch.watch import iter_resp_lines
        timeout = max(1, int(self.watch_timeout * random.uniform(0.9, 1.1)))
        resp = self.core.list_node(watch=True, resource_version=rv, allow_watch_bookmarks=True,
                                   timeout_seconds=timeout, _preload_content=False,
                                   _request_timeout=(k8s.REQUEST_TIMEOUT[0], timeout + 30))
        with self._resp_lock:
            self._resp = resp
        try:
            if self.stop_event.is_set():
                return rv
            for line in iter_resp_lines(resp):
                if not line.strip():
                    continue
                rv = self._handle(line, rv)
                self.resource_version = rv
                if self.stop_event.is_set():
                    break
        finally:
            with self._resp_lock:
                self._resp = None
            resp.release_conn()
        return rv

    def _handle(self, line: str, rv: str) -> str:
        try:
            event = json.loads(line)
            kind = event["type"]
            obj = event["object"]
        except (ValueError, KeyError, TypeError):
            raise WatchError(f"malformed watch event: {line[:200]!r}") from None
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message", "") if isinstance(obj, dict) else ""
            if code == 410:
                raise WatchExpired(message or "410 Gone")
            raise WatchError(f"watch error {code}: {message}")
        meta = obj.get("metadata") or {} if isinstance(obj, dict) else {}
        new_rv = meta.get("resourceVersion") or rv
        if kind == "DELETED":
            name = meta.get("name")
            log.info("node deleted", extra={"node": name})
            try:
                self.on_deleted(name)
            except InvalidArgument as exc:
                log.error("ignoring deleted node with an invalid name",
                          extra={"node": name, "error": exc.one_line()})
        return new_rv

    def _count(self, reason: str):
        if self.metrics is not None:
            self.metrics.watch_restarts.labels(reason).inc()
