"""coild's plugin socket serves connections with reused worker threads
(coil.coild.server.WorkerPoolMixIn): a thread per connection cost ~90 us of
CPU per CNI call. In-process UNIX socket servers in a temporary directory."""

from __future__ import annotations

import os
import socket
import socketserver
import tempfile
import threading
import time

import pytest

from coil.coild.server import WorkerPoolMixIn


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(64)
        if data == b"hold":
            self.server.release.wait(30)
        self.request.sendall(threading.current_thread().name.encode() + b" "
                             + str(threading.get_ident()).encode())


class Server(WorkerPoolMixIn, socketserver.UnixStreamServer):
    def __init__(self, path, max_connections, idle_timeout=30.0):
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.release = threading.Event()
        self.refused = 0
        self._pool_init()
        super().__init__(path, Handler)

    def refuse(self, request):
        self.refused += 1
        request.sendall(b"busy")


@pytest.fixture
def server():
    made = []

    def make(max_connections=4, idle_timeout=30.0):
        path = os.path.join(tempfile.mkdtemp(prefix="coil-wp-"), "s.sock")
        srv = Server(path, max_connections, idle_timeout)
        threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True).start()
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.release.set()
        srv.shutdown()
        srv.server_close()
        os.unlink(srv.server_address)
        os.rmdir(os.path.dirname(srv.server_address))


def _call(path, payload=b"hi") -> bytes:
    """One call as the plugin makes it: the answer is everything until EOF."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(256):
            chunks.append(chunk)
        return b"".join(chunks)


def _open(path, payload) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(path)
    s.sendall(payload)
    return s


def _until(predicate, bound=30.0):
    end = time.monotonic() + bound
    while not predicate() and time.monotonic() < end:
        time.sleep(0.01)
    return predicate()


def test_sequential_connections_reuse_one_worker(server):
    srv = server()
    answers = {_call(srv.server_address) for _ in range(50)}
    assert len(answers) == 1 and next(iter(answers)).startswith(b"plugin-worker ")
    assert srv._workers == 1


def test_concurrent_connections_get_their_own_workers_then_the_cap_refuses(server):
    srv = server(max_connections=3)
    held = [_open(srv.server_address, b"hold") for _ in range(3)]
    try:
        assert _until(lambda: srv._busy == 3)
        with socket.socket(socket.AF_UNIX) as s:          # the 4th: no worker for it
            s.settimeout(30)
            s.connect(srv.server_address)
            assert s.recv(256) == b"busy"
        assert srv.refused == 1
    finally:
        srv.release.set()
    idents = {s.recv(256) for s in held}
    for s in held:
        s.close()
    assert len(idents) == 3 and srv._workers == 3
    assert _until(lambda: srv._busy == 0 and srv._idle == 3)
    # the three idle workers serve what comes next, no fourth is started
    assert _call(srv.server_address).startswith(b"plugin-worker ")
    assert srv._workers == 3


def test_idle_workers_exit_and_new_ones_start(server):
    srv = server(idle_timeout=0.05)
    first = _call(srv.server_address)
    assert _until(lambda: srv._workers == 0)
    assert not any(t.name == "plugin-worker" and str(t.ident).encode() in first
                   for t in threading.enumerate())
    assert _call(srv.server_address).startswith(b"plugin-worker ")


def test_close_ends_the_workers(server):
    srv = server()
    held = [_open(srv.server_address, b"hold") for _ in range(2)]
    assert _until(lambda: srv._busy == 2)
    _call_thread = [t for t in threading.enumerate() if t.name == "plugin-worker"]
    srv.release.set()
    for s in held:
        s.recv(256)
        s.close()
    srv.shutdown()
    srv.server_close()
    for t in _call_thread:
        t.join(30)
    assert not any(t.is_alive() for t in _call_thread)


def test_wait_idle_waits_for_the_answer_to_be_sent(server):
    """coild's shutdown waits for this after its requests are done: a
    worker is busy until it has sent its answer."""
    srv = server()
    held = _open(srv.server_address, b"hold")
    assert _until(lambda: srv._busy == 1)
    assert srv.wait_idle(0.05) is False              # still serving
    srv.release.set()
    assert srv.wait_idle(30) is True
    assert held.recv(256).startswith(b"plugin-worker ")
    held.close()
