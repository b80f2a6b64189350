"""``coilctl ipam check`` at 150,000 address records, against its peer in
the same run: coil-controller's leak scan over the same etcd (the same
paged read and join, without the Node list and the extra categories).

Run: ``pytest bench/test_bench_ipamcheck.py --benchmark-only -s``.

The check must stay within a small factor of the scan (the ratio is
asserted), and run in seconds. Pods and Nodes are served by the leak-scan
benchmark's stub of the API client (500 Pods, 8 Nodes).
"""

from __future__ import annotations

import json
import time

from test_bench_leakscan import DAY, PODS, StubCore, _created, _pods_json

N = 150_000
RATIO_MAX = 1.6


class StubCoreWithNodes(StubCore):
    def __init__(self, items, nodes):
        super().__init__(items)
        self.nodes = nodes

    def list_node(self, limit=None, _continue=None, **_):
        body = {"kind": "NodeList", "metadata": {"resourceVersion": "1"},
                "items": [{"metadata": {"name": n}} for n in self.nodes]}

        class Resp:
            data = json.dumps(body).encode()

            def release_conn(self):
                pass
        return Resp()


def test_ipam_check_150k_against_the_leak_scan(benchmark, store):
    from coil.controller import audit
    from coil.controller.scan import LeakScanner
    from leakdata import plant_addresses
    now = time.time()
    nodes = [f"node-{k}" for k in range(8)]
    planted = plant_addresses(store, "default", "10.64.0.0/12", N, nodes, _created(now))
    held = [planted[i][0] for i in range(0, N, N // PODS)]
    core = StubCoreWithNodes(_pods_json(held), nodes[:-1])      # node-7 is gone
    scanner = LeakScanner(store, core, expiration=DAY, clock=lambda: now)

    times = []          # timed here: with --benchmark-disable there are no stats

    def check():
        t0 = time.perf_counter()
        report = audit.check(store, core, (), min_age=DAY, clock=lambda: now)
        times.append(time.perf_counter() - t0)
        return report

    report = benchmark.pedantic(check, rounds=3, iterations=1, warmup_rounds=0)
    assert report["summary"]["addresses"] == N
    assert report["summary"]["blocks_of_missing_nodes"] == sum(
        1 for b in range(N // 32 + (N % 32 > 0)) if b % 8 == 7)
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        scanner.scan()
        t.append(time.perf_counter() - t0)
    scan_s = min(t)
    check_s = min(times)
    ratio = check_s / scan_s
    benchmark.extra_info.update(addresses=N, check_s=round(check_s, 2), scan_s=round(scan_s, 2),
                                ratio=round(ratio, 2))
    print(f"\nipam check {N} records: {check_s:.2f}s; leak scan (peer) {scan_s:.2f}s; "
          f"ratio {ratio:.2f}")
    assert ratio < RATIO_MAX, f"ipam check is {ratio:.2f}x the leak scan"
