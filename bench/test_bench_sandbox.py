"""How long ``hypercoil sandbox up`` takes, and what one pod costs.

* 3 nodes x 10 pods: the README's promise, under 15 s on a 2-core machine
  (asserted by ``make bench``; ``make test``'s smoke run asserts no time;
  ``check`` must pass in both);
* 10 nodes x 50 pods (``slow``, not run by ``make test``): total time and
  the per-pod cost (pod phase / pods).

Each round is a whole ``up`` (fabric, etcd, 3 coild, 3 BIRD, pods through
libcni, BGP convergence); ``down`` runs untimed between rounds and at the
end. Everything is inside the sandbox's own namespaces under a private
state directory. Phase times and per-pod cost go to extra_info.
"""

from __future__ import annotations

import os
import uuid

import pytest

from helpers import need_sandbox

from coil.sandbox.cluster import Config, Sandbox




def run_up(benchmark, nodes: int, pods: int, rounds: int, check: bool) -> dict:
    need_sandbox()
    rand = uuid.uuid4().hex[:6]
    sb = Sandbox(f"/run/coil-bench-{rand}")
    results = []

    def fresh():
        sb.down()
        return (), {}

    def up():
        results.append(sb.up(Config(nodes=nodes, pods=pods, name=f"cbn{rand}")))

    try:
        benchmark.pedantic(up, setup=fresh, rounds=rounds, iterations=1)
        last = results[-1]
        if check:
            res = sb.check()
            assert res["ok"], res["failures"]
    finally:
        sb.down()
        sb.close()
    best = min(results, key=lambda r: r["seconds"])
    per_pod_ms = 1000 * best["phases"]["pods"] / best["pods"]
    benchmark.extra_info.update({
        "nodes": nodes, "pods": best["pods"], "up_seconds": [round(r["seconds"], 2) for r in results],
        "phases": best["phases"], "per_pod_ms": round(per_pod_ms, 1),
        "cpus": os.cpu_count()})
    times = ", ".join(f"{r['seconds']:.2f}s" for r in results)
    print(f"\nsandbox up {nodes}x{pods}: {times}; "
          f"phases {best['phases']}; {per_pod_ms:.1f} ms per pod")
    assert last["pods"] == nodes * pods + 1
    return best


def test_up_3_nodes_10_pods(benchmark):
    best = run_up(benchmark, 3, 10, rounds=3, check=True)
    if not benchmark.disabled:      # make bench; make test's smoke run times nothing
        assert best["seconds"] < 15


@pytest.mark.slow
def test_up_10_nodes_50_pods(benchmark):
    best = run_up(benchmark, 10, 50, rounds=1, check=False)
    if not benchmark.disabled:
        assert best["seconds"] < 120
