"""The log handler: deferred (per-request) lines are written later by one
writer thread, in order with every other line, and none is lost at close."""

import io
import json
import logging
import threading

import pytest

from coil import logutil


class Stream(io.StringIO):
    """A stream that counts its writes and tells a waiter about each."""

    def __init__(self):
        super().__init__()
        self.writes = 0
        self.written = threading.Condition()

    def write(self, text):
        with self.written:
            self.writes += 1
            n = super().write(text)
            self.written.notify_all()
            return n

    def lines(self):
        return [json.loads(line) for line in self.getvalue().splitlines()]

    def wait_lines(self, n, timeout=30):
        with self.written:
            assert self.written.wait_for(lambda: len(self.getvalue().splitlines()) >= n,
                                         timeout), self.getvalue()


@pytest.fixture
def logger():
    made = []

    def make(delay):
        stream = Stream()
        handler = logutil.LineHandler(stream, delay=delay)
        handler.setFormatter(logutil.JSONFormatter())
        log = logging.getLogger(f"test.logutil.{len(made)}.{id(stream)}")
        log.propagate = False
        log.setLevel(logging.INFO)
        log.handlers[:] = [handler]
        made.append((log, handler))
        return log, handler, stream

    yield make
    for log, handler in made:
        handler.close()
        log.handlers[:] = []


def test_a_deferred_line_waits_for_the_writer_and_keeps_its_fields(logger):
    log, handler, stream = logger(delay=3600)
    log.info("cni %s", "add", extra={"container": "c1", "ms": 1.5, logutil.DEFER: True})
    assert stream.getvalue() == ""             # not written by the caller's thread
    handler.flush()
    (line,) = stream.lines()
    assert line["msg"] == "cni add" and line["container"] == "c1" and line["ms"] == 1.5
    assert line["level"] == "info" and line["logger"] == log.name
    assert logutil.DEFER not in line           # the marker is not part of the output
    assert line["ts"].endswith("Z") and len(line["ts"]) == len("2026-11-30T10:00:00.000Z")


def test_any_other_line_writes_the_queued_ones_first_in_one_write(logger):
    log, handler, stream = logger(delay=3600)
    for i in range(3):
        log.info("req %d", i, extra={logutil.DEFER: True})
    log.info("not deferred")
    assert [line["msg"] for line in stream.lines()] == ["req 0", "req 1", "req 2",
                                                        "not deferred"]
    assert stream.writes == 1
    log.warning("a warning is never deferred", extra={logutil.DEFER: True})
    assert stream.lines()[-1]["msg"] == "a warning is never deferred"
    assert stream.writes == 2


def test_the_writer_thread_writes_deferred_lines_without_other_logging(logger):
    log, handler, stream = logger(delay=0.01)
    for i in range(50):
        log.info("req %d", i, extra={logutil.DEFER: True})
    stream.wait_lines(50)
    assert [line["msg"] for line in stream.lines()] == [f"req {i}" for i in range(50)]
    assert stream.writes < 50                  # batched
    log.info("later", extra={logutil.DEFER: True})   # a second batch: woken again
    stream.wait_lines(51)
    assert stream.lines()[-1]["msg"] == "later"


def test_a_full_queue_is_written_by_the_next_caller(logger):
    log, handler, stream = logger(delay=3600)
    handler.max_queued = 3
    for i in range(3):
        log.info("req %d", i, extra={logutil.DEFER: True})
    assert stream.getvalue() == ""
    log.info("req 3", extra={logutil.DEFER: True})     # the queue is full: written now
    assert [line["msg"] for line in stream.lines()] == [f"req {i}" for i in range(4)]
    assert stream.writes == 1
    log.info("req 4", extra={logutil.DEFER: True})     # room again: deferred
    assert stream.writes == 1


def test_close_writes_what_is_queued_stops_the_writer_and_defers_no_more(logger):
    log, handler, stream = logger(delay=3600)
    log.info("queued", extra={logutil.DEFER: True})
    writer = handler._writer
    assert writer is not None and writer.is_alive()
    handler.close()
    assert [line["msg"] for line in stream.lines()] == ["queued"]
    assert not writer.is_alive()
    log.info("after close", extra={logutil.DEFER: True})
    assert stream.lines()[-1]["msg"] == "after close"


def test_lines_from_many_threads_are_each_written_once_and_whole(logger):
    log, handler, stream = logger(delay=0.001)

    def work(t):
        for i in range(200):
            log.info("t%d %d", t, i, extra={logutil.DEFER: True, "thread_no": t})
            if i % 50 == 0:
                log.info("sync t%d %d", t, i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handler.flush()
    lines = stream.lines()                     # each parses: no line torn or merged
    deferred = [line["msg"] for line in lines if not line["msg"].startswith("sync")]
    assert sorted(deferred) == sorted(f"t{t} {i}" for t in range(8) for i in range(200))
    for t in range(8):                         # each thread's lines in its own order
        mine = [line["msg"] for line in lines if line.get("thread_no") == t]
        assert mine == [f"t{t} {i}" for i in range(200)]


def test_setup_closes_the_handler_it_replaces_so_nothing_queued_is_lost():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    first, second = Stream(), Stream()
    try:
        logutil.setup("info", first)
        logging.getLogger("test.logutil.setup").info("queued", extra={logutil.DEFER: True})
        closed = []

        class Other(logging.StreamHandler):     # another's handler: replaced, not closed
            def close(self):
                closed.append(self)
                super().close()

        other = Other(Stream())
        root.addHandler(other)
        logutil.setup("info", second)
        assert [line["msg"] for line in first.lines()] == ["queued"]
        assert root.handlers[0].stream is second and other not in root.handlers
        assert closed == []
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], level = saved
        root.setLevel(level)
