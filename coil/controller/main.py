"""``hypercoil coil-controller``: Kubernetes housekeeping for coil.

Three threads and a small HTTP server:

- the node watcher (list, then watch; relist on 410 Gone),
- the node janitor (frees blocks of deleted nodes, retried with backoff),
- the leak scanner (every ``--scan-interval``),
- ``--metrics-addr``: GET /metrics (Prometheus), /healthz, /readyz.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from coil import config as cfg
from coil.cliutil import etcd_flags, etcd_options, open_store, run_click
from coil.coild.connections import BoundedHTTPServer, Limits, RequestHandler, listen_tcp
from coil.errors import CoilError, InvalidArgument, KubernetesError

log = logging.getLogger("coil-controller")

ENV_PREFIX = "COIL_CONTROLLER_ETCD_"
MIN_ADDRESS_EXPIRATION = 60.0


class Controller:
    def __init__(self, store, core, *, scan_interval: float = 600.0,
                 address_expiration: float = 86400.0, release_leaked: bool = False,
                 metrics=None, watch_timeout: int = 300, scan_backoff_max: float = 300.0,
                 page_size: int = 500, node_grace: float = 300.0, node_recheck: float = 30.0,
                 clock=None, wall_clock=None):
        """``clock`` (monotonic) times the node grace period and ``wall_clock``
        (epoch seconds) the leak scan; both are injectable for tests."""
        import time
        from coil.controller.janitor import NodeJanitor
        from coil.controller.metrics import ControllerMetrics
        from coil.controller.scan import LeakScanner
        from coil.controller.watcher import Backoff, NodeWatcher
        self.store = store
        self.core = core
        self.scan_interval = scan_interval
        self.stop_event = threading.Event()
        self.metrics = metrics or ControllerMetrics()
        self.janitor = NodeJanitor(store, core, stop_event=self.stop_event, metrics=self.metrics,
                                   grace=node_grace, recheck=node_recheck,
                                   clock=clock or time.monotonic)
        self.watcher = NodeWatcher(core, self.janitor.nodes_synced, self.janitor.node_deleted,
                                   stop_event=self.stop_event, metrics=self.metrics,
                                   watch_timeout=watch_timeout, page_size=page_size)
        self.scanner = LeakScanner(store, core, expiration=address_expiration,
                                   release=release_leaked, metrics=self.metrics,
                                   page_size=page_size, clock=wall_clock or time.time,
                                   min_gap=scan_interval)
        self.scan_backoff = Backoff(1.0, max(1.0, min(scan_interval, scan_backoff_max)))
        self.last_scan = None
        self.scan_requested = threading.Event()
        self._threads: list[threading.Thread] = []
        self._http = None

    # -- lifecycle ----------------------------------------------------------------
    def start(self, metrics_addr: str | None = None):
        if metrics_addr:
            self._http = _serve(metrics_addr, self)
        for name, target in (("node-watch", self.watcher.run), ("node-cleanup", self.janitor.run),
                             ("leak-scan", self.scan_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("coil-controller started", extra={
            "scan_interval_s": self.scan_interval,
            "address_expiration_s": self.scanner.expiration,
            "release_leaked": self.scanner.release, "node_grace_s": self.janitor.grace,
            "metrics_addr": metrics_addr})
        return self

    def stop(self):
        self.stop_event.set()
        self.watcher.stop()
        self.janitor.wake()
        self.scan_requested.set()

    def wait(self, timeout: float | None = None):
        self.stop_event.wait(timeout)

    def shutdown(self, timeout: float = 10.0):
        self.stop()
        for t in self._threads:
            t.join(timeout)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        log.info("coil-controller stopped")

    def healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def ready(self) -> bool:
        return self.healthy() and self.watcher.synced.is_set()

    # -- leak scan loop -------------------------------------------------------------
    def scan_loop(self):
        delay = 0.0                      # first scan right away
        while not self.stop_event.is_set():
            if delay:
                self.scan_requested.wait(delay)
                self.scan_requested.clear()
                if self.stop_event.is_set():
                    break
            try:
                self.last_scan = self.scanner.scan()
            except CoilError as exc:
                delay = self.scan_backoff.next()
                self.metrics.scans.labels("error").inc()
                self.metrics.store_errors.labels("scan").inc()
                log.warning("leak scan failed: nothing was freed; retrying", extra={
                    "error": exc.one_line(), "retry_s": round(delay, 2)})
                continue
            except Exception as exc:         # noqa: BLE001 - keep the loop alive
                from coil import k8s
                delay = self.scan_backoff.next()
                self.metrics.scans.labels("error").inc()
                if isinstance(exc, k8s.transient_errors()):
                    self.metrics.api_errors.labels("pods").inc()
                    log.warning("leak scan failed: nothing was freed; retrying", extra={
                        "error": k8s.describe(exc), "retry_s": round(delay, 2)})
                else:                        # a bug or a malformed answer: with traceback
                    log.error("leak scan failed: nothing was freed; retrying", exc_info=True,
                              extra={"error": k8s.describe(exc), "retry_s": round(delay, 2)})
                continue
            self.scan_backoff.reset()
            delay = self.scan_interval


class _Handler(RequestHandler):
    controller: Controller = None

    def do_GET(self):
        c = self.controller
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype = c.metrics.render()
            self._send(200, body, ctype)
        elif path == "/healthz":
            ok = c.healthy()
            self._send(200 if ok else 503, b"ok\n" if ok else b"a worker thread died\n")
        elif path == "/readyz":
            ok = c.ready()
            self._send(200 if ok else 503, b"ok\n" if ok else b"nodes not listed yet\n")
        else:
            self._send(404, b"not found\n")

    def _send(self, code, body, ctype="text/plain; charset=utf-8"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        pass


def parse_addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise InvalidArgument(f"invalid --metrics-addr {value!r}: expected [HOST]:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


# the metrics listener may face the network (host networking): bounded like
# coild's REST listeners, idle or slow clients cost no thread
METRICS_LIMITS = Limits(max_connections=64, workers=2, read_timeout=10.0, idle_timeout=60.0,
                        max_body=0)


def _serve(addr: str, controller: Controller):
    host, port = parse_addr(addr)
    handler = type("Handler", (_Handler,), {"controller": controller})
    sock = listen_tcp("--metrics-addr", host, port, backlog=64)
    server = BoundedHTTPServer(sock, handler, METRICS_LIMITS, "metrics")
    server.server_address = sock.getsockname()
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def _duration(value: str, flag: str, allow_zero: bool = False) -> float:
    seconds = cfg.parse_duration(value, flag)
    if seconds <= 0 and not allow_zero:
        raise InvalidArgument(f"invalid {flag} {value!r}: must be positive")
    return seconds


def resolve_with_retry(econf, api, stop_event: threading.Event):
    """Resolve ``@NAME`` endpoints, retrying while the API server is unreachable.
    None when stopped meanwhile; bad content (InvalidArgument) and refused
    credentials raise at once."""
    from coil.controller.watcher import Backoff
    from coil.k8s import resolve_etcd_endpoints
    backoff = Backoff(0.5, 30.0)
    while True:
        try:
            return resolve_etcd_endpoints(econf, api)
        except KubernetesError as exc:
            if getattr(exc, "status", 0) in (401, 403):
                raise
            delay = backoff.next()
            log.warning("cannot read the etcd Endpoints; retrying", extra={
                "error": exc.one_line(), "retry_s": round(delay, 2)})
            if stop_event.wait(delay):
                return None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@etcd_options
@click.option("--scan-interval", default="10m", show_default=True,
              help="how often held addresses are compared with Pod addresses")
@click.option("--address-expiration", default="24h", show_default=True,
              help="an address held by no Pod for longer than this is reported as leaked")
@click.option("--release-leaked", is_flag=True, default=False,
              help="free leaked addresses (found by two scans in a row) instead of only "
                   "reporting them")
@click.option("--node-grace-period", default="5m", show_default=True,
              help="a node's blocks are freed only after its Node object has been gone this "
                   "long (at least 1m) and its coild's liveness lease has expired")
@click.option("--metrics-addr", default=":9384", show_default=True,
              help="[HOST]:PORT for /metrics, /healthz and /readyz (empty to disable)")
@click.option("--kubeconfig", default=None,
              help="kubeconfig file [default: $KUBECONFIG, else the in-cluster service account]")
@click.option("--list-page-size", default=500, show_default=True, type=click.IntRange(1, 10000),
              help="Nodes and Pods are listed in pages of this many objects (memory is one page)")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def cli(scan_interval, address_expiration, release_leaked, node_grace_period, metrics_addr,
        kubeconfig, list_page_size, log_level, **kwargs):
    """Frees the blocks of dead nodes and finds leaked addresses."""
    from coil import k8s, logutil
    logutil.setup(log_level)
    # the client's own connection retries are logged by urllib3; ours say more
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    interval = _duration(scan_interval, "--scan-interval")
    expiration = _duration(address_expiration, "--address-expiration")
    if expiration < MIN_ADDRESS_EXPIRATION:
        raise InvalidArgument(f"invalid --address-expiration {address_expiration!r}: "
                              f"must be at least 1m")
    from coil.controller.janitor import MIN_GRACE
    grace = _duration(node_grace_period, "--node-grace-period")
    if grace < MIN_GRACE:
        raise InvalidArgument(f"invalid --node-grace-period {node_grace_period!r}: "
                              f"must be at least 1m")
    if metrics_addr:
        parse_addr(metrics_addr)
    econf = cfg.resolve(etcd_flags(kwargs), ENV_PREFIX)
    api = k8s.api_client(kubeconfig)
    core = k8s.core_api(api)
    stop_event = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_event.set())
    signal.signal(signal.SIGINT, lambda *_: stop_event.set())
    econf = resolve_with_retry(econf, api, stop_event)
    if econf is None:               # stopped while waiting for the API server
        return
    store = open_store(econf)
    try:
        if not _refuse_v1_store(store, stop_event):
            return
    except BaseException:
        store.close()
        raise
    controller = Controller(store, core, scan_interval=interval, address_expiration=expiration,
                            release_leaked=release_leaked, page_size=list_page_size,
                            node_grace=grace)
    controller.start(metrics_addr or None)
    try:
        while not stop_event.wait(1.0):
            if not controller.healthy():
                raise CoilError("a worker thread of coil-controller died; see the log")
    finally:
        controller.shutdown()
        store.close()


def _refuse_v1_store(store, stop_event: threading.Event) -> bool:
    """Raise V1StoreDetected on a Coil v1 store; wait while etcd is down.
    False when stopped while waiting."""
    from coil.errors import StoreUnavailable
    from coil.store.v1 import refuse_if_v1
    delay = 0.5
    while True:
        try:
            refuse_if_v1(store.etcd, "coil-controller")
            return True
        except StoreUnavailable as exc:
            log.warning("waiting for etcd", extra={"error": exc.one_line(), "retry_s": delay})
            if stop_event.wait(delay):
                return False
            delay = min(delay * 2, 10.0)


def main(argv: list[str]) -> int:
    return run_click(cli, argv, "coil-controller")


if __name__ == "__main__":      # errors end in the one boundary, as for 'hypercoil coil-controller'
    from coil.hypercoil import run_role
    sys.exit(run_role("coil-controller", sys.argv[1:], main))
