"""A real coild and --cpu-affinity: every one of its threads - those that
run at start-up and those started later (plugin workers, the etcd client's)
- is on the CPU chosen, and a bad value stops coild with one line."""

from __future__ import annotations

import os

import pytest

from coil.coild import cpus
from test_coild_cni import add, cluster, coild_with_flags, pod_ip  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def thread_cpus(pid: int) -> dict:
    """tid -> Cpus_allowed_list of each thread of process ``pid``."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                out[tid] = next(ln.split()[1] for ln in f if ln.startswith("Cpus_allowed_list:"))
        except (FileNotFoundError, ProcessLookupError):
            pass                       # a thread that ended meanwhile
    return out


def started_line(cluster) -> dict:
    return next(r for r in cluster.coild.records() if r.get("msg") == "coild started")


def serve_some(cluster):
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert cluster.cni.call("del", pod, "c1", "default", "c1") == (0, None)
    return pod_ip(res)


def test_auto_puts_every_thread_on_one_cpu(cluster):
    cluster.store.create_pool("default", "10.47.0.0/24", 4)
    cluster.start()                                      # the default: auto
    serve_some(cluster)
    want = cpus.choose("auto", cluster.coild.node_name)
    expect = cpus.format_cpus(want) if want else cpus.format_cpus(cpus.allowed())
    threads = thread_cpus(cluster.coild.proc.pid)
    assert len(threads) >= 5                             # servers, workers, gRPC, ...
    assert set(threads.values()) == {expect}
    assert started_line(cluster)["cpus"] == (expect if want else "off")


def test_a_list_is_used_as_given_and_off_leaves_the_kernel_to_place(cluster):
    cluster.store.create_pool("default", "10.47.1.0/24", 4)
    last = max(cpus.allowed())
    cluster.coild.extra = ["--cpu-affinity", str(last)]
    cluster.start()
    serve_some(cluster)
    assert set(thread_cpus(cluster.coild.proc.pid).values()) == {str(last)}
    assert started_line(cluster)["cpus"] == str(last)
    cluster.coild.stop()
    cluster.coild.extra = ["--cpu-affinity", "off"]
    cluster.coild.start()
    serve_some(cluster)
    assert set(thread_cpus(cluster.coild.proc.pid).values()) == {cpus.format_cpus(cpus.allowed())}


@pytest.mark.parametrize("value", ["fast", "3-1", "99999", "0-70000"])
def test_bad_cpu_affinity_stops_coild_with_one_line(cluster, value):
    r, sock = coild_with_flags(cluster, "--cpu-affinity", value)
    assert r.returncode != 0
    assert "--cpu-affinity" in r.stderr and repr(value) in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 3
    assert not os.path.exists(sock)
