"""coild's front doors: the REST API (TCP and the API socket) and the plugin socket.

REST (JSON; errors are ``{"status": CODE, "error": "..."}``):
  GET    /status                          blocks per pool, pods -> addresses
  GET    /ip/<ns>/<pod>/<container-id>    404 when none
  GET    /healthz, /readyz, /metrics
  POST   /ip                              {pod-namespace, pod-name, container-id, address-type,
                                           release-if-leaked}
  DELETE /ip/<ns>/<pod>/<container-id>
POST and DELETE change state: they are served only on the API socket
(``--api-socket``, mode 0600, peers checked to be uid 0 with SO_PEERCRED);
the TCP listener (``--http``) answers them 403. Connections, timeouts and
body size are bounded by coil.coild.connections.
The plugin socket speaks the relay protocol of coil.cni.protocol; the
CNI service behind it is coil.cni.service.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import socket
import socketserver
import stat
import struct
import threading
import time
from urllib.parse import unquote_to_bytes

from coil import __version__
from coil.cni import protocol
from coil.coild import DEFAULT_API_SOCKET
from coil.coild.connections import (BoundedHTTPServer, Limits, RequestHandler, error_response,
                                    listen_error, listen_tcp)
from coil.errors import (AlreadyExists, CoilError, Conflict, InvalidArgument, NotFound,
                         PoolExhausted, StoreUnavailable)
from coil.store.model import ORIGIN_REST

log = logging.getLogger("coild.server")
MAX_REQUEST = 16 << 20

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
POST_IP_KEYS = ("pod-namespace", "pod-name", "container-id", "address-type", "release-if-leaked")


# typed errors -> HTTP status; the first class that matches wins, anything
# else derived from CoilError is a 500. A Conflict (a race lost more often
# than the retry bound allows) is 503, try again, as it is CNI code 11.
_STATUS_OF = ((InvalidArgument, 400), (NotFound, 404), (AlreadyExists, 409),
              (PoolExhausted, 503), (StoreUnavailable, 503), (Conflict, 503))


def _http_status(exc: CoilError) -> int:
    for cls, status in _STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 500


class HTTPError(CoilError):
    """A request the REST layer refuses: status and one line for the client."""

    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


def validate_owner(ns, pod, cid):
    """The (namespace, pod, container-id) of a REST call. Raises InvalidArgument."""
    if not isinstance(ns, str) or len(ns) > 63 or not _LABEL.fullmatch(ns):
        raise InvalidArgument(f"invalid pod-namespace {ns!r}: expected a DNS label "
                              f"(lower-case letters, digits, '-', at most 63)")
    if not isinstance(pod, str) or len(pod) > 253 or not _SUBDOMAIN.fullmatch(pod):
        raise InvalidArgument(f"invalid pod-name {pod!r}: expected a DNS subdomain "
                              f"(lower-case letters, digits, '-', '.', at most 253)")
    if not isinstance(cid, str) or len(cid) > 256 or not _CONTAINER_ID.fullmatch(cid):
        raise InvalidArgument(f"invalid container-id {cid!r}: expected letters, digits, "
                              f"'_', '.', '-' (at most 256)")


class RestHandler(RequestHandler):
    server_version = f"coild/{__version__}"

    def _send(self, status: int, body: dict | bytes, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"status": status, "error": message})

    def _run(self, fn):
        try:
            fn()
        except HTTPError as exc:
            if exc.close:
                self.close_connection = True
            self._error(exc.status, str(exc))
        except CoilError as exc:
            self._error(_http_status(exc), exc.one_line())
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("REST handler crashed")
            self._error(500, f"internal error: {exc}")

    def _split(self) -> list[str]:
        """Path segments, percent-decoded as UTF-8. Raises HTTPError 400."""
        path = self.path.split("?", 1)[0]
        parts = []
        for raw in path.split("/"):
            if not raw:
                continue
            if re.search(r"%(?![0-9A-Fa-f]{2})", raw):
                raise HTTPError(400, f"bad percent-encoding in path {path[:200]!r}")
            try:
                parts.append(unquote_to_bytes(raw.encode("latin-1")).decode("utf-8"))
            except UnicodeDecodeError:
                raise HTTPError(400, f"path {path[:200]!r} is not UTF-8") from None
        return parts

    def _content_length(self) -> int:
        """The declared body length (0 when none). Raises HTTPError: 400 bad
        Content-Length, 411 Transfer-Encoding, 413 too large."""
        if self.headers.get("Transfer-Encoding") is not None:
            raise HTTPError(411, "Transfer-Encoding is not accepted: send Content-Length",
                            close=True)
        values = self.headers.get_all("Content-Length") or []
        if not values:
            return 0
        text = values[0].strip()
        if len(set(v.strip() for v in values)) != 1 or not text.isascii() or not text.isdigit():
            raise HTTPError(400, f"invalid Content-Length {values[0][:40]!r}", close=True)
        length = int(text)
        limit = self.server.limits.max_body
        if length > limit:
            raise HTTPError(413, f"request body of {length} bytes is larger than {limit}",
                            close=True)
        return length

    def _body(self, length: int) -> bytes:
        """Read the body. Raises HTTPError 408 when it does not arrive within
        the request's deadline (--read-timeout), 400 when the client closes."""
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise HTTPError(408, "request body not received in time", close=True) from None
        if len(data) != length:
            raise HTTPError(400, "request body shorter than its Content-Length", close=True)
        return data

    def _dispatch(self):
        method = self.command
        if method in ("POST", "DELETE") and not self.server.may_change:
            sock = self.server.api_socket or DEFAULT_API_SOCKET
            raise HTTPError(403, f"{method} is served only on coild's root-only API socket "
                                 f"(--api-socket), e.g. as root: curl --unix-socket {sock} "
                                 f"-X {method} http://localhost/ip...", close=True)
        length = self._content_length()
        if length and method != "POST":     # never wait for a body nobody needs
            raise HTTPError(400, f"{method} takes no request body", close=True)
        parts = self._split()
        body = self._body(length) if length else b""
        d = self.server.coild
        if method == "GET":
            if parts == ["status"]:
                return self._send(200, d.status())
            if parts == ["healthz"]:
                return self._send(200, {"status": 200})
            if parts == ["readyz"]:
                return self._readyz(d)
            if parts == ["metrics"]:
                data, ctype = d.metrics.render()
                return self._send(200, data, ctype)
            if len(parts) == 4 and parts[0] == "ip":
                return self._get_ip(*parts[1:])
        elif method == "POST" and parts == ["ip"]:
            return self._post_ip(body)
        elif method == "DELETE" and len(parts) == 4 and parts[0] == "ip":
            return self._delete_ip(*parts[1:])
        raise HTTPError(404, f"no such endpoint: {method} {self.path[:200]}")

    do_GET = do_POST = do_DELETE = lambda self: self._run(self._dispatch)

    def _readyz(self, d):
        try:
            d.check_ready()
        except StoreUnavailable as exc:
            return self._send(503, {"status": 503, "reason": "etcd-unreachable",
                                    "error": exc.one_line()})
        except CoilError as exc:
            return self._send(503, {"status": 503, "reason": "starting", "error": exc.one_line()})
        self._send(200, {"status": 200})

    def _get_ip(self, ns, pod, cid):
        validate_owner(ns, pod, cid)
        addrs = self.server.coild.allocator.lookup_pod(ns, pod, cid)
        if not addrs:
            raise NotFound(f"no address for {ns}/{pod} container {cid}")
        self._send(200, {"address": addrs[0].address, "addresses": [a.address for a in addrs],
                         "status": 200})

    def _post_ip(self, raw: bytes):
        if not raw:
            raise InvalidArgument("request body must be a JSON object")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidArgument("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgument("request body must be a JSON object")
        unknown = sorted(set(body) - set(POST_IP_KEYS))
        if unknown:
            raise InvalidArgument(f"unknown key {unknown[0][:100]!r} in request body; "
                                  f"known: {', '.join(POST_IP_KEYS)}")
        for key in ("pod-namespace", "pod-name", "container-id"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise InvalidArgument(f"{key} is required (a string)")
        ns, pod, cid = body["pod-namespace"], body["pod-name"], body["container-id"]
        validate_owner(ns, pod, cid)
        kind = body.get("address-type", "ipv4")
        if kind not in ("ipv4", "ipv6"):
            raise InvalidArgument(f"invalid address-type {str(kind)[:40]!r}: ipv4 or ipv6")
        opt_in = body.get("release-if-leaked", False)
        if not isinstance(opt_in, bool):
            raise InvalidArgument(f"invalid release-if-leaked {str(opt_in)[:40]!r}: true or false")
        extra = {"origin": ORIGIN_REST, **({"release_if_leaked": True} if opt_in else {})}
        d = self.server.coild
        pool = d.pools.for_namespace(ns)
        rec = d.allocator.allocate(pool, 4 if kind == "ipv4" else 6, ns, pod, cid, extra)
        self._send(200, {"address": rec.address, "status": 200})

    def _delete_ip(self, ns, pod, cid):
        validate_owner(ns, pod, cid)
        d = self.server.coild
        # only the REST API's own addresses: a CNI attachment's are freed by
        # its CNI DEL (or GC), which also removes the veth that routes them
        addrs = [a for a in d.allocator.resolve(cid)
                 if (a.namespace, a.pod) == (ns, pod) and a.of_rest()]
        if not addrs:
            raise NotFound(f"no address taken through the REST API for {ns}/{pod} "
                           f"container {cid}")
        for rec in addrs:
            d.allocator.release_address(rec)
        self._send(200, {"address": addrs[0].address, "status": 200})


class RestServer(BoundedHTTPServer):
    """The read-only TCP listener (``--http``): POST and DELETE get 403."""

    may_change = False

    def __init__(self, address: tuple[str, int], daemon, limits: Limits | None = None,
                 api_socket: str | None = None):
        self.coild = daemon
        self.api_socket = api_socket       # named in the 403 answer
        host, port = address
        sock = listen_tcp("--http", host, port)
        super().__init__(sock, RestHandler, limits or Limits(), "rest")

    @property
    def server_address(self):
        return self.listener.getsockname()


def peer_uid(sock: socket.socket) -> int:
    """The uid of a UNIX socket's peer (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _caller_uid(sock: socket.socket) -> int:
    """The peer's uid, or -1 when the kernel cannot tell."""
    try:
        return peer_uid(sock)
    except OSError:
        return -1


def _root_only(sock: socket.socket) -> bytes | None:
    uid = _caller_uid(sock)
    if uid == 0:
        return None
    log.warning("API socket: refused a caller that is not root", extra={"uid": uid})
    return error_response(403, f"coild's API socket serves root only (caller uid {uid})",
                          "Forbidden")


def _plugin_caller_refused(conn: socket.socket) -> bool:
    """The plugin socket serves root only, as the API socket does: its mode
    is 0600, and a caller whose uid (SO_PEERCRED) is not 0 gets a CNI error
    even if that mode was loosened. Answers the refusal; True when refused."""
    uid = _caller_uid(conn)
    if uid == 0:
        return False
    from coil.cni import spec
    log.warning("plugin socket: refused a caller that is not root", extra={"uid": uid})
    body = json.dumps(spec.error_object(
        spec.ERR_FORBIDDEN, f"coild's plugin socket serves root only (caller uid {uid})",
        "the container runtime runs /opt/cni/bin/coil as root")).encode()
    try:
        conn.sendall(protocol.encode_response(1, body))
        # read what it sent, unparsed, up to a bound: closing a socket with
        # unread input resets it, and the caller would lose the answer
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        left = 1 << 20
        while left > 0:
            chunk = conn.recv(min(65536, left))
            if not chunk:
                break
            left -= len(chunk)
    except OSError:
        pass
    return True


class ApiSocketServer(BoundedHTTPServer):
    """The full REST API on a root-only UNIX socket (``--api-socket``)."""

    may_change = True

    def __init__(self, path: str, daemon, limits: Limits | None = None):
        self.coild = daemon
        self.path = path
        _claim_socket(path, "--api-socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)          # root-only: the socket is created 0600
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise listen_error("--api-socket", path, exc) from None
        finally:
            os.umask(old)
        super().__init__(sock, RestHandler, limits or Limits(), "api", authorize=_root_only)

    def server_close(self):
        super().server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class PluginHandler(socketserver.BaseRequestHandler):
    def handle(self):
        conn: socket.socket = self.request
        cni = self.server.coild.cni
        arrived = cni.clock()          # the request's deadline counts from here
        if _plugin_caller_refused(conn):
            return
        chunks, size = [], 0
        deadline = time.monotonic() + self.server.read_timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("request not received in time")
                conn.settimeout(left)
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    raise TimeoutError("request not received in time") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_REQUEST:
                    conn.sendall(protocol.encode_response(1, self.server.coild.too_large()))
                    return
                chunks.append(chunk)
            if not chunks:         # a liveness probe: connected and closed
                return
            code, body = cni.handle(b"".join(chunks), arrived)
            conn.settimeout(self.server.read_timeout)
            try:
                conn.sendall(protocol.encode_response(code, body))
            except socket.timeout:
                raise TimeoutError("answer not taken in time") from None
        except OSError as exc:
            log.warning("plugin connection failed", extra={"error": str(exc)})


class WorkerPoolMixIn:
    """Connections served by reused worker threads, at most
    ``max_connections`` at once; one more is answered by ``refuse(sock)``
    and closed without a thread. A worker idle for ``idle_timeout`` seconds
    exits. (A new thread per connection cost coild ~90 us of CPU per CNI
    call - creation, the start hand-off, its stack mapped and unmapped -
    about 5 % of a churned pod's; docs/benchmarks.md, "CNI".)"""

    max_connections = 256
    idle_timeout = 30.0

    def _pool_init(self):
        self._pool_lock = threading.Condition()
        self._jobs = queue.SimpleQueue()
        self._busy = 0          # connections accepted and not finished
        self._idle = 0          # idle workers no queued connection is promised to
        self._workers = 0

    def process_request(self, request, client_address):
        with self._pool_lock:
            refuse = self._busy >= self.max_connections
            if not refuse:
                self._busy += 1
                spawn = self._idle == 0
                if spawn:
                    self._workers += 1
                else:
                    self._idle -= 1      # that worker takes this connection
        if refuse:
            try:
                self.refuse(request)
            finally:
                self.shutdown_request(request)
            return
        if spawn:
            try:
                threading.Thread(target=self._work, name="plugin-worker", daemon=True).start()
            except BaseException:
                with self._pool_lock:
                    self._busy -= 1
                    self._workers -= 1
                self.shutdown_request(request)
                raise
        self._jobs.put((request, client_address))

    def _work(self):
        while True:
            try:
                job = self._jobs.get(timeout=self.idle_timeout)
            except queue.Empty:
                with self._pool_lock:
                    if self._idle > 0:       # nothing promised to this one: exit
                        self._idle -= 1
                        self._workers -= 1
                        return
                continue
            if job is None:                  # server_close()
                return
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                # free before the connection closes: a plugin that got its
                # answer (EOF) and calls again finds this worker idle
                with self._pool_lock:
                    self._busy -= 1
                    self._idle += 1
                    if not self._busy:
                        self._pool_lock.notify_all()
                self.shutdown_request(request)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection is being served (its answer sent) or
        queued; False after ``timeout`` seconds."""
        with self._pool_lock:
            return self._pool_lock.wait_for(lambda: not self._busy, timeout)

    def server_close(self):
        super().server_close()
        with self._pool_lock:
            workers, self._workers, self._idle = self._workers, 0, 0
        for _ in range(workers):                # each worker ends after its connection
            self._jobs.put(None)

    def refuse(self, request):
        pass


class PluginServer(WorkerPoolMixIn, socketserver.UnixStreamServer):

    def __init__(self, path: str, daemon, max_connections: int = 256,
                 read_timeout: float = 30.0):
        self.coild = daemon
        self.path = path
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self._pool_init()
        _claim_socket(path, "--socket")
        old = os.umask(0o077)          # root-only: the socket is created 0600
        try:
            super().__init__(path, PluginHandler)
        except OSError as exc:
            raise listen_error("--socket", path, exc) from None
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def refuse(self, request):
        from coil.cni import spec
        body = json.dumps(spec.error_object(spec.ERR_TRY_AGAIN, "coild is busy: too many "
                                            "plugin connections; retry")).encode()
        try:
            request.setblocking(False)
            request.send(protocol.encode_response(1, body))
        except OSError:
            pass

    def server_close(self):
        super().server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _claim_socket(path: str, flag: str = "--socket"):
    """Remove a stale socket file (one nothing listens on); refuse when
    something listens there or the path is not a socket. Raises
    AlreadyExists, InvalidArgument."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise InvalidArgument(f"{flag} {path} exists and is not a socket",
                              hint=f"remove it or choose another {flag}")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            try:
                os.unlink(path)     # stale: left by a coild that died
            except FileNotFoundError:
                pass
            return
        raise InvalidArgument(f"cannot check {flag} {path}: {exc.strerror or exc}") from None
    else:
        raise AlreadyExists(f"cannot listen on {flag} {path}: another process (another "
                            f"coild?) listens there", hint=f"stop it or choose another {flag}")
    finally:
        probe.close()


def serve_in_thread(server, name: str) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    t.start()
    return t
