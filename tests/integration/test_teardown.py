"""coild's deletion queue (coil/coild/teardown.py) and PodNetwork.retire,
in-process, on real network namespaces: what a DEL leaves behind at once,
and when the batch is deleted (size, delay, shutdown, start, reconcile).

A fake clock drives the delay trigger; the size and shutdown triggers use
a delay of an hour, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import subprocess

import pytest

from coil.coild.podnet import PodNetwork, legacy_host_veth_name
from coil.coild.podnet import RETIRED_GROUP
from coil.coild.teardown import TeardownQueue

pytestmark = pytest.mark.root

HOUR = 3600.0


def _links(ns) -> dict[str, str]:
    """name -> 'ip -o link' line of every link in ``ns``."""
    out = ns.run("ip", "-o", "link", check=True).stdout
    return {line.split(":")[1].strip().split("@")[0]: line for line in out.splitlines()}


def _routes(ns, *args) -> str:
    return ns.run("ip", *args, "route", check=True).stdout


def _ping(src, address) -> bool:
    return src.run("ping", "-c1", "-W2", address).returncode == 0


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def node(netns_factory):
    """A node namespace with pods wired by PodNetwork; pod(i) -> (netns, ip)."""
    n = netns_factory(lo_up=True)
    podnet = PodNetwork(host_netns=n.path)
    pods = {}

    def pod(i, ns=None, ip=None):
        ns = ns or netns_factory(lo_up=True)
        ip = ip or f"10.77.0.{i}"
        podnet.setup(ns.path, "eth0", legacy_host_veth_name("default", f"p{i}"), [ip])
        pods[i] = (ns, ip)
        return ns, ip

    n.podnet = podnet
    n.pod = pod
    return n


def _retire(queue, i, ns, ip):
    return queue.delete(ns.path, "eth0", legacy_host_veth_name("default", f"p{i}"), [ip])


def _flags(line: str) -> list[str]:
    """The <...> flags of an 'ip -o link' line."""
    return line.split("<", 1)[1].split(">", 1)[0].split(",")


def _shape(links: dict[str, str]) -> dict[str, tuple]:
    """name -> (group, administratively up): what retire changes. Carrier
    and operational state are left out: the kernel updates the operational
    state asynchronously (linkwatch)."""
    return {name: (line.split(" group ")[1].split()[0] if " group " in line else "",
                   "UP" in _flags(line)) for name, line in links.items()}


def _retired(links: dict[str, str]) -> dict[str, str]:
    """The links of ``_links`` in the retired group."""
    return {name: line for name, line in links.items() if f"group {RETIRED_GROUP}" in line}


def test_retire_takes_the_pair_out_of_service_at_once(node):
    pod, ip = node.pod(1)
    host = legacy_host_veth_name("default", "p1")
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    assert _retire(q, 1, pod, ip) is True
    assert q.pending() == 1 and q.flushes_total == 0
    # the host end waits in the retired group under its name, routing
    # nothing; its peer is down, so it has no carrier (it is not set down:
    # the flush closes a whole batch with one RCU grace period)
    retired = _retired(_links(node))
    assert list(retired) == [host] and "LOWER_UP" not in _flags(retired[host])
    assert "UP" in _flags(retired[host])           # the flush closes it with its batch
    assert ip not in _routes(node)
    # the pod's end: in the retired group too, down, its routes flushed
    pod_retired = _retired(_links(pod))
    assert list(pod_retired) == ["eth0"] and "state DOWN" in pod_retired["eth0"]
    assert _routes(pod) == ""
    # nothing passes the pair either way, even with a route put back
    assert not _ping(node, ip)
    node.run("ip", "route", "add", f"{ip}/32", "dev", host, check=True)
    assert not _ping(node, ip)
    node.run("ip", "route", "del", f"{ip}/32", "dev", host, check=True)
    # the batch deletes the pair
    assert q.flush() is True
    assert set(_links(node)) == {"lo"} and set(_links(pod)) == {"lo"}
    assert q.flush() is False                      # nothing left
    # repeating the DEL after the deletion finds nothing to do
    assert _retire(q, 1, pod, ip) is False


def test_add_again_before_the_flush_takes_the_names_back(node):
    """The runtime kept the namespace and ADDs the same attachment (same
    host-end name, same ifname) before the queue flushed: ADD renames the
    retired ends out of the way (they stay in the group) and wires a new
    pair; the flush then deletes the old pair only."""
    pod, ip = node.pod(1)
    host = legacy_host_veth_name("default", "p1")
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    assert _retire(q, 1, pod, ip) is True
    old_index = {name: line.split(":")[0] for name, line in _links(pod).items()}["eth0"]
    node.podnet.setup(pod.path, "eth0", host, [ip])
    assert _ping(node, ip)
    for ns, live in ((node, host), (pod, "eth0")):
        links = _links(ns)
        assert live in links and live not in _retired(links)
        (renamed,) = _retired(links)
        assert renamed.startswith("cdel")
    (renamed,) = _retired(_links(pod))
    assert _links(pod)[renamed].split(":")[0] == old_index     # the old end, renamed
    assert q.flush() is True
    assert set(_links(node)) == {"lo", host} and set(_links(pod)) == {"lo", "eth0"}
    assert _ping(node, ip)
    node.podnet.check(pod.path, "eth0", host, [ip])


def test_add_again_after_the_runtime_made_a_new_namespace(node, netns_factory):
    """The same attachment comes back in a new namespace before the flush:
    only the host-end name is taken (by the retired end), and the new pair
    is made beside it."""
    pod, ip = node.pod(1)
    host = legacy_host_veth_name("default", "p1")
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    assert _retire(q, 1, pod, ip) is True
    new = netns_factory(lo_up=True)
    node.podnet.setup(new.path, "eth0", host, [ip])
    assert _ping(node, ip)
    assert [n for n in _retired(_links(node))][0].startswith("cdel")
    assert q.flush() is True
    assert set(_links(node)) == {"lo", host} and set(_links(pod)) == {"lo"}
    assert set(_links(new)) == {"lo", "eth0"} and _ping(node, ip)


def test_del_repeated_before_the_flush_leaves_the_queue_its_pair(node):
    """A DEL retried before the flush finds the host end routing nothing
    and the pod's ifname retired: nothing is deleted synchronously."""
    pod, ip = node.pod(1)
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    assert _retire(q, 1, pod, ip) is True
    before = (_shape(_links(node)), _shape(_links(pod)))
    assert _retire(q, 1, pod, ip) is False
    assert (_shape(_links(node)), _shape(_links(pod))) == before and q.pending() == 1
    assert q.flush() is True and set(_links(pod)) == {"lo"}


def test_size_trigger_deletes_one_batch(node):
    q = TeardownQueue(node.podnet, batch=3, delay=HOUR)
    q.start()
    try:
        pods = [node.pod(i) for i in (1, 2, 3, 4)]
        _retire(q, 1, *pods[0])
        _retire(q, 2, *pods[1])
        assert q.pending() == 2 and len(node.run("ip", "-o", "link", "show", "group",
                                                 str(RETIRED_GROUP)).stdout.splitlines()) == 2
        flushes = q.flushes_total
        _retire(q, 3, *pods[2])                     # the third one: batch is full
        assert q.wait_flushed(flushes + 1, 30)
        assert set(_links(node)) == {"lo", legacy_host_veth_name("default", "p4")}
        assert [set(_links(ns)) for ns, _ in pods] == [{"lo"}] * 3 + [{"lo", "eth0"}]
        assert q.pending() == 0
    finally:
        q.close()


def test_delay_trigger_with_fake_clock(node):
    clock = FakeClock()
    q = TeardownQueue(node.podnet, batch=100, delay=5.0, clock=clock)
    q.start()
    try:
        flushes = q.flushes_total
        pod, ip = node.pod(1)
        _retire(q, 1, pod, ip)
        clock.now += 4.9
        with q._cond:
            q._cond.notify_all()                    # the flusher looks at the clock again
        assert not q.wait_flushed(flushes + 1, 0.5)
        assert q.pending() == 1
        clock.now += 0.1                            # 5 s after the DEL
        with q._cond:
            q._cond.notify_all()
        assert q.wait_flushed(flushes + 1, 30)
        assert set(_links(node)) == {"lo"} and set(_links(pod)) == {"lo"}
    finally:
        q.close()


def test_shutdown_flushes_what_is_left(node):
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    q.start()
    pods = [node.pod(i) for i in (1, 2)]
    for i, (ns, ip) in zip((1, 2), pods):
        _retire(q, i, ns, ip)
    assert len(_links(node)) == 3
    q.close()
    assert set(_links(node)) == {"lo"}
    q.close()                                       # safe to repeat


def test_start_deletes_what_a_crashed_coild_left(node):
    pods = [node.pod(i) for i in (1, 2)]
    # a coild that retired these and died before its flush
    for i, (ns, ip) in zip((1, 2), pods):
        assert node.podnet.retire(ns.path, "eth0", legacy_host_veth_name("default", f"p{i}"),
                                  [ip]) == "retired"
    assert len(_links(node)) == 3
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    q.start()
    try:
        assert set(_links(node)) == {"lo"}
        assert [set(_links(ns)) for ns, _ in pods] == [{"lo"}, {"lo"}]
    finally:
        q.close()


def test_reconcile_removes_veths_no_record_accounts_for(node):
    kept_ns, kept_ip = node.pod(1)
    stray_ns, _ = node.pod(2)
    v6_ns = node.pod(3, ip="fd00:77::3")[0]           # recognised by fe80::1
    # a coil-named veth without coil's gateway address, and a foreign veth: not ours
    node.run("ip", "link", "add", "veth0123456789a", "type", "veth", "peer", "name", "x0",
             check=True)
    node.run("ip", "link", "add", "vethforeign", "type", "veth", "peer", "name", "x1",
             check=True)
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    keep = {legacy_host_veth_name("default", "p1")}
    removed = q.reconcile(keep)
    assert sorted(removed) == sorted([legacy_host_veth_name("default", "p2"),
                                      legacy_host_veth_name("default", "p3")])
    assert set(_links(node)) == {"lo", legacy_host_veth_name("default", "p1"), "veth0123456789a",
                                 "x0", "vethforeign", "x1"}
    assert set(_links(stray_ns)) == {"lo"} and set(_links(v6_ns)) == {"lo"}
    assert set(_links(kept_ns)) == {"lo", "eth0"}
    assert _ping(node, kept_ip)
    assert q.reconcile(keep) == []


def test_host_end_set_down_when_the_pods_end_is_out_of_reach(node):
    """A DEL without the pod's namespace (the runtime passed none) cannot
    set the pod's end down: the host end is set down itself."""
    pod, ip = node.pod(1)
    host = legacy_host_veth_name("default", "p1")
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    assert q.delete(None, "eth0", host, [ip]) is True
    retired = _retired(_links(node))
    assert list(retired) == [host] and "UP" not in _flags(retired[host])
    assert ip not in _routes(node) and not _ping(pod, "169.254.1.1")
    q.close()
    assert set(_links(node)) == {"lo"} and set(_links(pod)) == {"lo"}


def test_host_end_set_down_when_the_pods_end_fails(node, monkeypatch):
    """The pod's side fails (an injected netlink error): the DEL fails, and
    the host end, already routing nothing and in the retired group, is set
    down before the error goes up."""
    import errno

    from coil.errors import NetlinkError
    pod, ip = node.pod(1)
    host = legacy_host_veth_name("default", "p1")

    def broken(*args, **kwargs):
        raise NetlinkError("setting eth0 down", errno.EIO)

    monkeypatch.setattr(node.podnet, "_retire_pod_side", broken)
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    with pytest.raises(NetlinkError):
        q.delete(pod.path, "eth0", host, [ip])
    retired = _retired(_links(node))
    assert list(retired) == [host] and "UP" not in _flags(retired[host])
    assert ip not in _routes(node) and not _ping(node, ip)
    q.close()
    assert set(_links(node)) == {"lo"} and set(_links(pod)) == {"lo"}


def test_pod_namespace_already_gone(node):
    """DEL after the runtime deleted the namespace: the host end (if the
    kernel has not removed it yet) is retired, its route goes at once."""
    pod, ip = node.pod(1)
    subprocess.run(["ip", "netns", "del", pod.name], check=True, capture_output=True)
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    q.delete(pod.path, "eth0", legacy_host_veth_name("default", "p1"), [ip])
    assert ip not in _routes(node)
    host = legacy_host_veth_name("default", "p1")
    # the kernel deleted the pair with the namespace, or the end waits retired.
    # The kernel removes it asynchronously (netns cleanup runs in a work
    # queue), so read the links once: a second read may not see it any more.
    links = _links(node)
    assert host not in links or host in _retired(links)
    q.close()
    assert set(_links(node)) == {"lo"}


def test_retire_dual_stack_and_add_again(node):
    """Both families' routes go at once; the kept namespace takes the same
    ifname and addresses again, and the old pair's deletion leaves them be."""
    host = legacy_host_veth_name("default", "p6")
    addrs = ["10.77.0.6", "fd00:77::6"]
    pod, _ = node.pod(6, ip="10.77.0.6")
    # rewire the pod dual-stack
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    q.delete(pod.path, "eth0", host, ["10.77.0.6"])
    q.flush()
    node.podnet.setup(pod.path, "eth0", host, addrs)
    assert _ping(node, "10.77.0.6")
    assert q.delete(pod.path, "eth0", host, addrs) is True
    assert "10.77.0.6" not in _routes(node) and "fd00:77::6" not in _routes(node, "-6")
    assert _routes(pod) == "" and "fd00:77::6" not in _routes(pod, "-6")
    assert not _ping(node, "10.77.0.6")
    node.podnet.setup(pod.path, "eth0", host, addrs)
    q.flush()
    assert set(_links(node)) == {"lo", host} and set(_links(pod)) == {"lo", "eth0"}
    assert _ping(node, "10.77.0.6")
    assert pod.run("ping", "-c1", "-W2", "fe80::1%eth0").returncode == 0
    node.podnet.check(pod.path, "eth0", host, addrs)


def test_retire_leaves_a_host_end_that_is_not_the_containers(node):
    """The host end of that name routes another address (another
    container's): it keeps its name and route, nothing is retired, and the
    DEL's own pod interface is deleted at once (a route is deleted only
    through the host end it names, so no dump of the routing table)."""
    other, other_ip = node.pod(2)
    host = legacy_host_veth_name("default", "p2")
    mine = node.pod(3)[0]
    q = TeardownQueue(node.podnet, batch=100, delay=HOUR)
    # a DEL naming p2's host end with an address that end does not route
    assert q.delete(mine.path, "eth0", host, ["10.77.0.99"]) is True
    assert q.pending() == 0 and q.retired_total == 0
    assert host in _links(node) and other_ip in _routes(node)
    assert "eth0" not in _links(mine)             # deleted at once, the pair with it
    assert not _retired(_links(node))
    assert _ping(node, other_ip)
    node.podnet.check(other.path, "eth0", host, [other_ip])


def test_setup_replaces_a_leftover_host_end_and_refuses_a_taken_ifname(node, netns_factory):
    """ADD creates first and looks only when a name is taken: a host end of
    the same name (left by an earlier try) is replaced; an ifname the pod
    has already is refused (EEXIST, "the container already has this
    interface") and nothing is made or removed."""
    from coil.errors import NetlinkError
    host = legacy_host_veth_name("default", "p7")
    pod = netns_factory(lo_up=True)
    node.run("ip", "link", "add", host, "type", "veth", "peer", "name", "old-peer", check=True)
    info = node.podnet.setup(pod.path, "eth0", host, ["10.77.0.7"])
    assert set(_links(node)) == {"lo", host} and "old-peer" not in _links(node)
    assert info["container_mac"] and _ping(node, "10.77.0.7")
    other = legacy_host_veth_name("default", "p8")
    with pytest.raises(NetlinkError) as exc:
        node.podnet.setup(pod.path, "eth0", other, ["10.77.0.8"])
    assert exc.value.errno == 17 and "already has this interface" in exc.value.one_line()
    assert set(_links(node)) == {"lo", host} and set(_links(pod)) == {"lo", "eth0"}
    assert _ping(node, "10.77.0.7")
