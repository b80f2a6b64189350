"""Bounded HTTP/1.1 serving for coild's REST listeners (TCP and the API socket).

Threads are spent on complete requests, never on idle or slow connections:

- one selector thread accepts connections and reads, without blocking, until
  a request's headers are complete; only then is the connection handed to a
  fixed pool of ``workers`` threads, which answer it;
- the headers must be complete within ``read_timeout`` of the request's first
  byte, else the connection is closed; a body (only ``POST`` has one) must
  arrive within the same deadline, else 408 and close;
- after an answer, a keep-alive connection goes back to the selector; a
  closing one is drained there (what the client still sends is discarded for
  a moment, so that closing does not reset the connection before the client
  read the answer);
- at most ``max_connections`` connections are open: one more closes the
  connection idle the longest (then one draining, then one whose headers are
  late), and only when every connection is in a worker is it answered 503;
- a connection idle (no request) for ``idle_timeout`` is closed.

``authorize(sock)`` (the API socket's SO_PEERCRED check) runs on accept; a
refused connection is answered with its error once its request arrived, and
closed.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import queue
import re
import selectors
import socket
import threading
import errno
import time
from http.server import BaseHTTPRequestHandler

from coil.errors import AlreadyExists, CoilError, InvalidArgument

log = logging.getLogger("coild.server")


def listen_error(flag: str, where: str, exc: OSError) -> CoilError:
    """The one-line error for a listener that could not be opened."""
    if exc.errno == errno.EADDRINUSE:
        return AlreadyExists(f"cannot listen on {flag} {where}: address already in use",
                             hint=f"stop whatever holds it (another coild?) or choose "
                                  f"another {flag}")
    return InvalidArgument(f"cannot listen on {flag} {where}: {exc.strerror or exc}",
                           hint=f"check {flag}")


def listen_tcp(flag: str, host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``flag`` names the option in
    errors). Raises AlreadyExists (in use) or InvalidArgument."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, IndexError) as exc:
        raise InvalidArgument(f"cannot listen on {flag} {host}:{port}: "
                              f"{getattr(exc, 'strerror', None) or exc}",
                              hint=f"check {flag}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise listen_error(flag, f"{host}:{port}", exc) from None
    return sock


@dataclasses.dataclass(frozen=True)
class Limits:
    max_connections: int = 256      # open connections per listener
    workers: int = 8                # threads answering requests per listener
    read_timeout: float = 10.0      # a whole request must arrive within this
    idle_timeout: float = 60.0      # keep-alive connections idle longer are closed
    max_body: int = 64 << 10        # bytes; larger bodies get 413
    linger: float = 2.0             # seconds a closing connection is drained


HEADERS_END = re.compile(rb"\r?\n\r?\n")
MAX_HEAD = 128 << 10                # more than the parser accepts: it answers 414/431


def error_response(status: int, message: str, reason: str) -> bytes:
    """A complete HTTP/1.1 JSON error answer that closes the connection."""
    body = json.dumps({"status": status, "error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _DeadlineIO(socket.SocketIO):
    """Raw socket reads bounded by the connection's deadline.

    ``conn.deadline`` None means "do not wait at all" (a non-blocking peek
    for pipelined requests): the read returns None when nothing is there.
    """

    def __init__(self, sock: socket.socket, conn: "Connection"):
        super().__init__(sock, "rb")
        self._conn = conn

    def readinto(self, b):
        pre = self._conn.prebuf
        if pre:                         # bytes the selector read already
            n = min(len(b), len(pre))
            b[:n] = pre[:n]
            del pre[:n]
            return n
        deadline = self._conn.deadline
        if deadline is None:
            self._sock.settimeout(0.0)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request not received in time")
            self._sock.settimeout(left)
        return super().readinto(b)


class Connection:
    __slots__ = ("sock", "peer", "rfile", "wfile", "handler", "deadline", "since", "refusal",
                 "prebuf", "state", "drained")

    def __init__(self, sock: socket.socket, peer, server: "BoundedHTTPServer"):
        self.sock = sock
        self.peer = peer
        self.deadline: float | None = None
        self.since = time.monotonic()          # when the current state began
        self.state = "idle"                     # idle | partial | draining | busy
        self.prebuf = bytearray()
        self.drained = 0
        self.refusal: bytes | None = None
        self.rfile = io.BufferedReader(_DeadlineIO(sock, self), 65536)
        self.wfile = _Writer(sock, server.limits.read_timeout)
        self.handler = server.handler_class(self, server)

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class _Writer(io.RawIOBase):
    """Unbuffered writes with sendall (what StreamRequestHandler uses)."""

    def __init__(self, sock, timeout: float):
        self._sock = sock
        self._timeout = timeout

    def writable(self):
        return True

    def write(self, b):
        self._sock.settimeout(self._timeout)   # a client that does not read is dropped
        self._sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


class RequestHandler(BaseHTTPRequestHandler):
    """One object per connection; ``serve_one`` answers one request.

    Protocol errors of the standard parser (bad request line, too many or too
    long headers, unknown method, HTTP/2) become JSON 4xx answers.
    """

    protocol_version = "HTTP/1.1"
    server_version = "coild"

    def __init__(self, conn: Connection, server: "BoundedHTTPServer"):   # noqa: super not called
        self.conn = conn
        self.request = self.connection = conn.sock
        self.client_address = conn.peer
        self.server = server
        self.rfile = conn.rfile
        self.wfile = conn.wfile
        self.close_connection = True

    def serve_one(self) -> bool:
        """Answer one request; True when the connection stays open."""
        self.close_connection = True
        self.handle_one_request()
        return not self.close_connection

    def parse_request(self) -> bool:
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "HTTP/0.9 requests are not served")
            return False
        # the standard parser takes a header line without a colon (or a
        # first line that continues nothing) as the end of the headers and
        # the rest as a body; such a request is malformed, not a GET
        if self.headers.defects or self.headers.get_payload():
            self.send_error(400, "malformed header line: every header needs 'Name: value'")
            return False
        return True

    def send_error(self, code, message=None, explain=None):
        if code == 501:             # a method the parser does not know
            code, message = 405, f"method {self.command!r} is not allowed"
        elif code == 505:           # HTTP/2 or later on this HTTP/1.1 server
            code = 400
        from http import HTTPStatus
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = "Error"
        text = message or reason
        self.close_connection = True
        body = json.dumps({"status": code, "error": text}).encode()
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.1"     # never answer without headers
        self.send_response(code, reason)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, fmt, *args):
        log.debug("http " + fmt, *args)

    def log_error(self, fmt, *args):
        log.debug("http error " + fmt, *args)


class BoundedHTTPServer:
    """Serve ``handler_class`` on an already listening socket (see module doc).

    ``serve_forever``/``shutdown``/``server_close`` behave like socketserver's.
    """

    def __init__(self, listener: socket.socket, handler_class, limits: Limits, name: str,
                 authorize=None):
        self.listener = listener
        self.handler_class = handler_class
        self.limits = limits
        self.name = name
        self.authorize = authorize
        listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._returned: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # per state, in the order the state began: the first one expires first
        self._waiting = {"idle": {}, "draining": {}, "partial": {}}
        self._timeouts = {"idle": limits.idle_timeout, "draining": limits.linger,
                          "partial": limits.read_timeout}
        self._lock = threading.Lock()
        self._open = 0
        self._closed = False             # the wake pipe is closed: never write to its fd
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._workers: list[threading.Thread] = []
        for i in range(limits.workers):
            t = threading.Thread(target=self._work_loop, name=f"{name}-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    # -- selector thread -----------------------------------------------------
    def serve_forever(self):
        sel = self._sel
        sel.register(self.listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select(self._next_timeout()):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._readable(key.data)
                self._expire()
        finally:
            self._stopped.set()

    def _next_timeout(self) -> float:
        timeout, now = 1.0, time.monotonic()
        for state, conns in self._waiting.items():
            if conns:
                first = next(iter(conns))
                timeout = min(timeout, first.since + self._timeouts[state] - now)
        return max(0.0, timeout)

    def _expire(self):
        now = time.monotonic()
        for state, conns in self._waiting.items():
            limit = self._timeouts[state]
            while conns:
                conn = next(iter(conns))
                if now - conn.since < limit:
                    break
                self._drop(conn)

    def _wait(self, conn: Connection, state: str):
        """Park ``conn`` in the selector in ``state``."""
        conn.state, conn.since = state, time.monotonic()
        conn.sock.setblocking(False)     # the selector thread never waits on a read
        self._waiting[state][conn] = None
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _unwait(self, conn: Connection):
        self._waiting[conn.state].pop(conn, None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: Connection):
        self._unwait(conn)
        self._close(conn)

    def _dispatch(self, conn: Connection):
        self._unwait(conn)
        conn.state = "busy"
        self._jobs.put(conn)

    def _readable(self, conn: Connection):
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if conn.state == "draining":
            conn.drained += len(data)
            if not data or conn.drained > self.LINGER_BYTES:
                self._drop(conn)
            return
        if not data:                    # the client closed
            if conn.prebuf:
                self._dispatch(conn)    # a request cut short: the parser answers it
            else:
                self._drop(conn)
            return
        if conn.state == "idle":       # a request begins: its deadline starts
            self._unwait(conn)
            self._wait(conn, "partial")
        conn.prebuf += data
        self._maybe_dispatch(conn)

    def _maybe_dispatch(self, conn: Connection):
        if conn.refusal is not None or len(conn.prebuf) >= MAX_HEAD \
                or HEADERS_END.search(conn.prebuf):
            self._dispatch(conn)

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                conn, state = self._returned.get_nowait()
            except queue.Empty:
                return
            if self._stopping.is_set():
                self._close(conn)
                continue
            if state == "draining" or not conn.prebuf:
                self._wait(conn, state)
            else:                       # pipelined bytes: a request has begun
                self._wait(conn, "partial")
                self._maybe_dispatch(conn)

    def _accept(self):
        for _ in range(64):             # then let the loop serve others
            try:
                sock, peer = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # EMFILE and friends: keep serving
                log.warning("accept failed", extra={"listener": self.name, "error": str(exc)})
                return
            with self._lock:
                full = self._open >= self.limits.max_connections
            if full:
                for state in ("idle", "draining", "partial"):
                    if self._waiting[state]:
                        self._drop(next(iter(self._waiting[state])))
                        full = False
                        break
            if full:
                _send_and_close(sock, error_response(
                    503, "too many connections; retry later", "Service Unavailable"))
                continue
            refusal = self.authorize(sock) if self.authorize is not None else None
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn = Connection(sock, peer, self)
            except Exception as exc:     # noqa: BLE001 - never kill the accept loop
                log.warning("cannot set up a connection", extra={"error": str(exc)})
                sock.close()
                continue
            conn.refusal = refusal      # answered by a worker once the request came
            with self._lock:
                self._open += 1
            self._wait(conn, "idle")

    def _close(self, conn: Connection):
        conn.close()
        with self._lock:
            self._open -= 1

    # -- workers ---------------------------------------------------------------
    def _work_loop(self):
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            self._serve(conn)

    def _serve(self, conn: Connection):
        state = "idle"
        try:
            if conn.refusal is not None:
                conn.wfile.write(conn.refusal)
                state = "draining"
            else:
                conn.deadline = conn.since + self.limits.read_timeout
                keep = conn.handler.serve_one()
                if keep and not self._stopping.is_set():
                    conn.deadline = None            # peek without waiting
                    pending = conn.rfile.peek(65536)
                    if pending:                      # pipelined: back to the selector
                        conn.prebuf[:0] = conn.rfile.read(len(pending))
                else:
                    state = "draining"
            if state == "draining":
                conn.prebuf.clear()
                conn.drained = 0
                conn.sock.shutdown(socket.SHUT_WR)
                conn.sock.setblocking(False)
        except Exception as exc:             # noqa: BLE001 - a dropped connection
            log.debug("connection closed", extra={"listener": self.name, "error": repr(exc)})
            self._close(conn)
            return
        with self._lock:
            closed = self._closed
        if closed:
            self._close(conn)
            return
        self._returned.put((conn, state))
        self._wake()

    LINGER_BYTES = 1 << 20

    def _wake(self):
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:          # full pipe: a wake-up is pending anyway
                pass

    # -- life cycle ----------------------------------------------------------------
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def shutdown(self):
        """Stop the selector loop; requests in progress finish."""
        self._stopping.set()
        self._wake()
        if threading.current_thread().name != self.name:
            self._stopped.wait(5)

    def server_close(self):
        """Close the listener and every waiting connection; wait for the
        requests in progress."""
        self._stopping.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        for conns in self._waiting.values():
            for conn in list(conns):
                conns.pop(conn, None)
                self._close(conn)
        while True:
            try:
                self._close(self._returned.get_nowait()[0])
            except queue.Empty:
                break
        for _ in self._workers:
            self._jobs.put(None)
        # requests in progress finish (a POST /ip ends done or rolled back
        # before the daemon closes its etcd client); each is bounded by the
        # read timeout and by etcd's timeout
        deadline = time.monotonic() + self.limits.read_timeout + 30.0
        for t in self._workers:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        self._sel.close()


def _send_and_close(sock: socket.socket, data: bytes):
    """Best effort, never blocking: a fresh socket's send buffer has room."""
    try:
        sock.setblocking(False)
        sock.send(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
