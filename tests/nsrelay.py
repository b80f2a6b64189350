"""A TCP relay from the loopback of a test network namespace to a loopback
address of the test process's own (root) namespace.

Clients that must run inside a throw-away namespace (to reach an address
that exists only there) sometimes also need a server of the test harness
that listens on ``127.0.0.1`` of the root namespace, e.g. kube-apiserver.
``NetnsRelay`` bridges the two without changing either namespace's
network configuration:

* the listening socket is created on the calling thread while it is
  switched into the namespace (``setns(2)``, see coil/net/ns.py), bound to
  ``127.0.0.1:0`` there; a socket keeps the namespace it was created in;
* a relay thread, which stays in the root namespace, accepts connections
  on it and connects each one to ``target`` (a loopback address of the
  root namespace), piping bytes both ways.

Both legs are loopback connections, each in its own namespace. Everything
is closed and every thread joined on exit.

    with NetnsRelay("/run/netns/NAME", ("127.0.0.1", port)) as relay:
        ... clients in NAME connect to 127.0.0.1:relay.port ...
"""

from __future__ import annotations

import socket
import threading

from coil.net.ns import in_netns

__all__ = ["NetnsRelay"]


class NetnsRelay:
    def __init__(self, netns_path: str, target: tuple[str, int]):
        self.netns_path = netns_path
        self.target = target
        self.port: int | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self.connections = 0        # accepted so far (for tests of the tests)

    # -- lifecycle ----------------------------------------------------------
    def __enter__(self) -> "NetnsRelay":
        with in_netns(self.netns_path):
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            listener.settimeout(0.2)    # the accept loop checks _stop this often
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"nsrelay-accept-{self.port}")
        self._acceptor.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._acceptor is not None:
            self._acceptor.join(10)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for s in self._sockets:
                _shutdown(s)
        for t in self._threads:
            t.join(10)
        with self._lock:
            for s in self._sockets:
                s.close()
            self._sockets.clear()
        self._threads.clear()

    # -- relay ----------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stop.is_set():
                    client.close()
                    upstream.close()
                    return
                self.connections += 1
                self._sockets.update((client, upstream))
                for src, dst in ((client, upstream), (upstream, client)):
                    t = threading.Thread(target=self._pump, args=(src, dst), daemon=True,
                                         name=f"nsrelay-pump-{self.port}")
                    self._threads.append(t)
                    t.start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        # pass the end of stream on; the other direction may still be busy
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _shutdown(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
