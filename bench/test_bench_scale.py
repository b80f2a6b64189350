"""A 5,000-node cluster against one real etcd, with simulated nodes.

Run the full size (about 10 minutes on 2 cores):
``COIL_BENCH_OUT=docs/img pytest bench/test_bench_scale.py -m slow -s``.
``make test`` runs the smoke size (300 nodes) and asserts ratios only.

Each simulated node is a ``NodeAllocator`` with its own node name, the one
coild uses, with a no-op ``on_block_added`` (no netlink, no routes). In node
order, by ``THREADS`` threads, every node:

1. assigns 30 addresses (the first one takes the node's first block),
2. releases 10 of them.

Reported (printed, and written as ``scale-<nodes>.json`` plus a plot of p99
against node count, ``scale-<nodes>-p99.png``, into ``$COIL_BENCH_OUT`` or
the test's temporary directory):

- total time; p50/p99 of block acquisition and address assignment per band
  of node count (the node's index when it did the operation), next to a
  reference whose cost does not depend on the cluster (one GET of the pool
  key per node, in the same threads) and the machine's load average after
  each band: on a shared machine, what moves all three is the machine;
- etcd's own request counters (``grpc_server_handled_total`` from its
  ``/metrics``) per operation, measured in phases that do only that
  operation: ADD, DEL, coild's periodic scan (``NodeAllocator.load`` +
  ``return_empty_blocks``), block acquisition in a crowded pool;
- the etcd database size and key count at the end;
- coil-controller's leak scan (``LeakScanner.scan``) over every address
  record: time and peak Python memory (tracemalloc, a separate run);
- flatness: the median ``acquire_block`` with ``FLAT_HELD`` blocks held in
  its pool against an empty pool of the same size, samples interleaved
  in the same run (the target is <= 1.5x).

The plot needs matplotlib (``pip install -e '.[bench]'``); without it the
benchmark still runs and reports, and says that it made no plot.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import re
import statistics
import threading
import time
import tracemalloc
import urllib.request

import pytest

ADDRESSES = 30
RELEASED = 10
THREADS = 4
POOL = "default"
POOL_SUBNET = "10.0.0.0/12"        # 32,768 blocks of 32
BLOCK_SIZE = 5
FLAT_SUBNETS = ("10.64.0.0/10", "10.128.0.0/10")   # 131,072 blocks each: empty, crowded
DAY = 86400.0

SMOKE = {"nodes": 300, "band": 100, "flat_held": 2000, "flat_samples": 150, "phase": 100}
FULL = {"nodes": 5000, "band": 1000, "flat_held": 20000, "flat_samples": 300, "phase": 1000}


# -- etcd --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scale_etcd():
    """An etcd of its own: its counters and database size are this benchmark's."""
    from helpers import etcd_in_tmpdir
    with etcd_in_tmpdir("coil-scale-etcd-") as server:
        yield server


@pytest.fixture
def scale_store(scale_etcd):
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    prefix = f"/scale-{time.time_ns()}/"
    s = IPAMStore(Etcd(EtcdConfig(endpoints=(scale_etcd.endpoint,), prefix=prefix, timeout=30.0)))
    try:
        yield s
    finally:
        s.close()


_METRIC = re.compile(r'^(\w+)(?:\{([^}]*)\})? ([0-9.e+-]+)$')


def etcd_metrics(server) -> dict:
    """Txn/Range counts handled, DB size and key count, from etcd's /metrics."""
    with urllib.request.urlopen(f"{server.endpoint}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {"Range": 0, "Txn": 0, "Put": 0, "DeleteRange": 0, "db_bytes": 0, "keys": 0}
    for line in text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "grpc_server_handled_total" and 'grpc_service="etcdserverpb.KV"' in labels:
            method = re.search(r'grpc_method="(\w+)"', labels).group(1)
            out[method] = out.get(method, 0) + int(value)
        elif name == "etcd_mvcc_db_total_size_in_bytes":
            out["db_bytes"] = int(value)
        elif name == "etcd_debugging_mvcc_keys_total":
            out["keys"] = int(value)
    return out


def per_op(server, before: dict, n: int) -> dict:
    after = etcd_metrics(server)
    return {m: round((after[m] - before[m]) / n, 3) for m in ("Range", "Txn")}


# -- the simulated cluster ------------------------------------------------------------

class TimedStore:
    """The store as a NodeAllocator sees it, timing acquire_block and
    assign_address per node index (the node count when the call was made)."""

    def __init__(self, store, index: int, samples: dict):
        self._store, self._index, self._samples = store, index, samples

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _timed(self, kind, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._samples[kind].append((self._index, time.perf_counter() - t0))

    def acquire_block(self, *args):
        return self._timed("acquire", self._store.acquire_block, *args)

    def assign_address(self, *args):
        return self._timed("assign", self._store.assign_address, *args)


def run_node(store, index: int, samples: dict):
    from coil.coild.allocator import NodeAllocator
    alloc = NodeAllocator(TimedStore(store, index, samples), f"node-{index:05d}",
                          on_block_added=lambda b: None)
    alloc.load()
    t0 = time.perf_counter()            # the reference: a read whose cost is constant
    store.etcd.get(f"pool/{POOL}")
    samples["reference"].append((index, time.perf_counter() - t0))
    for k in range(ADDRESSES):
        alloc.allocate(POOL, 4, "bench", f"pod-{k}", f"n{index}-c{k}")
    for k in range(RELEASED):
        for rec in alloc.lookup(f"n{index}-c{k}"):       # what the CNI DEL does
            alloc.release_address(rec)
    return alloc


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bands(samples, band: int, nodes: int) -> list[dict]:
    rows = []
    for lo in range(0, nodes, band):
        row = {"nodes": f"{lo}-{min(lo + band, nodes)}", "upper": min(lo + band, nodes)}
        for kind in ("acquire", "assign", "reference"):
            vals = [s for i, s in samples[kind] if lo <= i < lo + band]
            row[kind] = {"n": len(vals), "p50_ms": round(percentile(vals, 0.5) * 1e3, 3),
                         "p99_ms": round(percentile(vals, 0.99) * 1e3, 3)}
        rows.append(row)
    return rows


def hold_blocks(store, pool: str, subnet: str, count: int):
    """Mark ``count`` blocks held by other nodes, spread over the subnet (60
    block keys and their index entries per transaction): setup only."""
    import ipaddress

    from coil.store import keys
    net = ipaddress.ip_network(subnet)
    step = (net.num_addresses >> BLOCK_SIZE) // count
    base = int(net.network_address)
    ops = []
    for i in range(count):
        cidr = f"{ipaddress.ip_address(base + ((i * step) << BLOCK_SIZE))}/{32 - BLOCK_SIZE}"
        node = f"other-{i % 5000}"
        ops += [("put", keys.block(pool, cidr),
                 json.dumps({"node": node, "subnet": subnet, "acquired_at": ""}).encode()),
                ("put", keys.node_block(node, cidr), pool.encode())]
        if len(ops) >= 120:
            store.etcd.txn([], ops)
            ops = []
    if ops:
        store.etcd.txn([], ops)


def flatness(store, server, held: int, samples: int) -> dict:
    """Median acquire_block, empty pool vs a pool with ``held`` blocks held,
    interleaved; and etcd requests per acquisition in the crowded pool."""
    store.create_pool("flat-empty", FLAT_SUBNETS[0], BLOCK_SIZE)
    store.create_pool("flat-held", FLAT_SUBNETS[1], BLOCK_SIZE)
    hold_blocks(store, "flat-held", FLAT_SUBNETS[1], held)
    times = {"flat-empty": [], "flat-held": []}
    for i in range(samples + 10):
        for pool in (("flat-empty", "flat-held") if i % 2 else ("flat-held", "flat-empty")):
            t0 = time.perf_counter()
            b = store.acquire_block(pool, "bench-node")
            dt = time.perf_counter() - t0
            assert store.release_block(b)
            if i >= 10:                       # warm-up
                times[pool].append(dt)
    before = etcd_metrics(server)
    taken = [store.acquire_block("flat-held", "bench-node") for _ in range(50)]
    requests = per_op(server, before, 50)
    for b in taken:
        assert store.release_block(b)
    empty = statistics.median(times["flat-empty"])
    crowded = statistics.median(times["flat-held"])
    return {"held": held, "samples": samples, "empty_median_ms": round(empty * 1e3, 3),
            "held_median_ms": round(crowded * 1e3, 3),
            "held_p99_ms": round(percentile(times["flat-held"], 0.99) * 1e3, 3),
            "ratio": round(crowded / empty, 3), "etcd_requests_per_acquire": requests}


def leak_scan(store, addresses: int) -> dict:
    from test_bench_leakscan import StubCore, _pods_json

    from coil.controller.scan import LeakScanner
    recs, _ = store.all_addresses_paged()
    core = StubCore(_pods_json([a.address for a in recs[::200]]))
    scanner = LeakScanner(store, core, expiration=DAY)
    t0 = time.perf_counter()
    result = scanner.scan()
    seconds = time.perf_counter() - t0
    assert result.addresses == addresses and result.leaks == [] and result.unknown == []
    tracemalloc.start()
    try:
        scanner.scan()
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return {"addresses": addresses, "seconds": round(seconds, 2), "peak_mib": round(peak, 1)}


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = [r["upper"] for r in report["bands"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, label in (("acquire", "block acquire"), ("assign", "address assign (ADD)")):
        ax.plot(xs, [r[kind]["p99_ms"] for r in report["bands"]], marker="o", label=f"{label} p99")
        ax.plot(xs, [r[kind]["p50_ms"] for r in report["bands"]], marker=".", linestyle="--",
                label=f"{label} p50")
    ax.plot(xs, [r["reference"]["p99_ms"] for r in report["bands"]], marker="s", color="grey",
            label="reference: GET pool key p99")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["loadavg"] for r in report["bands"]], color="black", linestyle=":",
             label="machine load average (right)")
    ax2.set_ylabel("load average (2 cores)")
    ax2.set_ylim(bottom=0)
    ax2.legend(loc="upper right")
    ax.set_xlabel("nodes in the cluster")
    ax.set_ylabel("ms")
    ax.set_ylim(bottom=0)
    ax.set_title(f"coil on one etcd: {report['nodes']} simulated nodes, "
                 f"{THREADS} threads, 2 cores")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def simulate(store, server, size: dict, out_dir: str) -> dict:
    nodes, band = size["nodes"], size["band"]
    store.create_pool(POOL, POOL_SUBNET, BLOCK_SIZE)
    samples = {"acquire": [], "assign": [], "reference": []}
    lock = threading.Lock()
    allocs = {}

    def one(i):
        a = run_node(store, i, samples)
        with lock:
            allocs[i] = a

    loads = []                           # 1-minute load average after each band
    before = etcd_metrics(server)
    t0 = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
            for lo in range(0, nodes, band):
                for f in [pool.submit(one, i) for i in range(lo, min(lo + band, nodes))]:
                    f.result()
                # One process holds every simulated node's state; a real coild
                # holds one node's. Keep Python's cyclic GC from rescanning
                # the growing heap: that cost would be the simulation's.
                gc.collect()
                gc.freeze()
                loads.append(os.getloadavg()[0])
    finally:
        gc.unfreeze()
    total = time.perf_counter() - t0
    load = os.getloadavg()
    after = etcd_metrics(server)
    requests_total = {m: after[m] - before[m] for m in ("Range", "Txn")}

    # steady state, each phase alone: ADD and DEL on held blocks, coild's scan
    phase = min(size["phase"], nodes)
    chosen = [allocs[i] for i in range(0, nodes, max(1, nodes // phase))][:phase]
    m0 = etcd_metrics(server)
    added = [a.allocate(POOL, 4, "bench", "extra", f"{a.node}-extra") for a in chosen]
    add_requests = per_op(server, m0, len(chosen))
    m0 = etcd_metrics(server)
    for a, rec in zip(chosen, added):
        a.release_address(rec)
    del_requests = per_op(server, m0, len(chosen))
    m0 = etcd_metrics(server)
    for a in chosen:
        a.load()
        a.return_empty_blocks()
    scan_requests = per_op(server, m0, len(chosen))
    assert all(r is not None for r in added)

    held_blocks = store.etcd.count_prefix("block/default/")
    held_addresses = store.etcd.count_prefix("ip/")
    assert held_blocks == nodes and held_addresses == nodes * (ADDRESSES - RELEASED)
    sample = store.etcd.get_prefix_paged("ip/", 500)[0][:500]
    bytes_per_record = statistics.mean(len(store.etcd.prefix) + len(kv.key) + len(kv.value)
                                       for kv in sample)

    flat = flatness(store, server, size["flat_held"], size["flat_samples"])
    scan = leak_scan(store, held_addresses) if nodes >= 1000 else None
    end = etcd_metrics(server)
    report = {
        "nodes": nodes, "threads": THREADS, "seconds": round(total, 1),
        "loadavg_after_run": [round(x, 2) for x in load],
        "operations": {"acquire": len(samples["acquire"]), "assign": len(samples["assign"]),
                       "release": nodes * RELEASED},
        "bands": [dict(b, loadavg=round(l, 1)) for b, l in zip(bands(samples, band, nodes), loads)],
        "etcd_requests_total": requests_total,
        "etcd_requests_per": {"ADD": add_requests, "DEL": del_requests,
                              "coild scan (1 block)": scan_requests},
        "address_record_bytes": round(bytes_per_record, 1),
        "etcd_db_bytes": end["db_bytes"], "etcd_keys": end["keys"],
        "flatness": flat, "leak_scan": scan,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"scale-{nodes}.json"), "w") as f:
        json.dump(report, f, indent=1)
    png = os.path.join(out_dir, f"scale-{nodes}-p99.png")
    report["plot"] = png if plot(report, png) else "not made: matplotlib is not installed"
    print_report(report)
    return report


def print_report(r: dict):
    print(f"\n{r['nodes']} simulated nodes, {r['threads']} threads: {r['seconds']} s, "
          f"load average after {r['loadavg_after_run']} "
          f"({r['operations']['acquire']} block acquisitions, {r['operations']['assign']} "
          f"assigns, {r['operations']['release']} releases)")
    print(f"{'nodes':>12} | {'acquire p50':>11} {'p99':>8} | {'assign p50':>10} {'p99':>8} | "
          f"{'ref GET p50':>11} {'p99':>8}  (ms) | load")
    for b in r["bands"]:
        print(f"{b['nodes']:>12} | {b['acquire']['p50_ms']:>11.2f} {b['acquire']['p99_ms']:>8.2f} | "
              f"{b['assign']['p50_ms']:>10.2f} {b['assign']['p99_ms']:>8.2f} | "
              f"{b['reference']['p50_ms']:>11.2f} {b['reference']['p99_ms']:>8.2f}       | "
              f"{b['loadavg']}")
    print(f"etcd requests, whole run: {r['etcd_requests_total']}")
    for what, v in r["etcd_requests_per"].items():
        print(f"etcd requests per {what}: {v}")
    f = r["flatness"]
    print(f"acquire_block median: empty {f['empty_median_ms']} ms, {f['held']} blocks held "
          f"{f['held_median_ms']} ms (p99 {f['held_p99_ms']} ms): ratio {f['ratio']}; "
          f"etcd requests per acquisition {f['etcd_requests_per_acquire']}")
    print(f"etcd: {r['etcd_db_bytes'] / 2**20:.1f} MiB database, {r['etcd_keys']} keys; "
          f"{r['address_record_bytes']} bytes of key+value per address record")
    if r["leak_scan"]:
        s = r["leak_scan"]
        print(f"leak scan: {s['addresses']} addresses in {s['seconds']} s, "
              f"peak {s['peak_mib']} MiB (Python heap)")
    print(f"plot: {r['plot']}")


def out_dir(tmp_path) -> str:
    return os.environ.get("COIL_BENCH_OUT") or str(tmp_path)


def measured(benchmark, fn):
    """Run ``fn`` once under pytest-benchmark (so ``make bench`` with
    --benchmark-only runs it too) and keep its report in extra_info."""
    box = {}
    benchmark.pedantic(lambda: box.setdefault("r", fn()), rounds=1, iterations=1)
    r = box["r"]
    benchmark.extra_info.update({k: v for k, v in r.items() if k != "bands"})
    return r


def test_scale_smoke(benchmark, scale_store, scale_etcd, tmp_path):
    """A few hundred nodes: one etcd transaction per ADD and per DEL, no range
    read on either, and block acquisition as fast with 2,000 blocks held as
    with none (ratio of medians in the same run)."""
    r = measured(benchmark, lambda: simulate(scale_store, scale_etcd, SMOKE, out_dir(tmp_path)))
    assert r["etcd_requests_per"]["ADD"] == {"Range": 0, "Txn": 1}
    assert r["etcd_requests_per"]["DEL"] == {"Range": 0, "Txn": 1}
    assert r["flatness"]["ratio"] <= 1.5, r["flatness"]
    assert r["flatness"]["etcd_requests_per_acquire"]["Range"] == 1      # the pool key
    assert r["operations"]["acquire"] == SMOKE["nodes"]


@pytest.mark.slow
def test_scale_5000_nodes(benchmark, scale_store, scale_etcd, tmp_path):
    r = measured(benchmark, lambda: simulate(scale_store, scale_etcd, FULL, out_dir(tmp_path)))
    assert r["etcd_requests_per"]["ADD"] == {"Range": 0, "Txn": 1}
    assert r["flatness"]["ratio"] <= 1.5, r["flatness"]
