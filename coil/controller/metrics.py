"""coil-controller's Prometheus metrics (own registry, served at GET /metrics
on ``--metrics-addr`` together with /healthz and /readyz)."""

from __future__ import annotations

import threading

# (name, help) of the capacity gauges, in the order of set_capacity's tuple
CAPACITY_METRICS = (
    ("coil_controller_pool_blocks", "blocks a pool's subnets can hold"),
    ("coil_controller_pool_blocks_free", "blocks of the pool no node holds"),
    ("coil_controller_pool_addresses", "addresses in a pool's subnets"),
    ("coil_controller_pool_addresses_free", "addresses of the pool not held in etcd "
                                            "(in free blocks and in held blocks)"),
)


class ControllerMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily
        r = self.registry = CollectorRegistry()
        self.scan_seconds = Histogram(
            "coil_controller_scan_duration_seconds", "time of one leak scan",
            registry=r, buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.scans = Counter("coil_controller_scans_total", "leak scans", ["result"], registry=r)
        self.last_scan = Gauge("coil_controller_last_scan_timestamp_seconds",
                               "when the last successful leak scan finished", registry=r)
        self.leaked = Gauge("coil_controller_leaked_addresses",
                            "addresses held in etcd by no Pod and older than the expiration "
                            "(last scan)", registry=r)
        self.leaks_found = Counter("coil_controller_leaked_addresses_found_total",
                                   "leaked addresses reported, summed over scans", registry=r)
        self.leaks_released = Counter("coil_controller_leaked_addresses_released_total",
                                      "leaked addresses freed (--release-leaked)", registry=r)
        self.unknown = Gauge("coil_controller_unknown_pod_addresses",
                             "Pod addresses in coil's pools that etcd does not hold (last scan)",
                             registry=r)
        self.nodes_cleaned = Counter("coil_controller_deleted_nodes_total",
                                     "deleted nodes whose blocks were freed", registry=r)
        self.blocks_freed = Counter("coil_controller_blocks_freed_total",
                                    "blocks freed because their node was deleted", registry=r)
        self.addresses_freed = Counter("coil_controller_node_addresses_freed_total",
                                       "addresses freed with the blocks of deleted nodes",
                                       registry=r)
        self.nodes_waiting = Gauge("coil_controller_gone_nodes_waiting",
                                   "nodes whose Node object is gone but whose blocks are kept "
                                   "(grace period running, or their coild is alive)", registry=r)
        self.leaks_suspected = Gauge("coil_controller_leak_suspects",
                                     "addresses found leaked by one scan, waiting for the "
                                     "second look", registry=r)
        self.leaks_exempt = Gauge("coil_controller_leak_exempt_addresses",
                                  "leaked addresses never freed automatically (REST without "
                                  "opt-in, unknown origin, unreadable created_at; last scan)",
                                  registry=r)
        self.watch_restarts = Counter("coil_controller_node_watch_restarts_total",
                                      "node watch restarts", ["reason"], registry=r)
        self.api_errors = Counter("coil_controller_api_errors_total",
                                  "failed Kubernetes API requests", ["resource"], registry=r)
        self.store_errors = Counter("coil_controller_etcd_errors_total",
                                    "failed etcd operations", ["operation"], registry=r)
        self._lock = threading.Lock()
        self._blocks: dict[tuple[str, str], int] = {}
        self._addresses: dict[str, int] = {}
        self._have_blocks = False
        self._have_addresses = False
        self._capacity: dict[str, tuple] = {}
        self._have_capacity = False
        metrics = self

        class _State:
            def collect(inner):
                with metrics._lock:
                    blocks = dict(metrics._blocks)
                    addresses = dict(metrics._addresses)
                    have_blocks, have_addresses = metrics._have_blocks, metrics._have_addresses
                if have_blocks:
                    fam = GaugeMetricFamily("coil_controller_blocks", "address blocks held",
                                            labels=["pool", "node"])
                    for (pool, node), n in sorted(blocks.items()):
                        fam.add_metric([pool, node], n)
                    yield fam
                if have_addresses:
                    fam = GaugeMetricFamily("coil_controller_addresses_in_use",
                                            "addresses held in etcd", labels=["pool"])
                    for pool, n in sorted(addresses.items()):
                        fam.add_metric([pool], n)
                    yield fam
                with metrics._lock:
                    capacity = dict(metrics._capacity) if metrics._have_capacity else None
                if capacity is not None:
                    for i, (name, text) in enumerate(CAPACITY_METRICS):
                        fam = GaugeMetricFamily(name, text, labels=["pool"])
                        for pool, values in sorted(capacity.items()):
                            fam.add_metric([pool], values[i])
                        yield fam
        r.register(_State())

    def set_blocks(self, blocks):
        """Blocks per (pool, node) from a list of store Blocks."""
        counts: dict[tuple[str, str], int] = {}
        for b in blocks:
            key = (b.pool, b.node)
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            self._blocks = counts
            self._have_blocks = True

    def blocks_released(self, blocks):
        """Take freed store Blocks off the per-(pool, node) counts, so that
        freeing a node's blocks costs no re-read of every block."""
        with self._lock:
            for b in blocks:
                key = (b.pool, b.node)
                left = self._blocks.get(key, 0) - 1
                if left > 0:
                    self._blocks[key] = left
                else:
                    self._blocks.pop(key, None)

    def set_capacity(self, pools, blocks, in_use_by_pool: dict[str, int]):
        """Capacity per pool from what a scan read anyway (the pools, every
        held block, the addresses in use per pool): no request of its own,
        refreshed with each scan."""
        held: dict[str, int] = {}
        for b in blocks:
            held[b.pool] = held.get(b.pool, 0) + 1
        capacity = {}
        for p in pools:
            blocks_total = sum(n.num_addresses >> p.block_size for n in p.subnets)
            addresses_total = sum(n.num_addresses for n in p.subnets)
            capacity[p.name] = (blocks_total, blocks_total - held.get(p.name, 0),
                                addresses_total,
                                addresses_total - in_use_by_pool.get(p.name, 0))
        with self._lock:
            self._capacity = capacity
            self._have_capacity = True

    def set_addresses(self, by_pool: dict[str, int]):
        with self._lock:
            self._addresses = dict(by_pool)
            self._have_addresses = True

    def render(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
