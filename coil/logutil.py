"""Structured logs: one JSON object per line on stderr.

Most lines are written when they are logged. The per-request lines of a
busy daemon (coild's one line per CNI ADD and DEL) are *deferred*: logged
with ``extra={DEFER: True}``, they are formatted in the caller's thread,
queued, and written by one writer thread in a batch at most ``delay``
seconds later, as a web server's buffered access log does. Under pod churn a
line written by the request thread itself cost coild ~0.17 ms of CPU (the
handler's lock and the stream's, and the write, each a GIL hand-over among
the request threads); deferring them raised coild's churn rate by ~9 %
(docs/benchmarks.md). A deferred line costs its formatting only.

Order is kept: any line that is not deferred first writes the queued ones
(in the caller's thread), and so do ``flush()`` and ``close()`` (which
``logging.shutdown()`` calls at exit). A process killed with SIGKILL loses
at most the last ``delay`` seconds of deferred lines; warnings and errors
are never deferred.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

#: ``extra`` key that marks a record as deferrable (not part of the output:
#: keys that start with "_" are not written)
DEFER = "_defer"

#: how long a deferred line may wait to be written
DEFER_DELAY = 0.05

#: deferred lines queued at most; one more is written by its caller with
#: them (a stream that blocks - a full pipe - blocks the callers as before,
#: instead of the queue growing without bound)
DEFER_MAX = 10000

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self._stamp = (-1, "")          # (second, its text): one object, so threads agree

    def _ts(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        cached, text = self._stamp
        if second != cached:            # strftime once per second, not per line
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._stamp = (second, text)
        return f"{text}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": self._ts(record),
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class LineHandler(logging.Handler):
    """Writes each record as one line to ``stream``; records logged with
    ``extra={DEFER: True}`` are written by a writer thread within ``delay``
    seconds, in order with all others (see the module's docstring)."""

    def __init__(self, stream=None, delay: float = DEFER_DELAY, max_queued: int = DEFER_MAX):
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.delay = delay
        self.max_queued = max_queued
        self._queued: list[str] = []      # formatted deferred lines, oldest first
        self._qlock = threading.Lock()    # guards _queued and _writer; never held for I/O
        self._wlock = threading.Lock()    # one writer of the stream at a time
        self._wake = threading.Event()    # set: deferred lines are queued
        self._stop = threading.Event()    # set: closed, the writer ends
        self._writer: threading.Thread | None = None
        self._closed = False

    def createLock(self):
        # handle() below takes no handler-wide lock: emit() has its own two
        self.lock = None

    def handle(self, record: logging.LogRecord) -> bool:
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return rv

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if not (record.levelno < logging.WARNING and getattr(record, DEFER, False)
                    and self._defer(line)):
                self._write(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _defer(self, line: str) -> bool:
        """Queue ``line`` for the writer; False when closed or the queue is
        full (write it now)."""
        with self._qlock:
            if self._closed or len(self._queued) >= self.max_queued:
                return False
            self._queued.append(line)
            if len(self._queued) > 1:
                return True              # the writer is woken already
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="log-writer",
                                                daemon=True)
                self._writer.start()
        self._wake.set()
        return True

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._stop.wait(self.delay)  # gather the lines of the next few ms
            self._wake.clear()
            try:
                self._write("")
            except Exception:            # the stream failed; what it held is lost
                if logging.raiseExceptions:
                    try:
                        sys.stderr.write("--- Logging error: deferred log lines lost ---\n")
                    except Exception:
                        pass

    def _write(self, line: str) -> None:
        """Write the queued lines, then ``line``, in one write."""
        with self._wlock:
            with self._qlock:
                queued, self._queued = self._queued, []
            if queued:
                queued.append(line)
                line = "".join(queued)
            if line:
                self.stream.write(line)
                self.stream.flush()

    def flush(self) -> None:
        self._write("")

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        with self._qlock:
            self._closed = True          # from here on every line is written at once
            writer = self._writer
        self._stop.set()
        self._wake.set()
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=5)
        try:
            self._write("")
        finally:
            super().close()


def setup(level: str = "info", stream=None):
    # the lines carry none of these record fields: do not collect them
    # (the logging HOWTO's "Optimization"; findCaller walks the stack)
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LineHandler(stream)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, LineHandler):
            old.close()                 # writes what an earlier setup() queued
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("kubernetes", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
