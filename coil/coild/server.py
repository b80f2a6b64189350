"""coild's two front doors: the v1-compatible REST API and the plugin socket.

REST (JSON; errors are ``{"status": CODE, "error": "..."}``):
  GET    /status                          blocks per pool, pods -> addresses
  POST   /ip                              {pod-namespace, pod-name, container-id, address-type,
                                           release-if-leaked}
  GET    /ip/<ns>/<pod>/<container-id>    404 when none
  DELETE /ip/<ns>/<pod>/<container-id>
  GET    /healthz, /readyz, /metrics
The plugin socket speaks the relay protocol of coil.coild.cniservice.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from coil import __version__
from coil.errors import (AlreadyExists, CoilError, InvalidArgument, NotFound, PoolExhausted,
                         StoreUnavailable)
from coil.store.model import ORIGIN_REST

log = logging.getLogger("coild.server")
MAX_REQUEST = 16 << 20


class RestServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, daemon):
        self.coild = daemon
        super().__init__(address, RestHandler)


class RestHandler(BaseHTTPRequestHandler):
    server_version = f"coild/{__version__}"
    protocol_version = "HTTP/1.1"
    # headers and body are two writes: without TCP_NODELAY a keep-alive client
    # waits ~40 ms for the delayed ACK on every request
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):
        log.debug("http " + fmt, *args)

    def _send(self, status: int, body: dict | bytes, content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str):
        self._send(status, {"status": status, "error": message})

    def _run(self, fn):
        try:
            fn()
        except InvalidArgument as exc:
            self._error(400, exc.one_line())
        except NotFound as exc:
            self._error(404, exc.one_line())
        except AlreadyExists as exc:
            self._error(409, exc.one_line())
        except PoolExhausted as exc:
            self._error(503, exc.one_line())
        except StoreUnavailable as exc:
            self._error(503, exc.one_line())
        except CoilError as exc:
            self._error(500, exc.one_line())
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("REST handler crashed")
            self._error(500, f"internal error: {exc}")

    def _split(self):
        path = self.path.split("?", 1)[0]
        return [p for p in path.split("/") if p]

    def do_GET(self):
        parts = self._split()
        d = self.server.coild
        if parts == ["status"]:
            self._run(lambda: self._send(200, d.status()))
        elif parts == ["healthz"]:
            self._send(200, {"status": 200})
        elif parts == ["readyz"]:
            self._run(lambda: (d.check_ready(), self._send(200, {"status": 200})))
        elif parts == ["metrics"]:
            body, ctype = d.metrics.render()
            self._send(200, body, ctype)
        elif len(parts) == 4 and parts[0] == "ip":
            self._run(lambda: self._get_ip(*parts[1:]))
        else:
            self._error(404, f"no such endpoint: {self.command} {self.path}")

    def _get_ip(self, ns, pod, cid):
        addrs = self.server.coild.allocator.lookup_pod(ns, pod, cid)
        if not addrs:
            raise NotFound(f"no address for {ns}/{pod} container {cid}")
        self._send(200, {"address": addrs[0].address, "addresses": [a.address for a in addrs],
                         "status": 200})

    def do_POST(self):
        if self._split() != ["ip"]:
            return self._error(404, f"no such endpoint: POST {self.path}")
        self._run(self._post_ip)

    def _post_ip(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > 1 << 20:
            raise InvalidArgument("request body must be a JSON object")
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            raise InvalidArgument("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgument("request body must be a JSON object")
        for key in ("pod-namespace", "pod-name", "container-id"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise InvalidArgument(f"{key} is required")
        kind = body.get("address-type", "ipv4")
        if kind not in ("ipv4", "ipv6"):
            raise InvalidArgument(f"invalid address-type {kind!r}: ipv4 or ipv6")
        opt_in = body.get("release-if-leaked", False)
        if not isinstance(opt_in, bool):
            raise InvalidArgument(f"invalid release-if-leaked {str(opt_in)[:40]!r}: true or false")
        extra = {"origin": ORIGIN_REST, **({"release_if_leaked": True} if opt_in else {})}
        d = self.server.coild
        ns = body["pod-namespace"]
        pool = d.pools.for_namespace(ns)
        rec = d.allocator.allocate(pool, 4 if kind == "ipv4" else 6, ns, body["pod-name"],
                                   body["container-id"], extra)
        self._send(200, {"address": rec.address, "status": 200})

    def do_DELETE(self):
        parts = self._split()
        if len(parts) != 4 or parts[0] != "ip":
            return self._error(404, f"no such endpoint: DELETE {self.path}")
        self._run(lambda: self._delete_ip(*parts[1:]))

    def _delete_ip(self, ns, pod, cid):
        d = self.server.coild
        addrs = d.allocator.lookup_pod(ns, pod, cid)
        if not addrs:
            raise NotFound(f"no address for {ns}/{pod} container {cid}")
        for rec in addrs:
            d.allocator.release_address(rec)
        self._send(200, {"address": addrs[0].address, "status": 200})


class PluginHandler(socketserver.BaseRequestHandler):
    def handle(self):
        conn: socket.socket = self.request
        cni = self.server.coild.cni
        arrived = cni.clock()          # the request's deadline counts from here
        chunks, size = [], 0
        try:
            conn.settimeout(30)
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_REQUEST:
                    conn.sendall(b"1\n" + self.server.coild.too_large())
                    return
                chunks.append(chunk)
            if not chunks:         # a liveness probe: connected and closed
                return
            code, body = cni.handle(b"".join(chunks), arrived)
            conn.sendall(f"{code}\n".encode() + body)
        except OSError as exc:
            log.warning("plugin connection failed", extra={"error": str(exc)})


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, daemon):
        self.coild = daemon
        self.path = path
        _claim_socket(path)
        old = os.umask(0o077)          # root-only: the socket is created 0600
        try:
            super().__init__(path, PluginHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def server_close(self):
        super().server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _claim_socket(path: str):
    """Remove a stale socket file; refuse when another coild listens there."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    else:
        raise AlreadyExists(f"another coild already listens on {path}",
                            hint="stop it or choose another --socket")
    finally:
        probe.close()


def serve_in_thread(server, name: str) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    t.start()
    return t
