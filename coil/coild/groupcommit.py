"""Group commit: requests that arrive while one etcd transaction is in
flight are committed together by the next one.

The first caller to find no transaction in flight becomes the leader: it
takes up to ``max_batch`` queued items (its own among them) and runs
``commit(items)``; the callers it took wait for its result. Callers that
arrive meanwhile queue, and when the leader is done one of them leads the
next batch. Nothing waits for a timer: a lone request is committed at once,
alone, so an idle node pays no latency, and a busy one sends one
transaction for many requests (coild's DEL releases under pod churn,
docs/design.md "The path of one DEL").
"""

from __future__ import annotations

import threading


class _Waiter:
    __slots__ = ("item", "done", "result", "error")

    def __init__(self, item):
        self.item = item
        self.done = False
        self.result = None
        self.error: BaseException | None = None


class GroupCommit:
    def __init__(self, commit, max_batch: int = 64):
        """``commit(items)`` returns one result per item, in order, or
        raises: then every caller of that batch gets the exception (each
        its own copy, ``_own``)."""
        self._commit = commit
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Waiter] = []
        self._busy = False
        self.batches = 0            # commit calls
        self.items = 0              # items committed through them

    def submit(self, item):
        """Commit ``item`` (alone or with others); returns its result."""
        me = _Waiter(item)
        with self._cond:
            self._queue.append(me)
            while True:
                if me.done:
                    break
                if not self._busy:
                    batch = self._queue[:self.max_batch]
                    del self._queue[:len(batch)]
                    self._busy = True
                    self._cond.release()
                    try:
                        self._lead(batch)
                    finally:
                        self._cond.acquire()
                        self._busy = False
                        self._cond.notify_all()
                    continue
                self._cond.wait()
        if me.error is not None:
            raise me.error
        return me.result

    @staticmethod
    def _own(exc: BaseException, first: bool) -> BaseException:
        """The exception one caller of a failed batch raises: the first
        gets the commit's own, each other a copy of it (same type, args and
        fields; ``__init__`` is not run again) whose ``__cause__`` is the
        original, so that threads raising it at once do not share one
        traceback and context. One that does not copy faithfully is
        shared."""
        if first:
            return exc
        cls = type(exc)
        try:
            own = cls.__new__(cls, *exc.args)
            own.args = exc.args
            own.__dict__.update(exc.__dict__)
        except Exception:
            return exc
        if type(own) is not cls or str(own) != str(exc):
            return exc
        own.__cause__ = exc
        return own

    def _lead(self, batch: list[_Waiter]):
        try:
            results = self._commit([w.item for w in batch])
            error = None
        except BaseException as exc:      # handed to every caller of the batch
            results, error = [None] * len(batch), exc
        with self._cond:
            self.batches += 1
            self.items += len(batch)
            for i, (w, result) in enumerate(zip(batch, results)):
                w.result, w.done = result, True
                w.error = None if error is None else self._own(error, i == 0)
