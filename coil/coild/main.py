"""``hypercoil coild``: parse options, build the daemon, run until SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import click

from coil import config as cfg
from coil.cni.protocol import DEFAULT_SOCKET
from coil.coild import DEFAULT_API_SOCKET, TEARDOWN_BATCH, TEARDOWN_DELAY
from coil.cliutil import etcd_flags, etcd_options, open_store, run_click
from coil.errors import CoilError, InvalidArgument

log = logging.getLogger("coild")
UNRESOLVED_RESCAN = 5.0     # seconds: the next scan while an unknown outcome waits


class Coild:
    """The node daemon: allocator + routes + pod network + the two servers."""

    def __init__(self, node: str, store, table_id: int = 119, protocol_id: int = 30,
                 scan_interval: float = 600.0, teardown_batch: int = TEARDOWN_BATCH,
                 teardown_delay: float = TEARDOWN_DELAY, liveness_ttl: float = 30.0):
        from coil.coild.allocator import NodeAllocator
        from coil.coild.heartbeat import LivenessKeeper
        from coil.cni.service import CNIService
        from coil.coild.metrics import CoildMetrics
        from coil.coild.podnet import PodNetwork
        from coil.coild.pools import PoolResolver
        from coil.coild.routes import RouteExporter
        from coil.coild.teardown import TeardownQueue
        self.node = node
        self.store = store
        self.scan_interval = scan_interval
        self.routes = RouteExporter(table_id, protocol_id)
        self.allocator = NodeAllocator(store, node, on_block_added=lambda b: self.routes.add(b.cidr),
                                       on_block_removed=lambda b: self.routes.remove(b.cidr))
        self.podnet = PodNetwork()
        self.pools = PoolResolver(store)
        self.metrics = CoildMetrics(self)
        # the deletion queue also cleans up at start and stop; --teardown-batch 0
        # keeps it out of DEL (each DEL deletes its veth pair before answering)
        self.teardown = TeardownQueue(self.podnet, batch=max(1, teardown_batch),
                                      delay=teardown_delay)
        self.cni = CNIService(self.allocator, self.podnet, self.pools, self.metrics,
                              teardown=self.teardown if teardown_batch > 0 else None)
        self.cni.ready = self.check_ready          # STATUS: 50 unless coild serves
        self._stop = threading.Event()
        self.liveness = LivenessKeeper(store.etcd, node, liveness_ttl, self._stop)
        self._servers = []
        self._plugin = None
        self.ready = False
        self.cpus = "off"        # --cpu-affinity as applied (coil.coild.cpus), for the log

    def start(self, http: str | None, socket_path: str, api_socket: str | None = None,
              limits=None):
        """Claim the listeners, load state, reconcile table 119, then serve.

        The REST listener and the API socket are bound, and the plugin
        socket checked, before anything is written or removed: a second
        coild started by mistake (same node, a port or socket in use) stops
        there, before it could rewrite the liveness record, remove table 119
        routes or delete the veths of pods it does not know.

        Raises AlreadyExists (an address or socket in use), InvalidArgument."""
        from coil.coild.connections import Limits
        from coil.coild.server import ApiSocketServer, RestServer, _claim_socket
        limits = limits or Limits()
        bound = []                       # (server, thread name): bound, not served yet
        try:
            if api_socket:
                bound.append((ApiSocketServer(api_socket, self, limits), "api"))
            if http:
                host, _, port = http.rpartition(":")
                bound.append((RestServer((host.strip("[]") or "127.0.0.1", int(port)), self,
                                         limits, api_socket=api_socket), "rest"))
            _claim_socket(socket_path, "--socket")  # refuses when a coild listens there
            self._start(bound, socket_path, limits)
        except BaseException:
            for server, _ in bound:
                if server not in self._servers:
                    server.server_close()
            raise
        log.info("coild started", extra={"node": self.node, "socket": socket_path, "http": http,
                                         "api_socket": api_socket, "cpus": self.cpus})

    def _start(self, bound, socket_path, limits):
        from coil.coild.server import PluginServer, serve_in_thread
        from coil.errors import StoreUnavailable
        delay = 0.5
        from coil.store.v1 import refuse_if_v1
        while True:                      # etcd may come up after us: wait for it
            try:
                refuse_if_v1(self.store.etcd, "coild")   # never read or write a v1 store
                self._refuse_another_nodes_table()
                # liveness next: from now on coil-controller's guarded release
                # of this node's blocks fails, so what load() reads stays ours
                self.liveness.ensure()
                self.allocator.load()
                break
            except StoreUnavailable as exc:
                log.warning("waiting for etcd", extra={"error": exc.one_line(), "retry_s": delay})
                if self._stop.wait(delay):
                    raise
                delay = min(delay * 2, 10.0)
        added, removed = self.routes.sync(b.cidr for b in self.allocator.blocks())
        # DELs answered before a crash may have left retired veths: delete
        # them, and any coil veth whose address record is gone, before serving
        # (each record keeps its attachment's host-end name and its pod's
        # older name: a pair made before attachments were keyed)
        from coil.coild.podnet import host_veth_names
        self.teardown.start()
        self.teardown.reconcile({name for r in self.allocator.records()
                                 for name in host_veth_names(r)})
        log.info("state loaded", extra={"node": self.node, "blocks": len(self.allocator.blocks()),
                                        "addresses": self.allocator.count(),
                                        "routes_added": sorted(added),
                                        "routes_removed": sorted(removed)})
        for server, name in bound:
            self._servers.append(server)
            serve_in_thread(server, name)
        # the plugin socket last: once it answers, every listener does
        plugin = PluginServer(socket_path, self, max_connections=limits.max_connections)
        self._servers.append(plugin)
        self._plugin = plugin
        serve_in_thread(plugin, "plugin")
        self.pools.start()
        threading.Thread(target=self.liveness.run, name="liveness", daemon=True).start()
        self.ready = True

    def _refuse_another_nodes_table(self):
        """Refuse to start (AlreadyExists) when the export table holds coil
        routes of blocks that etcd gives to another node whose coild is
        alive: another coild serves this network namespace under that name
        (a wrong COIL_NODE_NAME here, or there), and reconciling would
        remove its routes and its pods' veths. Costs one read of this node's
        blocks when the table holds routes, and more only when some are
        not this node's. A node renamed on purpose starts once the old
        name's liveness lease has expired (--liveness-ttl)."""
        from coil.errors import AlreadyExists
        from coil.store import liveness
        have = self.routes.current()
        if not have:
            return
        foreign = have - {b.cidr for b in self.store.node_blocks(self.node)}
        if not foreign:
            return
        owners = {b.cidr: b.node for b in self.store.all_blocks() if b.cidr in foreign}
        for cidr, owner in sorted(owners.items()):
            if owner != self.node and liveness.read(self.store.etcd, owner) is not None:
                raise AlreadyExists(
                    f"table {self.routes.table} of this network namespace holds the route of "
                    f"block {cidr}, which node {owner!r} holds, and {owner!r}'s coild is "
                    f"alive: another coild serves this namespace as {owner!r}",
                    hint=f"the node name must be the Node's name (this coild was given "
                         f"{self.node!r}); stop the other coild or fix COIL_NODE_NAME")

    def status(self) -> dict:
        """GET /status. v1's keys keep v1's shape: ``address-blocks`` (pool ->
        blocks), ``pods`` (container ID -> its address; the IPv4 one when a
        container holds two), ``status``. Additions are new keys: ``version``,
        ``node``, ``pod-addresses`` ("<namespace>/<pod>" -> every address),
        ``table-routes`` (the block routes now in the export table, read from
        the kernel: ``coilctl ipam check --coild`` compares them with etcd),
        ``unreachable-routes`` (the blocks' unreachable routes in the main
        table, read from the kernel)."""
        import ipaddress
        from coil import __version__
        snap = self.allocator.snapshot()
        pods: dict[str, str] = {}
        for rec in sorted(self.allocator.records(),
                          key=lambda r: (ipaddress.ip_address(r.address).version, r.address)):
            # v1.0.2 and older keyed an address by "<namespace>/<pod>" (no container ID)
            pods.setdefault(rec.container_id or f"{rec.namespace}/{rec.pod}", rec.address)
        return {"address-blocks": snap["blocks"], "pods": pods, "status": 200,
                "version": __version__, "node": self.node, "pod-addresses": snap["pods"],
                "table-routes": sorted(self.routes.current()),
                "unreachable-routes": sorted(self.routes.current_unreachable())}

    READY_BUDGET = 2.0      # a readiness probe answers well within kubelet's patience

    def check_ready(self):
        """Raise unless coild serves: state loaded and some etcd member
        answers a linearizable read (any member will do: the store fails
        over). Raises CoilError (starting) or StoreUnavailable."""
        if not self.ready:
            raise CoilError("coild is starting")
        self.store.etcd.ping(budget=min(self.store.etcd.timeout, self.READY_BUDGET))

    def too_large(self) -> bytes:
        import json
        from coil.cni import spec
        return json.dumps(spec.error_object(spec.ERR_DECODE, "request too large")).encode()

    def scan(self):
        """Return empty blocks, reload from etcd, reconcile the table."""
        self.allocator.load()
        returned = self.allocator.return_empty_blocks()
        self.routes.sync(b.cidr for b in self.allocator.blocks())
        if returned:
            log.info("returned empty blocks", extra={"blocks": [b.cidr for b in returned]})

    def _scan_due(self, last: float, now: float) -> bool:
        # a write whose outcome stayed unknown is resolved by the next reload:
        # run it within UNRESOLVED_RESCAN rather than a whole scan interval later
        return now - last >= self.scan_interval or self.allocator.unresolved()

    def run(self):
        last = time.monotonic()
        while not self._stop.wait(min(self.scan_interval, UNRESOLVED_RESCAN)):
            now = time.monotonic()
            if not self._scan_due(last, now):
                continue
            last = now
            try:
                self.scan()
            except CoilError as exc:
                log.warning("scan failed", extra={"error": exc.one_line()})
        self.shutdown()

    def stop(self):
        self._stop.set()

    def shutdown(self):
        """Stop accepting, let the requests in flight finish (each ends by its
        deadline: done, or rolled back), then close the etcd client."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()
        self._reached("shutdown:closed")
        inflight = self.cni.inflight()
        if inflight:
            log.info("draining requests in flight", extra={"requests": inflight})
        if not self.cni.drain(self.cni.request_timeout):
            log.warning("requests still in flight at exit",
                        extra={"requests": self.cni.inflight()})
        elif self._plugin is not None:
            # a request is done before its worker has sent the answer: wait
            # for that too, or the plugin may read a cut-off answer
            self._plugin.wait_idle(5.0)
        self.teardown.close()          # after the drain: no DEL comes any more
        self.pools.stop()
        self.store.close()
        log.info("coild stopped")

    def _reached(self, point: str):
        """A no-op pause point; tests monkeypatch it."""


def _validate_http(value: str) -> str:
    if not value:
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"invalid --http {value!r}: expected HOST:PORT")
    return value


def _positive(value: str, flag: str) -> float:
    seconds = cfg.parse_duration(value, flag)
    if seconds <= 0:
        raise InvalidArgument(f"invalid {flag} {value!r}: must be positive")
    return seconds


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@etcd_options
@click.option("--http", default="127.0.0.1:9383", show_default=True,
              help="REST endpoint HOST:PORT (empty to disable)")
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
              help="UNIX socket the coil plugin talks to (root-only)")
@click.option("--api-socket", default=DEFAULT_API_SOCKET, show_default=True,
              help="root-only UNIX socket serving the whole REST API, including POST and "
                   "DELETE /ip (empty to disable)")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="open connections per REST listener, and plugin connections at once")
@click.option("--api-workers", default=8, show_default=True, type=click.IntRange(1, 256),
              help="threads answering REST requests, per listener")
@click.option("--read-timeout", default="10s", show_default=True,
              help="a REST request (line, headers, body) must arrive within this")
@click.option("--idle-timeout", default="60s", show_default=True,
              help="REST keep-alive connections idle for longer are closed")
@click.option("--table-id", default=119, show_default=True, type=click.IntRange(1, 2**31 - 1),
              help="routing table where address blocks are published")
@click.option("--protocol-id", default=30, show_default=True, type=click.IntRange(5, 255),
              help="route protocol id of the published routes")
@click.option("--scan-interval", default="10m", show_default=True,
              help="how often empty blocks are returned to the pool")
@click.option("--teardown-batch", default=TEARDOWN_BATCH, show_default=True, type=click.IntRange(0, 100000),
              help="delete retired pod veths as soon as this many wait "
                   "(0: every DEL deletes its veth before it answers)")
@click.option("--teardown-delay", default=f"{TEARDOWN_DELAY * 1000:g}ms", show_default=True,
              help="delete retired pod veths at most this long after a DEL")
@click.option("--liveness-ttl", default="30s", show_default=True,
              help="TTL of the etcd lease under which node-alive/<node> is kept (3s..1h)")
@click.option("--cpu-affinity", default="auto", show_default=True,
              help="CPUs all of coild's threads run on: auto (one CPU of those allowed, "
                   "chosen by the node name), off (the kernel places them) or a list such as "
                   "3 or 2-3. One CPU spares the GIL's hand-overs between CPUs")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def cli(http, socket_path, api_socket, max_connections, api_workers, read_timeout, idle_timeout,
        table_id, protocol_id, scan_interval, teardown_batch, teardown_delay, liveness_ttl,
        cpu_affinity, log_level, **kwargs):
    """Node daemon: address blocks, pod networks, table 119 export.

    Needs COIL_NODE_NAME in the environment."""
    from coil import logutil
    from coil.store.model import validate_node_name
    logutil.setup(log_level)
    node = os.environ.get("COIL_NODE_NAME", "")
    if not node:
        raise InvalidArgument("COIL_NODE_NAME is not set", hint="set it to this node's name")
    validate_node_name(node)
    interval = cfg.parse_duration(scan_interval, "--scan-interval")
    if interval <= 0:
        raise InvalidArgument(f"invalid --scan-interval {scan_interval!r}: must be positive")
    delay = cfg.parse_duration(teardown_delay, "--teardown-delay")
    _validate_http(http)
    from coil.coild.heartbeat import MAX_TTL, MIN_TTL
    ttl = cfg.parse_duration(liveness_ttl, "--liveness-ttl")
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise InvalidArgument(f"invalid --liveness-ttl {liveness_ttl!r}: must be 3s..1h")
    from coil.coild.connections import Limits
    limits = Limits(max_connections=max_connections, workers=api_workers,
                    read_timeout=_positive(read_timeout, "--read-timeout"),
                    idle_timeout=_positive(idle_timeout, "--idle-timeout"))
    if api_socket and not os.path.isabs(api_socket):
        raise InvalidArgument(f"invalid --api-socket {api_socket!r}: must be an absolute path")
    if api_socket and os.path.abspath(api_socket) == os.path.abspath(socket_path):
        raise InvalidArgument(f"--api-socket and --socket are both {socket_path}: "
                              f"they must differ")
    from coil.coild import cpus
    # before the etcd client and the servers start their threads (they
    # inherit it); pin() also moves the threads that already run
    pinned = cpus.apply(cpu_affinity, node)
    econf = cfg.resolve(etcd_flags(kwargs), "COILD_ETCD_")
    store = open_store(econf)
    daemon = Coild(node, store, table_id, protocol_id, interval, teardown_batch, delay, ttl)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    daemon.cpus = pinned
    try:
        daemon.start(http, socket_path, api_socket or None, limits)
    except BaseException:
        daemon.shutdown()
        raise
    daemon.run()


def main(argv: list[str]) -> int:
    return run_click(cli, argv, "coild")


if __name__ == "__main__":      # errors end in the one boundary, as for 'hypercoil coild'
    from coil.hypercoil import run_role
    sys.exit(run_role("coild", sys.argv[1:], main))
