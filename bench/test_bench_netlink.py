"""Benchmarks of the two rtnetlink backends, side by side.

Run: ``.venv/bin/pytest bench/test_bench_netlink.py`` (root; everything
happens inside throw-away ``coiltest-*`` network namespaces, removed at the
end even on failure).

Groups (each has a ``cython`` and a ``python`` (pyroute2) entry):

* ``veth``: veth_add with the peer created in another namespace + link_del,
  i.e. the per-pod ADD/DEL cost;
* ``veth_add``: veth_add alone (the link_del runs untimed in the setup);
  link_del of a veth costs ~10-15 ms of kernel time (RCU grace periods)
  whichever backend asks;
* ``veth into B``: how a veth end gets into the pod namespace, ``direct``
  (veth_add with ``peer_netns``, what coild does) vs ``move`` (veth_add in
  the node namespace, then link_get + link_set(peer, netns=pod)); the
  move makes the kernel unregister the device and register it again in
  the other namespace (an RCU grace period: median ~16 ms vs ~0.6 ms
  direct here, 15-25 ms depending on the kernel), hence coild's direct way;
* ``open``: open_netlink(netns=path) + close, done once per pod ADD;
* ``route``: route_add + route_del (table 119, protocol 30);
* ``link_get``: one small request/reply, the per-call overhead;
* ``route_list``: dump of ~260 routes;
* ``delete 30 veths``: 30 veth pairs (peers in the other namespace)
  deleted ``one by one`` (30 link_del) or ``by group`` (link_set into a
  link group, untimed, then one link_del_group: one kernel batch), what
  coild's deletion queue does.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import uuid

import pytest

BACKENDS = ["cython", "python"]


def _module(name):
    if name == "cython":
        try:
            return importlib.import_module("coil.net._netlink")
        except ImportError as exc:
            if os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0"):
                pytest.fail(f"coil.net._netlink is not built: {exc}")
            pytest.skip(f"coil.net._netlink is not built: {exc}")
    return importlib.import_module("coil.net._netlink_py")


@pytest.fixture
def netns_pair():
    """Two fresh namespaces (paths), deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    names = []
    try:
        for _ in range(2):
            name = f"coiltest-{uuid.uuid4().hex[:10]}"
            subprocess.run(["ip", "netns", "add", name], check=True,
                           capture_output=True, timeout=20)
            names.append(name)
        yield tuple(f"/run/netns/{n}" for n in names)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True,
                           timeout=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_veth_add_del(benchmark, netns_pair, backend):
    benchmark.group = "veth add (peer in other netns) + del"
    mod = _module(backend)
    node, pod = netns_pair
    with mod.open_netlink(node) as nl:
        def cycle():
            nl.veth_add("veth-bench", "eth0", peer_netns=pod, mtu=1450)
            nl.link_del("veth-bench")
        benchmark.pedantic(cycle, rounds=100, iterations=1, warmup_rounds=3)
        assert nl.link_get("veth-bench") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_veth_add_only(benchmark, netns_pair, backend):
    benchmark.group = "veth add alone (peer in other netns)"
    mod = _module(backend)
    node, pod = netns_pair
    with mod.open_netlink(node) as nl:
        def setup():
            nl.link_del("veth-bench")

        def add():
            nl.veth_add("veth-bench", "eth0", peer_netns=pod, mtu=1450)
        benchmark.pedantic(add, setup=setup, rounds=100, iterations=1,
                           warmup_rounds=3)
        assert nl.link_del("veth-bench")


@pytest.mark.parametrize("how", ["direct", "move"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_veth_into_other_netns(benchmark, netns_pair, backend, how):
    benchmark.group = "veth end into netns B: direct peer_netns vs create+move"
    mod = _module(backend)
    node, pod = netns_pair
    with mod.open_netlink(node) as nl, mod.open_netlink(pod) as pnl:
        def setup():
            nl.link_del("veth-bench")  # removes the peer in the pod as well

        if how == "direct":
            def run():
                nl.veth_add("veth-bench", "eth0", peer_netns=pod, mtu=1450)
        else:
            def run():
                nl.veth_add("veth-bench", "eth0", mtu=1450)
                nl.link_set(nl.link_get("eth0").index, netns=pod)
        benchmark.pedantic(run, setup=setup, rounds=40, iterations=1,
                           warmup_rounds=2)
        assert nl.link_get("eth0") is None
        assert pnl.link_get("eth0") is not None
        assert nl.link_del("veth-bench")


@pytest.mark.parametrize("how", ["one by one", "by group"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_delete_30_veths(benchmark, netns_pair, backend, how):
    benchmark.group = "delete 30 veths: one by one vs one request by link group"
    mod = _module(backend)
    node, pod = netns_pair
    names = [f"vb{i}" for i in range(30)]
    with mod.open_netlink(node) as nl:
        def setup():
            for name in names:
                index = nl.veth_add(name, f"e{name}", peer_netns=pod)
                if how == "by group":
                    nl.link_set(index, group=7)

        if how == "by group":
            def run():
                assert nl.link_del_group(7)
        else:
            def run():
                for name in names:
                    nl.link_del(name)
        benchmark.pedantic(run, setup=setup, rounds=5, iterations=1)
        assert [link.name for link in nl.link_list()] == ["lo"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_netlink_path(benchmark, netns_pair, backend):
    benchmark.group = "open_netlink(netns=path) + close"
    mod = _module(backend)
    node, _ = netns_pair

    def cycle():
        mod.open_netlink(node).close()
    benchmark(cycle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_add_del(benchmark, netns_pair, backend):
    benchmark.group = "route add + del"
    mod = _module(backend)
    node, pod = netns_pair
    with mod.open_netlink(node) as nl:
        index = nl.veth_add("veth-rt", "eth0", peer_netns=pod)
        nl.link_set(index, up=True)

        def cycle():
            nl.route_add("10.64.0.5", 32, oif=index, scope=253, table=119,
                         protocol=30)
            nl.route_del("10.64.0.5", 32, table=119)
        benchmark(cycle)


@pytest.mark.parametrize("backend", BACKENDS)
def test_link_get(benchmark, netns_pair, backend):
    benchmark.group = "link_get (one request/reply)"
    mod = _module(backend)
    node, _ = netns_pair
    with mod.open_netlink(node) as nl:
        assert benchmark(nl.link_get, "lo").index == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_list(benchmark, netns_pair, backend):
    benchmark.group = "route_list (~260 routes)"
    mod = _module(backend)
    node, pod = netns_pair
    with mod.open_netlink(node) as nl:
        index = nl.veth_add("veth-rl", "eth0", peer_netns=pod)
        nl.link_set(index, up=True)
        for i in range(256):
            nl.route_add(f"10.65.{i}.0", 24, oif=index, scope=253, table=119,
                         protocol=30)
        routes = benchmark(nl.route_list)
        assert len(routes) >= 256
