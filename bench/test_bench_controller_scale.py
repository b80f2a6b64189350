"""coil-controller with thousands of Node objects on the real kube-apiserver.

Run the full size: ``pytest bench/test_bench_controller_scale.py -m slow -s``
(5,000 Nodes); ``make test`` runs 200 as a smoke test.

Nodes are created directly through the API (no kubelet). Measured:

- relist: ``NodeWatcher.list_nodes()`` (pages of 500, names only kept),
  median of 3, and its peak Python memory (tracemalloc, separate run);
- the ``coil-controller`` process (``python -m coil coil-controller``):
  time from start to ``/readyz`` (the first paged list done), and its RSS
  (VmRSS, and the peak VmHWM) once ready with every Node known;
- a deleted Node's blocks (the 5,000-Node run only): 10 Nodes hold a block
  each in etcd; their Node objects are deleted while the controller runs,
  and the time until every one of their blocks is freed is reported (with
  the shortest ``--node-grace-period`` where the controller has one).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import statistics
import subprocess
import sys
import time
import tracemalloc
import urllib.request
import uuid

import pytest

from helpers import free_port, wait_for

DELETED = 10


def rss_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def grace_flags() -> tuple[list[str], float]:
    """The shortest node grace period, where coil-controller has one."""
    out = subprocess.run([sys.executable, "-m", "coil", "coil-controller", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    if "--node-grace-period" in out:
        return ["--node-grace-period", "1m"], 60.0
    return [], 0.0


def run(kube_apiserver, store, etcd_config, tmp_path, nodes: int,
        free_blocks: bool = True) -> dict:
    from coil.controller.watcher import NodeWatcher
    admin = kube_apiserver.core()
    tag = uuid.uuid4().hex[:8]
    names = [f"bench-{tag}-{i:05d}" for i in range(nodes)]
    proc = None
    try:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda n: admin.create_node(
                {"metadata": {"name": n, "labels": {"coil-bench": tag}}}), names))
        create_s = time.perf_counter() - t0

        w = NodeWatcher(admin, lambda names: None, lambda name: None, page_size=500)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            listed, _ = w.list_nodes()
            times.append(time.perf_counter() - t0)
        assert set(names) <= listed
        tracemalloc.start()
        try:
            w.list_nodes()
            list_peak = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()

        store.create_pool("default", "10.0.0.0/16", 5)
        doomed = names[:DELETED]
        for n in doomed:
            store.acquire_block("default", n)
        flags, grace = grace_flags()
        port = free_port()
        kc = kube_apiserver.kubeconfig(None, str(tmp_path / "kubeconfig"))
        log = open(tmp_path / "controller.log", "wb")
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "coil", "coil-controller",
                                 "--etcd-endpoints", etcd_config.endpoints[0],
                                 "--etcd-prefix", etcd_config.prefix, "--kubeconfig", kc,
                                 "--metrics-addr", f"127.0.0.1:{port}", *flags],
                                stdout=log, stderr=log)
        wait_for(lambda: proc.poll() is not None or ready(port), 300, what="controller ready")
        assert proc.poll() is None, (tmp_path / "controller.log").read_text()
        ready_s = time.perf_counter() - t0
        time.sleep(2)
        mem = rss_kib(proc.pid)

        freed_s = None
        if free_blocks:
            t0 = time.perf_counter()
            for n in doomed:
                admin.delete_node(n)
            wait_for(lambda: not any(store.node_blocks(n) for n in doomed), grace + 600,
                     interval=0.2, what="blocks of deleted nodes freed")
            freed_s = round(time.perf_counter() - t0, 2)
            assert all(store.node_blocks(n) == [] for n in doomed)
        report = {"nodes": nodes, "create_s": round(create_s, 1),
                  "relist_median_s": round(statistics.median(times), 3),
                  "relist_peak_mib": round(list_peak, 1),
                  "controller_ready_s": round(ready_s, 2),
                  "controller_rss_mib": round(mem["VmRSS"] / 1024, 1),
                  "controller_peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
                  "deleted_nodes_freed_s": freed_s, "node_grace_s": grace}
        print(f"\n{nodes} Nodes (created in {report['create_s']} s): relist "
              f"{report['relist_median_s']} s, peak {report['relist_peak_mib']} MiB (Python heap); "
              f"coil-controller ready in {report['controller_ready_s']} s, RSS "
              f"{report['controller_rss_mib']} MiB (peak {report['controller_peak_rss_mib']} MiB); "
              f"blocks of {DELETED} deleted Nodes freed in {freed_s} s (grace period {grace} s)")
        return report
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        admin.delete_collection_node(label_selector=f"coil-bench={tag}")


def test_controller_200_nodes(benchmark, kube_apiserver, store, etcd_config, tmp_path):
    box = {}
    benchmark.pedantic(lambda: box.setdefault(
        "r", run(kube_apiserver, store, etcd_config, tmp_path, 200, free_blocks=False)),
        rounds=1, iterations=1)
    benchmark.extra_info.update(box["r"])
    assert box["r"]["controller_rss_mib"] > 0


@pytest.mark.slow
def test_controller_5000_nodes(benchmark, kube_apiserver, store, etcd_config, tmp_path):
    box = {}
    benchmark.pedantic(lambda: box.setdefault(
        "r", run(kube_apiserver, store, etcd_config, tmp_path, 5000)), rounds=1, iterations=1)
    benchmark.extra_info.update(box["r"])
