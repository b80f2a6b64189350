"""coil-controller's leak scan at 10,000 and 100,000 addresses.

Run: ``pytest bench/test_bench_leakscan.py --benchmark-only -s``.

- ``join``: the set join alone (``find_leaks`` + ``find_unknown``) over
  Address records already in memory, with 500 Pod addresses;
- ``scan``: a whole ``LeakScanner.scan()`` against a real etcd holding the
  planted addresses (paged read + decode + join + report), with the Pod
  list served by a stub of the API client (500 Pods, pages of 500).

Each test also measures the peak Python memory of one run with tracemalloc
(a separate run: tracemalloc slows Python down) and stores seconds and
MiB in the benchmark's ``extra_info``; ``-s`` prints them.
"""

from __future__ import annotations

import ipaddress
import json
import time
import tracemalloc

import pytest

SIZES = [10_000, 100_000]
PODS = 500
DAY = 86400.0


def _created(now):
    from leakdata import iso
    old, young = iso(now - 3 * DAY), iso(now - 60)
    return lambda i: old if i % 100 == 0 else young


def _pods_json(ips):
    items = [{"metadata": {"namespace": "bench", "name": f"p{k}"},
              "spec": {"nodeName": "n0"},
              "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}
             for k, ip in enumerate(ips)]
    return items


class StubCore:
    """``list_pod_for_all_namespaces`` as the real client with _preload_content=False."""

    def __init__(self, items, page=500):
        self.items, self.page = items, page

    def list_pod_for_all_namespaces(self, limit=None, _continue=None, **_):
        start = int(_continue or 0)
        end = start + (limit or self.page)
        body = {"kind": "PodList", "metadata": {"resourceVersion": "1"},
                "items": self.items[start:end]}
        if end < len(self.items):
            body["metadata"]["continue"] = str(end)

        class Resp:
            data = json.dumps(body).encode()

            def release_conn(self):
                pass
        return Resp()


def _peak(fn):
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
        return tracemalloc.get_traced_memory()[1] / 2**20, seconds
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
def test_join(benchmark, n):
    from coil.controller.scan import find_leaks, find_unknown, pod_ips_from_items
    from coil.store.model import Address
    now = time.time()
    created = _created(now)
    base = int(ipaddress.ip_address("10.64.0.0"))
    addresses = []
    for i in range(n):
        block = base + (i // 32) * 32
        addresses.append(Address(str(ipaddress.ip_address(base + i)),
                                 f"{ipaddress.ip_address(block)}/27", i % 32, "ns", f"p{i}",
                                 f"c{i}", created(i), i + 1))
    held = [addresses[i].address for i in range(0, n, n // PODS)]          # every 100th is old
    pods = pod_ips_from_items(_pods_json(held + [f"10.79.255.{k}" for k in range(1, 11)]))
    networks = [ipaddress.ip_network("10.64.0.0/12")]

    def join():
        leaks = find_leaks(addresses, pods.held, now, DAY)
        etcd_ips = {a.address for a in addresses}
        unknown = find_unknown(pods.active, etcd_ips, networks)
        return leaks, unknown

    leaks, unknown = benchmark(join)
    expected = sum(1 for i in range(0, n, 100)) - sum(1 for i in range(0, n, n // PODS)
                                                       if i % 100 == 0)
    assert len(leaks) == expected and len(unknown) == 10
    peak, seconds = _peak(join)
    benchmark.extra_info.update(addresses=n, peak_mib=round(peak, 1))
    print(f"\njoin {n:>7} addresses: {benchmark.stats.stats.mean if benchmark.stats else seconds:.3f}s"
          f" mean, peak {peak:.1f} MiB")


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
def test_scan(benchmark, store, n):
    from coil.controller.scan import LeakScanner
    from leakdata import plant_addresses
    now = time.time()
    t0 = time.perf_counter()
    planted = plant_addresses(store, "default", "10.64.0.0/12", n,
                              [f"node-{k}" for k in range(8)], _created(now))
    plant_s = time.perf_counter() - t0
    held = [planted[i][0] for i in range(0, n, n // PODS)]
    core = StubCore(_pods_json(held))
    scanner = LeakScanner(store, core, expiration=DAY, clock=lambda: now)
    result = benchmark.pedantic(scanner.scan, rounds=3, iterations=1, warmup_rounds=0)
    assert result.addresses == n
    assert len(result.leaks) == sum(1 for i in range(0, n, 100)) - sum(
        1 for i in range(0, n, n // PODS) if i % 100 == 0)
    assert result.unknown == []
    peak, seconds = _peak(scanner.scan)
    mean = benchmark.stats.stats.mean if benchmark.stats else result.seconds
    benchmark.extra_info.update(addresses=n, peak_mib=round(peak, 1), plant_s=round(plant_s, 2))
    print(f"\nscan {n:>7} addresses: {mean:.2f}s mean (planting took {plant_s:.1f}s), "
          f"peak {peak:.1f} MiB")
    if not benchmark.disabled:      # make bench; make test's smoke run times nothing
        assert mean < 10, f"the scan of {n} addresses took {mean:.1f}s"
