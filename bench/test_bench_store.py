"""IPAM store throughput against a real etcd (no timed asserts).

Run: ``pytest bench/test_bench_store.py --benchmark-only``.

- block acquire + release, one process: each round takes one block of a
  large pool and gives it back (two guarded transactions plus the reads
  of acquire_block);
- address assign + release, one process: one guarded transaction each;
- eight processes, eight nodes, each assigning and releasing addresses in
  its own block for ``COIL_BENCH_SECONDS`` (default 3) seconds; the
  aggregate rate is printed and stored in the benchmark's ``extra_info``.

Rates are reported in operations per second where one operation is one
store call (acquire, release, assign, release); ``pairs/s`` counts the
take-and-give-back round trips.

Run as a script (``python test_bench_store.py SPEC_JSON``) this file is the
worker of the multi-process benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def worker(spec: dict) -> dict:
    """Assign and release addresses in one block until the window closes."""
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd

    store = IPAMStore(Etcd(EtcdConfig(endpoints=(spec["endpoint"],), prefix=spec["prefix"],
                                      timeout=20.0)))
    block = store.acquire_block(spec["pool"], spec["node"])
    with open(spec["ready"], "w"):
        pass
    while not os.path.exists(spec["go"]):
        time.sleep(0.002)
    start = time.perf_counter()
    end = start + spec["seconds"]
    pairs = taken = 0
    offset = 0
    while time.perf_counter() < end:
        a = store.assign_address(block, offset, "bench", "pod", f"c-{offset}")
        if a is None:
            taken += 1
        else:
            if not store.release_address(block.cidr, offset, a.revision):
                raise SystemExit(f"could not release {a.address}")
            pairs += 1
        offset = (offset + 1) % block.size
    elapsed = time.perf_counter() - start
    store.release_block(block)
    store.close()
    return {"pairs": pairs, "taken": taken, "seconds": elapsed}


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    _result = worker(_spec)
    with open(_spec["out"] + ".tmp", "w") as _f:
        json.dump(_result, _f)
    os.rename(_spec["out"] + ".tmp", _spec["out"])
    sys.exit(0)


PROCESSES = 8
SECONDS = float(os.environ.get("COIL_BENCH_SECONDS", "3"))


def report(benchmark, what: str, ops_per_call: int):
    stats = benchmark.stats.stats if benchmark.stats else None
    if stats is None or not stats.mean:
        return
    pairs = 1.0 / stats.mean
    benchmark.extra_info["pairs_per_s"] = round(pairs, 1)
    benchmark.extra_info["ops_per_s"] = round(pairs * ops_per_call, 1)
    print(f"\n{what}: {pairs:.0f} pairs/s = {pairs * ops_per_call:.0f} ops/s "
          f"(mean {stats.mean * 1000:.2f} ms per pair)")


def test_block_acquire_release(benchmark, store):
    store.create_pool("default", "10.0.0.0/16", 5)      # 2048 blocks

    def cycle():
        b = store.acquire_block("default", "bench-node")
        if not store.release_block(b):
            raise AssertionError(f"could not release {b.cidr}")

    benchmark.pedantic(cycle, rounds=200, iterations=1, warmup_rounds=10)
    report(benchmark, "block acquire+release, 1 process", 2)
    assert store.all_blocks() == []


def test_block_acquire_release_crowded_pool(benchmark, store):
    """The same with 500 blocks already taken by other nodes (of 2,048): the
    pool is larger than SMALL_POOL_BLOCKS, so acquire_block reads none of
    them (random guarded create); the rate should match the empty pool's."""
    store.create_pool("default", "10.0.0.0/16", 5)
    for i in range(500):
        store.acquire_block("default", f"other-{i % 20}")

    def cycle():
        b = store.acquire_block("default", "bench-node")
        if not store.release_block(b):
            raise AssertionError(f"could not release {b.cidr}")

    benchmark.pedantic(cycle, rounds=100, iterations=1, warmup_rounds=5)
    report(benchmark, "block acquire+release, 500 blocks taken, 1 process", 2)


def test_address_assign_release(benchmark, store):
    store.create_pool("default", "10.0.0.0/16", 5)
    block = store.acquire_block("default", "bench-node")
    state = {"offset": 0}

    def cycle():
        offset = state["offset"]
        state["offset"] = (offset + 1) % block.size
        a = store.assign_address(block, offset, "bench", "pod", "cid")
        if a is None or not store.release_address(block.cidr, offset, a.revision):
            raise AssertionError(f"offset {offset} of {block.cidr} was not free")

    benchmark.pedantic(cycle, rounds=500, iterations=1, warmup_rounds=20)
    report(benchmark, "address assign+release, 1 process", 2)
    assert store.count_addresses(block.cidr) == 0


def run_processes(etcd_server, etcd_prefix, tmp_path) -> list[dict]:
    specs = [{"endpoint": etcd_server.endpoint, "prefix": etcd_prefix, "pool": "default",
              "node": f"bench-{i}", "seconds": SECONDS, "ready": str(tmp_path / f"ready-{i}"),
              "go": str(tmp_path / "go"), "out": str(tmp_path / f"out-{i}.json")}
             for i in range(PROCESSES)]
    procs = []
    try:
        for spec in specs:
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                           json.dumps(spec)],
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
        deadline = time.time() + 60
        while not all(os.path.exists(s["ready"]) for s in specs):
            assert time.time() < deadline, "workers did not start within 60 s"
            assert all(p.poll() is None for p in procs), "a worker died while starting"
            time.sleep(0.02)
        open(specs[0]["go"], "w").close()
        for p in procs:
            out, _ = p.communicate(timeout=SECONDS + 60)
            assert p.returncode == 0, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.load(open(s["out"])) for s in specs]


def test_address_assign_release_8_processes(benchmark, store, etcd_server, etcd_prefix,
                                            tmp_path):
    store.create_pool("default", "10.0.0.0/16", 5)
    results = {}

    def run():
        results["workers"] = run_processes(etcd_server, etcd_prefix, tmp_path)

    benchmark.pedantic(run, rounds=1, iterations=1)
    workers = results["workers"]
    pairs = sum(w["pairs"] for w in workers)
    window = max(w["seconds"] for w in workers)
    rate = pairs / window
    benchmark.extra_info.update(processes=PROCESSES, seconds=round(window, 2),
                                pairs=pairs, pairs_per_s=round(rate, 1),
                                ops_per_s=round(2 * rate, 1),
                                per_process_pairs=[w["pairs"] for w in workers])
    print(f"\naddress assign+release, {PROCESSES} processes for {window:.1f}s: "
          f"{rate:.0f} pairs/s = {2 * rate:.0f} ops/s aggregate "
          f"(per process: {', '.join(str(w['pairs']) for w in workers)} pairs)")
    assert all(w["taken"] == 0 for w in workers)
    assert store.all_addresses()[0] == []
    assert store.all_blocks() == []
