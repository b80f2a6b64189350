"""rtnetlink backends (coil.net._netlink, Cython; coil.net._netlink_py, pyroute2).

Every test runs against both backends and only inside network namespaces
made by ``netns_factory`` (removed at teardown even on failure). The root
namespace is only ever read: the last test checks that its link list did
not change while this module ran.

Kernel behaviour pinned down here (Linux 6.x):

* IPv4 pod wiring: host end 169.254.1.1/32 plus ``<pod-ip>/32 dev host-veth
  scope link`` in the node; pod end ``<pod-ip>/32``, ``169.254.1.1/32 dev
  eth0 scope link`` and ``default via 169.254.1.1 dev eth0`` in the pod.
* IPv6 pod wiring that works: host end ``fe80::1/64 nodad``, route
  ``<pod-ip6>/128 dev host-veth`` in the node; pod end ``<pod-ip6>/128
  nodad``, ``fe80::1/128 dev eth0`` and ``default via fe80::1 dev eth0``
  in the pod. A link-local gateway needs ``oif`` (EINVAL without it).
* IPv6 ignores the route scope (routes always dump as scope 0).
* Adding a route through a link that is down fails with ENETDOWN (both
  families), and taking a link down flushes its routes.
"""

from __future__ import annotations

import errno
import importlib
import os
import shutil
import socket
import subprocess
import threading
import time

import pytest

from coil.net.ns import enter_netns, in_netns, ns_handle
from coil.errors import NetlinkError

pytestmark = pytest.mark.root

PROTO = 30          # the routing protocol number coil uses for its routes
TABLE = 119         # a non-main routing table
BIG_TABLE = 1000    # > 255: only expressible with RTA_TABLE


def _require_fast() -> bool:
    return os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0")


@pytest.fixture(params=["cython", "python"])
def nlmod(request):
    """The backend module under test."""
    if request.param == "cython":
        try:
            return importlib.import_module("coil.net._netlink")
        except ImportError as exc:
            msg = f"coil.net._netlink (Cython) is not built: {exc}"
            if _require_fast():
                pytest.fail(msg + " and COIL_REQUIRE_FAST=1")
            pytest.skip(msg)
    return importlib.import_module("coil.net._netlink_py")


def _ip_link_root() -> list[str]:
    """``ip -o link`` of the root namespace (read only)."""
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                         check=True, timeout=20).stdout
    return sorted(line.strip() for line in out.splitlines() if line.strip())


_ROOT_LINKS_BEFORE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _root_links_snapshot():
    if os.geteuid() == 0:
        _ROOT_LINKS_BEFORE[:] = _ip_link_root()
    yield


@pytest.fixture(autouse=True)
def _thread_netns_unchanged():
    """No test may leave the test thread in another namespace."""
    before = os.readlink("/proc/thread-self/ns/net")
    yield
    assert os.readlink("/proc/thread-self/ns/net") == before


@pytest.fixture
def two(netns_factory):
    """A "node" and a "pod" namespace."""
    return netns_factory(), netns_factory()


def _link_names(ns) -> set[str]:
    out = ns.run("ip", "-o", "link", check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


# -- opening ----------------------------------------------------------------


def test_open_by_path_sees_only_that_namespace(nlmod, netns_factory):
    ns = netns_factory()
    with nlmod.open_netlink(ns.path) as nl:
        links = nl.link_list()
    assert [link.name for link in links] == ["lo"]
    lo = links[0]
    assert isinstance(lo, nlmod.Link)
    assert lo.index == 1 and lo.mtu == 65536 and lo.up is False and lo.kind is None
    assert lo.group == 0
    assert lo.mac == "00:00:00:00:00:00"


def test_open_by_fd_and_by_current_namespace(nlmod, netns_factory):
    a, b = netns_factory(), netns_factory()
    b.run("ip", "link", "add", "mark-b", "type", "bridge", check=True)
    fd = os.open(b.path, os.O_RDONLY)
    try:
        with nlmod.open_netlink(fd) as nl:
            assert nl.link_get("mark-b").kind == "bridge"
        os.fstat(fd)  # the caller's fd is left open
    finally:
        os.close(fd)
    # netns=None: the calling thread's namespace at the time of opening
    with in_netns(a.path):
        nl = nlmod.open_netlink()
    try:
        # still bound to "a" after the thread went back, and also when the
        # thread is in another namespace later
        assert [link.name for link in nl.link_list()] == ["lo"]
        with in_netns(b.path):
            assert nl.link_get("mark-b") is None
    finally:
        nl.close()


def test_open_missing_path_raises_enoent(nlmod, netns_factory):
    missing = "/run/netns/coiltest-does-not-exist-" + os.urandom(4).hex()
    with pytest.raises(NetlinkError) as info:
        nlmod.open_netlink(missing)
    assert info.value.errno == errno.ENOENT
    assert missing in str(info.value)


def test_open_non_netns_fd_raises(nlmod):
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(NetlinkError) as info:
            nlmod.open_netlink(fd)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_open_does_not_fork(nlmod, netns_factory, monkeypatch):
    """open_netlink(netns=path) is a few syscalls: no fork, no subprocess."""
    ns = netns_factory()

    def forbidden(*args, **kwargs):
        raise AssertionError("open_netlink must not fork or spawn")

    monkeypatch.setattr(os, "fork", forbidden)
    monkeypatch.setattr(subprocess.Popen, "__init__", forbidden)
    with nlmod.open_netlink(ns.path) as nl:
        assert nl.link_get("lo").index == 1


def test_in_netns_restores_on_error(netns_factory):
    ns = netns_factory()
    home = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(ZeroDivisionError):
        with in_netns(ns.path):
            assert os.readlink("/proc/thread-self/ns/net") != home
            1 / 0
    assert os.readlink("/proc/thread-self/ns/net") == home


def test_ns_handle_closes_only_what_it_opened(netns_factory):
    """coil.net.ns.ns_handle: the one namespace-file opener."""
    ns = netns_factory()
    with ns_handle(ns.path) as fd:
        assert os.fstat(fd).st_ino == os.stat(ns.path).st_ino
    with pytest.raises(OSError) as info:
        os.fstat(fd)                       # closed on the way out
    assert info.value.errno == errno.EBADF
    mine = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ns_handle(mine) as fd:
            assert fd == mine
        os.fstat(mine)                     # an fd given is left open
    finally:
        os.close(mine)
    missing = ns.path + "-gone"
    with pytest.raises(NetlinkError) as info:
        with ns_handle(missing):
            pass
    assert info.value.errno == errno.ENOENT and missing in str(info.value)
    with ns_handle(missing, missing_ok=True) as fd:
        assert fd is None
    with pytest.raises(ZeroDivisionError):  # errors of the block still propagate
        with ns_handle(ns.path, missing_ok=True):
            1 / 0


def test_enter_netns_moves_one_thread_for_good(netns_factory):
    """coil.net.ns.enter_netns (the sandbox's NetnsThread): the thread stays
    there and its sockets are made there; the others stay home."""
    ns = netns_factory()
    ns.run("ip", "link", "add", "marker0", "type", "veth", "peer", "name", "marker1", check=True)
    seen = {}

    def worker():
        enter_netns(ns.path)
        seen["ino"] = os.stat("/proc/thread-self/ns/net").st_ino
        from coil.net import open_netlink
        with open_netlink() as nl:
            seen["links"] = sorted(link.name for link in nl.link_list())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"ino": os.stat(ns.path).st_ino, "links": ["lo", "marker0", "marker1"]}
    assert os.stat("/proc/thread-self/ns/net").st_ino != os.stat(ns.path).st_ino
    with pytest.raises(NetlinkError) as info:
        enter_netns(ns.path + "-gone")
    assert info.value.errno == errno.ENOENT and "-gone" in str(info.value)


def test_addr_and_route_know_their_version(nlmod, netns_factory):
    """Addr.version / Route.version come from the kernel's family."""
    ns = netns_factory()
    with nlmod.open_netlink(ns.path) as nl:
        nl.link_set(1, up=True)
        addrs = {a.address: a.version for a in nl.addr_list(1)}
        routes = {r.version for r in nl.route_list(table=255)}   # local table
    assert addrs == {"127.0.0.1": 4, "::1": 6}
    assert routes == {4, 6}


def test_closed_handle_raises(nlmod, netns_factory):
    ns = netns_factory()
    nl = nlmod.open_netlink(ns.path)
    nl.close()
    nl.close()  # idempotent
    with pytest.raises(NetlinkError) as info:
        nl.link_list()
    assert info.value.errno == errno.EBADF


def test_constants(nlmod):
    assert (nlmod.RT_SCOPE_UNIVERSE, nlmod.RT_SCOPE_LINK, nlmod.RT_SCOPE_HOST,
            nlmod.RTPROT_STATIC) == (0, 253, 254, 4)


def test_both_backends_share_types():
    import coil.net._netlink_py as py
    try:
        import coil.net._netlink as cy
    except ImportError:
        if _require_fast():
            pytest.fail("coil.net._netlink (Cython) is not built and COIL_REQUIRE_FAST=1")
        pytest.skip("coil.net._netlink (Cython) is not built")
    assert cy.Link is py.Link and cy.Addr is py.Addr and cy.Route is py.Route


# -- links ------------------------------------------------------------------


@pytest.mark.parametrize("by_fd", [False, True], ids=["path", "fd"])
def test_veth_add_peer_in_other_namespace(nlmod, two, by_fd):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl, nlmod.open_netlink(pod.path) as pnl:
        if by_fd:
            fd = os.open(pod.path, os.O_RDONLY)
            try:
                index = nl.veth_add("veth-abc", "eth0", peer_netns=fd, mtu=1450)
            finally:
                os.close(fd)
        else:
            index = nl.veth_add("veth-abc", "eth0", peer_netns=pod.path, mtu=1450)
        host = nl.link_get("veth-abc")
        assert host.index == index
        assert host.kind == "veth" and host.mtu == 1450 and host.up is False
        assert len(host.mac.split(":")) == 6
        assert nl.link_get_index(index) == host
        assert nl.link_get("eth0") is None
        peer = pnl.link_get("eth0")
        assert peer is not None and peer.kind == "veth" and peer.mtu == 1450
        assert peer.mac != host.mac
    assert _link_names(node) == {"lo", "veth-abc"}
    assert _link_names(pod) == {"lo", "eth0"}


def test_veth_add_makes_one_queue_per_end(nlmod, two):
    """One TX and one RX queue on both ends (what a veth uses): the kernel's
    default, a queue per CPU cut down to one after creation, waits for an
    RCU grace period under the RTNL lock."""
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        nl.veth_add("veth-q", "eth0", peer_netns=pod.path)
    for ns, name in ((node, "veth-q"), (pod, "eth0")):
        words = ns.run("ip", "-d", "link", "show", name, check=True).stdout.split()
        assert words[words.index("numtxqueues") + 1] == "1", (name, words)
        assert words[words.index("numrxqueues") + 1] == "1", (name, words)


def test_veth_add_same_namespace_and_default_mtu(nlmod, netns_factory):
    ns = netns_factory()
    with nlmod.open_netlink(ns.path) as nl:
        index = nl.veth_add("va", "vb")
        a, b = nl.link_get("va"), nl.link_get("vb")
        assert a.index == index and b.index != index
        assert a.mtu == b.mtu == 1500
        assert {link.name for link in nl.link_list()} == {"lo", "va", "vb"}


def test_veth_add_existing_raises_eexist(nlmod, two):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        nl.veth_add("vethabc", "eth0", peer_netns=pod.path)
        with pytest.raises(NetlinkError) as info:
            nl.veth_add("vethabc", "eth1", peer_netns=pod.path)
        assert info.value.errno == errno.EEXIST
        assert "creating veth vethabc/eth1" in str(info.value)
        # the peer name is taken in the pod namespace
        with pytest.raises(NetlinkError) as info:
            nl.veth_add("vethdef", "eth0", peer_netns=pod.path)
        assert info.value.errno == errno.EEXIST
        assert nl.link_get("vethdef") is None


def test_veth_add_bad_arguments(nlmod, netns_factory):
    ns = netns_factory()
    with nlmod.open_netlink(ns.path) as nl:
        with pytest.raises(NetlinkError) as info:
            nl.veth_add("x" * 16, "eth0")
        assert info.value.errno == errno.EINVAL
        missing = "/run/netns/coiltest-missing-" + os.urandom(4).hex()
        with pytest.raises(NetlinkError) as info:
            nl.veth_add("vx", "eth0", peer_netns=missing)
        assert info.value.errno == errno.ENOENT and missing in str(info.value)
        assert nl.link_get("vx") is None


def test_link_set_up_and_mtu(nlmod, two):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        index = nl.veth_add("vethup", "eth0", peer_netns=pod.path)
        nl.link_set(index, up=True)
        assert nl.link_get_index(index).up is True
        nl.link_set(index, mtu=1400)
        link = nl.link_get_index(index)
        assert link.mtu == 1400 and link.up is True
        nl.link_set(index, up=False, mtu=9000)
        link = nl.link_get_index(index)
        assert link.mtu == 9000 and link.up is False
        assert "mtu 9000" in node.run("ip", "link", "show", "vethup").stdout
        with pytest.raises(NetlinkError) as info:
            nl.link_set(index, mtu=10)  # below the minimum
        assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("by_fd", [False, True], ids=["path", "fd"])
def test_link_set_netns_moves_link(nlmod, two, by_fd):
    a, b = two
    with nlmod.open_netlink(a.path) as nl, nlmod.open_netlink(b.path) as bnl:
        nl.veth_add("mv-a", "mv-b", mtu=1400)
        peer = nl.link_get("mv-b")
        assert peer is not None
        if by_fd:
            fd = os.open(b.path, os.O_RDONLY)
            try:
                nl.link_set(peer.index, netns=fd)
                os.fstat(fd)  # the caller's fd is left open
            finally:
                os.close(fd)
        else:
            nl.link_set(peer.index, netns=b.path)
        assert nl.link_get("mv-b") is None
        assert nl.link_get("mv-a") is not None
        moved = bnl.link_get("mv-b")
        assert moved is not None and moved.kind == "veth" and moved.mtu == 1400
        assert moved.mac == peer.mac
        # the moved link is configured from the target namespace
        bnl.link_set(moved.index, up=True)
        assert bnl.link_get("mv-b").up is True
    assert _link_names(a) == {"lo", "mv-a"}
    assert _link_names(b) == {"lo", "mv-b"}


def test_link_set_netns_errors(nlmod, two):
    a, b = two
    with nlmod.open_netlink(a.path) as nl:
        nl.veth_add("mv-a", "mv-b")
        index = nl.link_get("mv-b").index
        missing = "/run/netns/coiltest-missing-" + os.urandom(4).hex()
        with pytest.raises(NetlinkError) as info:
            nl.link_set(index, netns=missing)
        assert info.value.errno == errno.ENOENT
        assert f"moving link {index} to {missing}" in str(info.value)
        assert nl.link_get("mv-b").index == index  # nothing moved
        # netns together with up/mtu: refused before anything is done
        for kwargs in ({"up": True}, {"mtu": 1400}, {"up": False, "mtu": 1400}):
            with pytest.raises(NetlinkError) as info:
                nl.link_set(index, netns=b.path, **kwargs)
            assert info.value.errno == errno.EINVAL
            assert f"moving link {index} to {b.path}" in str(info.value)
            assert "target namespace" in (info.value.hint or "")
        link = nl.link_get("mv-b")
        assert link.index == index and link.up is False and link.mtu == 1500
        # a missing link
        with pytest.raises(NetlinkError) as info:
            nl.link_set(4242, netns=b.path)
        assert info.value.errno == errno.ENODEV
        assert f"moving link 4242 to {b.path}" in str(info.value)
        # an fd that is not a network namespace
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            with pytest.raises(NetlinkError) as info:
                nl.link_set(index, netns=fd)
            assert info.value.errno == errno.EINVAL
            assert f"moving link {index} to fd {fd}" in str(info.value)
        finally:
            os.close(fd)
        # the name is taken in the target namespace
        b.run("ip", "link", "add", "mv-b", "type", "bridge", check=True)
        with pytest.raises(NetlinkError) as info:
            nl.link_set(index, netns=b.path)
        assert info.value.errno == errno.EEXIST
        assert nl.link_get("mv-b").index == index
    assert _link_names(a) == {"lo", "mv-a", "mv-b"}
    assert _link_names(b) == {"lo", "mv-b"}


def test_link_get_missing_and_list(nlmod, netns_factory):
    ns = netns_factory()
    ns.run("ip", "link", "add", "br0", "type", "bridge", check=True)
    with nlmod.open_netlink(ns.path) as nl:
        assert nl.link_get("nope") is None
        assert nl.link_get("x" * 40) is None
        assert nl.link_get_index(4242) is None
        br = nl.link_get("br0")
        assert br.kind == "bridge"
        assert nl.link_get_index(br.index) == br
        assert sorted(nl.link_list()) == sorted([nl.link_get("lo"), br])


def test_link_del(nlmod, two):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        nl.veth_add("vethdel", "eth0", peer_netns=pod.path)
        assert nl.link_del("vethdel") is True
        assert nl.link_del("vethdel") is False
        assert nl.link_get("vethdel") is None
    # deleting one end removes the peer in the other namespace
    assert _link_names(pod) == {"lo"}



# -- renaming, link groups, batched deletion (coild's deferred teardown) -----


def test_link_set_name_and_group(nlmod, two):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        index = nl.veth_add("vethren", "eth0", peer_netns=pod.path)
        nl.link_set(index, up=True)
        assert nl.link_get("vethren").group == 0
        # rename + group in one request, while the link is up
        nl.link_set(index, name="vdoomed", group=7)
        link = nl.link_get_index(index)
        assert (link.name, link.group, link.up) == ("vdoomed", 7, True)
        assert nl.link_get("vethren") is None
        assert "group 7" in node.run("ip", "link", "show", "vdoomed").stdout
        assert [l.name for l in nl.link_list() if l.group == 7] == ["vdoomed"]
        # the name is free again: a new pair of the old name can be made
        nl.veth_add("vethren", "eth1", peer_netns=pod.path)
        # rename and down in one request
        nl.link_set(index, name="vdoomed2", up=False)
        link = nl.link_get_index(index)
        assert (link.name, link.up, link.group) == ("vdoomed2", False, 7)
        with pytest.raises(NetlinkError) as info:       # the name is taken
            nl.link_set(index, name="vethren")
        assert info.value.errno == errno.EEXIST and "renaming link index" in str(info.value)
        for bad in ("", "x" * 16, 7):
            with pytest.raises(NetlinkError) as info:
                nl.link_set(index, name=bad)
            assert info.value.errno == errno.EINVAL
        for bad in (0, -1, 2 ** 32, True, "7"):
            with pytest.raises(NetlinkError) as info:
                nl.link_set(index, group=bad)
            assert info.value.errno == errno.EINVAL
        for kwargs in ({"name": "x"}, {"group": 3}):
            with pytest.raises(NetlinkError) as info:
                nl.link_set(index, netns=pod.path, **kwargs)
            assert info.value.errno == errno.EINVAL
        assert nl.link_get_index(index).name == "vdoomed2"
        # the largest group number works
        nl.link_set(index, group=2 ** 32 - 1)
        assert nl.link_get_index(index).group == 2 ** 32 - 1


def test_link_del_group_deletes_the_batch_and_peers(nlmod, netns_factory):
    node = netns_factory()
    pods = [netns_factory() for _ in range(6)]
    with nlmod.open_netlink(node.path) as nl:
        for i, pod in enumerate(pods):
            index = nl.veth_add(f"vbatch{i}", "eth0", peer_netns=pod.path)
            nl.link_set(index, up=True, group=42 if i < 4 else None)
        assert sorted(l.name for l in nl.link_list() if l.group == 42) == \
            [f"vbatch{i}" for i in range(4)]
        assert nl.link_del_group(42) is True
        assert _link_names(node) == {"lo", "vbatch4", "vbatch5"}
        # each veth took its peer, in its own namespace, with it
        assert [_link_names(p) for p in pods] == [{"lo"}] * 4 + [{"lo", "eth0"}] * 2
        assert nl.link_del_group(42) is False       # empty group
        for bad in (0, -1, 2 ** 32, False, None, "42"):
            with pytest.raises(NetlinkError) as info:
                nl.link_del_group(bad)
            assert info.value.errno == errno.EINVAL
            assert "deleting link group" in str(info.value)
        # lo cannot be deleted: the kernel refuses the whole batch
        nl.link_set(1, group=43)
        nl.link_set(nl.link_get("vbatch4").index, group=43)
        with pytest.raises(NetlinkError) as info:
            nl.link_del_group(43)
        assert info.value.errno == errno.EOPNOTSUPP
        assert _link_names(node) == {"lo", "vbatch4", "vbatch5"}


# -- addresses --------------------------------------------------------------


def test_addresses_v4_v6(nlmod, two):
    node, pod = two
    with nlmod.open_netlink(node.path) as nl:
        index = nl.veth_add("vethaddr", "eth0", peer_netns=pod.path)
        nl.link_set(index, up=True)
        nl.addr_add(index, "169.254.1.1", 32)
        nl.addr_add(index, "10.64.0.1", 24, scope=nlmod.RT_SCOPE_LINK)
        nl.addr_add(index, "fd00:10::1", 64, nodad=True)
        addrs = nl.addr_list(index=index)
        v4 = sorted(a for a in addrs if a.family == socket.AF_INET)
        assert v4 == [nlmod.Addr(index, "10.64.0.1", 24, socket.AF_INET, 253),
                      nlmod.Addr(index, "169.254.1.1", 32, socket.AF_INET, 0)]
        assert nlmod.Addr(index, "fd00:10::1", 64, socket.AF_INET6, 0) in addrs
        assert nl.addr_list(index=index, family=socket.AF_INET) == \
            [a for a in addrs if a.family == socket.AF_INET]
        assert all(a.family == socket.AF_INET6
                   for a in nl.addr_list(family=socket.AF_INET6))
        assert nl.addr_list(index=4242) == []
        # nodad: usable at once, not tentative
        out = node.run("ip", "-6", "addr", "show", "dev", "vethaddr").stdout
        line = next(ln for ln in out.splitlines() if "fd00:10::1/64" in ln)
        assert "tentative" not in line and "nodad" in line

        with pytest.raises(NetlinkError) as info:
            nl.addr_add(index, "169.254.1.1", 32)
        assert info.value.errno == errno.EEXIST
        assert "169.254.1.1/32" in str(info.value)

        nl.addr_del(index, "169.254.1.1", 32)
        nl.addr_del(index, "fd00:10::1", 64)
        assert {a.address for a in nl.addr_list(index=index)
                if not a.address.startswith("fe80:")} == {"10.64.0.1"}
        with pytest.raises(NetlinkError) as info:
            nl.addr_del(index, "169.254.1.1", 32)
        assert info.value.errno == errno.EADDRNOTAVAIL


# -- routes -----------------------------------------------------------------


@pytest.fixture
def routed(nlmod, two):
    """(nl, index, node): an up veth in "node" with its peer in "pod"."""
    node, pod = two
    nl = nlmod.open_netlink(node.path)
    try:
        index = nl.veth_add("vethrt", "eth0", peer_netns=pod.path)
        nl.link_set(index, up=True)
        nl.addr_add(index, "169.254.1.1", 32)
        nl.addr_add(index, "fe80::1", 64, nodad=True)
        yield nl, index, node
    finally:
        nl.close()


def test_routes_main_and_custom_tables(nlmod, routed):
    nl, index, node = routed
    L = nlmod.RT_SCOPE_LINK
    nl.route_add("10.64.0.5", 32, oif=index, scope=L)
    nl.route_add("10.64.0.6", 32, oif=index, scope=L, table=TABLE, protocol=PROTO)
    nl.route_add("10.64.0.7", 32, oif=index, scope=L, table=BIG_TABLE, protocol=PROTO)
    nl.route_add("fd00:10::5", 128, oif=index, table=TABLE, protocol=PROTO)
    nl.route_add("169.254.1.2", 32, oif=index, scope=L, table=TABLE, protocol=PROTO)
    nl.route_add("0.0.0.0", 0, gateway="169.254.1.2", oif=index, table=TABLE,
                 protocol=PROTO)
    nl.route_add("::", 0, gateway="fe80::2", oif=index, table=TABLE, protocol=PROTO)

    R, V4, V6 = nlmod.Route, socket.AF_INET, socket.AF_INET6
    main = nl.route_list(table=254)
    assert R(V4, "10.64.0.5", 32, index, None, 254, 4, L) in main
    assert all(r.table == 254 for r in main)

    t119 = set(nl.route_list(table=TABLE))
    assert t119 == {
        R(V4, "10.64.0.6", 32, index, None, TABLE, PROTO, L),
        R(V4, "169.254.1.2", 32, index, None, TABLE, PROTO, L),
        R(V4, "0.0.0.0", 0, index, "169.254.1.2", TABLE, PROTO, 0),
        # IPv6 has no route scopes: always reported as 0
        R(V6, "fd00:10::5", 128, index, None, TABLE, PROTO, 0),
        R(V6, "::", 0, index, "fe80::2", TABLE, PROTO, 0),
    }
    assert set(nl.route_list(family=V4, table=TABLE)) == {
        r for r in t119 if r.family == V4}
    assert set(nl.route_list(family=V6, table=TABLE, protocol=PROTO)) == {
        r for r in t119 if r.family == V6}
    assert nl.route_list(table=BIG_TABLE) == [
        R(V4, "10.64.0.7", 32, index, None, BIG_TABLE, PROTO, L)]
    ours = set(nl.route_list(protocol=PROTO))
    assert ours == t119 | set(nl.route_list(table=BIG_TABLE))
    assert nl.route_list(table=TABLE, protocol=PROTO + 1) == []
    everything = nl.route_list()
    assert ours < set(everything) and set(main) < set(everything)
    # iproute2 agrees
    out = node.run("ip", "route", "show", "table", str(BIG_TABLE)).stdout
    assert "10.64.0.7 dev vethrt proto 30 scope link" in out
    out = node.run("ip", "-6", "route", "show", "table", str(TABLE)).stdout
    assert "default via fe80::2 dev vethrt proto 30" in out


def test_dump_spanning_many_reads(nlmod, routed, tmp_path):
    """A dump larger than one read (5,000 routes: the kernel sends it in
    parts, the first queued while the request is sent, the others made as
    they are read) comes back whole, and the handle serves the next request."""
    nl, index, node = routed
    batch = "".join(f"route add 10.65.{i >> 8}.{i & 255}/32 dev vethrt table {TABLE} "
                    f"proto {PROTO} scope link\n" for i in range(5000))
    (tmp_path / "routes").write_text(batch)
    node.run("ip", "-batch", str(tmp_path / "routes"), check=True)
    got = nl.route_list(family=socket.AF_INET, table=TABLE)
    assert len(got) == 5000 and len({r.dst for r in got}) == 5000
    assert all(r.oif == index and r.protocol == PROTO for r in got)
    nl.route_add("10.66.0.1", 32, oif=index, scope=nlmod.RT_SCOPE_LINK)
    assert [r.dst for r in nl.route_list(table=254) if r.dst == "10.66.0.1"] == ["10.66.0.1"]


def test_route_add_existing_keeps_errno(nlmod, routed):
    nl, index, _ = routed
    nl.route_add("10.1.0.0", 27, oif=index, table=TABLE, protocol=PROTO)
    with pytest.raises(NetlinkError) as info:
        nl.route_add("10.1.0.0", 27, oif=index, table=TABLE, protocol=PROTO)
    assert info.value.errno == errno.EEXIST
    assert str(info.value) == "adding route 10.1.0.0/27 to table 119: File exists"


def test_route_priority_adds_beside_an_existing_route(nlmod, routed, netns_factory):
    """``priority`` (RTA_PRIORITY, the metric): the same destination through
    a second link is EEXIST at the same metric and fine at its own (what a
    pod's second attachment does with its gateway and default routes)."""
    nl, index, node = routed
    other = netns_factory()
    index2 = nl.veth_add("vethrt2", "eth0", peer_netns=other.path)
    nl.link_set(index2, up=True)
    L = nlmod.RT_SCOPE_LINK
    for gw, plen, default in (("169.254.1.2", 32, "0.0.0.0"), ("fe80::2", 128, "::")):
        nl.route_add(gw, plen, oif=index, scope=L, table=TABLE, protocol=PROTO)
        nl.route_add(default, 0, oif=index, gateway=gw, table=TABLE, protocol=PROTO)
        with pytest.raises(NetlinkError) as info:
            nl.route_add(gw, plen, oif=index2, scope=L, table=TABLE, protocol=PROTO)
        assert info.value.errno == errno.EEXIST
        nl.route_add(gw, plen, oif=index2, scope=L, table=TABLE, protocol=PROTO,
                     priority=1024 + index2)
        with pytest.raises(NetlinkError) as info:
            nl.route_add(default, 0, oif=index2, gateway=gw, table=TABLE, protocol=PROTO)
        assert info.value.errno == errno.EEXIST
        nl.route_add(default, 0, oif=index2, gateway=gw, table=TABLE, protocol=PROTO,
                     priority=1024 + index2)
    out = node.run("ip", "route", "show", "table", str(TABLE)).stdout
    assert f"default via 169.254.1.2 dev vethrt2 proto 30 metric {1024 + index2}" in out
    out6 = node.run("ip", "-6", "route", "show", "table", str(TABLE)).stdout
    assert f"default via fe80::2 dev vethrt2 proto 30 metric {1024 + index2}" in out6
    with pytest.raises(NetlinkError) as info:
        nl.route_add("10.1.0.0", 27, oif=index, table=TABLE, protocol=PROTO, priority=-1)
    assert info.value.errno == errno.EINVAL


def test_route_replace(nlmod, routed, netns_factory):
    nl, index, node = routed
    other = netns_factory()
    index2 = nl.veth_add("vethrt2", "eth0", peer_netns=other.path)
    nl.link_set(index2, up=True)
    L = nlmod.RT_SCOPE_LINK
    # replace creates when absent
    nl.route_add("10.64.0.9", 32, oif=index, scope=L, table=TABLE,
                 protocol=PROTO, replace=True)
    nl.route_add("10.64.0.9", 32, oif=index2, scope=L, table=TABLE,
                 protocol=PROTO, replace=True)
    nl.route_add("fd00:10::9", 128, oif=index, table=TABLE, protocol=PROTO,
                 replace=True)
    nl.route_add("fd00:10::9", 128, oif=index2, table=TABLE, protocol=PROTO,
                 replace=True)
    routes = nl.route_list(table=TABLE)
    assert [(r.dst, r.oif) for r in routes if r.family == socket.AF_INET] == \
        [("10.64.0.9", index2)]
    assert [(r.dst, r.oif) for r in routes if r.family == socket.AF_INET6] == \
        [("fd00:10::9", index2)]


def test_route_del(nlmod, routed):
    nl, index, _ = routed
    L = nlmod.RT_SCOPE_LINK
    nl.route_add("10.64.0.5", 32, oif=index, scope=L, table=TABLE, protocol=PROTO)
    nl.route_add("fd00:10::5", 128, oif=index, table=TABLE, protocol=PROTO)
    nl.route_add("10.64.0.5", 32, oif=index, scope=L)  # main table, static
    # a different protocol or oif does not match
    assert nl.route_del("10.64.0.5", 32, table=TABLE, protocol=PROTO + 1) is False
    assert nl.route_del("10.64.0.5", 32, table=TABLE, oif=index + 100) is False
    assert nl.route_del("10.64.0.5", 32, table=TABLE, oif=index,
                        protocol=PROTO) is True
    assert nl.route_del("10.64.0.5", 32, table=TABLE) is False
    assert nl.route_del("fd00:10::5", 128, table=TABLE) is True
    assert nl.route_del("fd00:10::5", 128, table=TABLE) is False
    assert nl.route_list(table=TABLE) == []
    # the main-table route is untouched, then deleted with the default table
    assert [r.dst for r in nl.route_list(table=254, protocol=4)] == ["10.64.0.5"]
    assert nl.route_del("10.64.0.5", 32) is True
    assert nl.route_del("10.64.0.5", 32) is False
    assert nl.route_del("10.99.0.0", 16, table=4242) is False  # no such table


def test_errors_keep_errno(nlmod, routed):
    nl, index, _ = routed
    missing = index + 100
    cases = [
        (lambda: nl.link_set(missing, up=True), errno.ENODEV,
         f"setting link index {missing}"),
        (lambda: nl.addr_add(missing, "10.1.1.1", 32), errno.ENODEV,
         f"adding address 10.1.1.1/32 to link index {missing}"),
        (lambda: nl.addr_del(missing, "10.1.1.1", 32), errno.ENODEV,
         f"deleting address 10.1.1.1/32 from link index {missing}"),
        (lambda: nl.route_add("10.1.0.0", 27, oif=missing, table=TABLE),
         errno.ENODEV, "adding route 10.1.0.0/27 to table 119"),
        (lambda: nl.route_add("fd00:1::", 64, oif=missing, table=TABLE),
         errno.ENODEV, "adding route fd00:1::/64 to table 119"),
        (lambda: nl.route_add("10.1.0.0", 27, gateway="10.200.0.1", table=TABLE),
         errno.ENETUNREACH, "adding route 10.1.0.0/27 to table 119"),
        (lambda: nl.route_add("not-an-ip", 32, oif=index), errno.EINVAL,
         "adding route not-an-ip/32"),
        (lambda: nl.route_add("10.1.0.0", 33, oif=index), errno.EINVAL,
         "adding route 10.1.0.0/33"),
        (lambda: nl.route_add("10.1.0.0", 16, gateway="fe80::1", oif=index),
         errno.EINVAL, "adding route 10.1.0.0/16"),
        (lambda: nl.addr_add(index, "10.1.1.1", 40), errno.EINVAL,
         "adding address 10.1.1.1/40"),
    ]
    for call, code, context in cases:
        with pytest.raises(NetlinkError) as info:
            call()
        assert info.value.errno == code, (context, info.value)
        assert str(info.value).startswith(context), str(info.value)
        assert str(info.value).endswith(os.strerror(code))


def test_kernel_quirks(nlmod, routed):
    """What the kernel refuses; documented so that callers do it right."""
    nl, index, _ = routed
    # an IPv6 link-local gateway needs the output interface
    with pytest.raises(NetlinkError) as info:
        nl.route_add("::", 0, gateway="fe80::1", table=TABLE)
    assert info.value.errno == errno.EINVAL
    # an IPv4 gateway route cannot have scope link (nexthop scope)
    nl.route_add("169.254.1.2", 32, oif=index, scope=nlmod.RT_SCOPE_LINK,
                 table=TABLE)
    with pytest.raises(NetlinkError) as info:
        nl.route_add("10.2.0.0", 16, gateway="169.254.1.2", oif=index,
                     scope=nlmod.RT_SCOPE_LINK, table=TABLE)
    assert info.value.errno == errno.ENETUNREACH
    # routes through a link that is down are refused, and taking a link
    # down flushes its routes (both families)
    nl.route_add("fd00:10::7", 128, oif=index, table=TABLE)
    nl.link_set(index, up=False)
    assert nl.route_list(table=TABLE) == []
    for dst, plen in (("10.3.0.0", 16), ("fd00:3::", 64)):
        with pytest.raises(NetlinkError) as info:
            nl.route_add(dst, plen, oif=index, table=TABLE)
        assert info.value.errno == errno.ENETDOWN


# -- pod wiring -------------------------------------------------------------


def _ping(ns, address: str) -> subprocess.CompletedProcess:
    return ns.run("ping", "-c1", "-W1", address)


def _wire_pod(nlmod, node, pod, host_if, pod_ip, pod_ip6=None):
    """Wire ``pod`` to ``node`` the way coild does, through the backend."""
    with nlmod.open_netlink(node.path) as nl, nlmod.open_netlink(pod.path) as pnl:
        h = nl.veth_add(host_if, "eth0", peer_netns=pod.path)
        e = pnl.link_get("eth0").index
        nl.link_set(h, up=True)
        pnl.link_set(e, up=True)
        # node side
        nl.addr_add(h, "169.254.1.1", 32)
        nl.route_add(pod_ip, 32, oif=h, scope=nlmod.RT_SCOPE_LINK)
        # pod side
        pnl.addr_add(e, pod_ip, 32)
        pnl.route_add("169.254.1.1", 32, oif=e, scope=nlmod.RT_SCOPE_LINK)
        pnl.route_add("0.0.0.0", 0, gateway="169.254.1.1", oif=e)
        if pod_ip6:
            nl.addr_add(h, "fe80::1", 64, nodad=True)
            nl.route_add(pod_ip6, 128, oif=h)
            pnl.addr_add(e, pod_ip6, 128, nodad=True)
            pnl.route_add("fe80::1", 128, oif=e)
            pnl.route_add("::", 0, gateway="fe80::1", oif=e)
        return h, e


def _ping_ok(ns, address: str, tries: int = 3):
    if shutil.which("ping") is None:
        pytest.skip("needs ping (Debian: iputils-ping)")
    result = None
    for _ in range(tries):
        result = _ping(ns, address)
        if result.returncode == 0:
            return result
        time.sleep(0.2)
    raise AssertionError(f"ping {address} from {ns.name} failed:\n"
                         f"{result.stdout}{result.stderr}")


def test_pod_wiring_ipv4_ping(nlmod, two):
    node, pod = two
    _wire_pod(nlmod, node, pod, "veth-pod1", "10.64.0.5")
    _ping_ok(pod, "169.254.1.1")
    _ping_ok(node, "10.64.0.5")
    routes = pod.run("ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0 proto static scope link" in routes


def test_pod_wiring_ipv6_ping(nlmod, two):
    node, pod = two
    _wire_pod(nlmod, node, pod, "veth-pod6", "10.64.0.6", "fd00:10::6")
    _ping_ok(pod, "fe80::1%eth0")
    _ping_ok(node, "fd00:10::6")
    routes = pod.run("ip", "-6", "route").stdout
    assert "default via fe80::1 dev eth0" in routes


def test_handle_shared_by_threads(nlmod, netns_factory):
    """The Cython handle may be used from several threads at once; the
    pyroute2 one must stay on the thread that opened it."""
    ns = netns_factory()
    nl = nlmod.open_netlink(ns.path)
    errors: list[BaseException] = []

    def work(i):
        try:
            name = f"v{i}a"
            nl.veth_add(name, f"v{i}b")
            for _ in range(20):
                assert nl.link_get(name) is not None
                nl.link_list()
            assert nl.link_del(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        if nlmod.__name__ == "coil.net._netlink_py":
            t = threading.Thread(target=work, args=(0,))
            t.start()
            t.join()
            assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
            return
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert [link.name for link in nl.link_list()] == ["lo"]
    finally:
        nl.close()


# -- must stay last ---------------------------------------------------------


def test_zz_root_namespace_links_unchanged():
    """Nothing in this module touched the root namespace's links."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    assert _ROOT_LINKS_BEFORE, "snapshot missing"
    assert _ip_link_root() == _ROOT_LINKS_BEFORE


def test_route_types_unreachable_and_blackhole(nlmod, routed):
    """route_add(route_type=...) and route_list(route_type=...): unreachable
    and blackhole routes need no device; iproute2 shows them as such."""
    from coil.net.types import RTN_BLACKHOLE, RTN_UNICAST, RTN_UNREACHABLE
    nl, index, node = routed
    R, V4, V6 = nlmod.Route, socket.AF_INET, socket.AF_INET6
    nl.route_add("10.70.0.0", 27, protocol=PROTO, route_type=RTN_UNREACHABLE)
    nl.route_add("fd00:70::", 120, protocol=PROTO, route_type=RTN_UNREACHABLE)
    nl.route_add("10.71.0.0", 27, protocol=PROTO, route_type=RTN_BLACKHOLE)
    nl.route_add("10.70.0.5", 32, oif=index, scope=nlmod.RT_SCOPE_LINK, protocol=PROTO)
    unreachable = nl.route_list(table=254, protocol=PROTO, route_type=RTN_UNREACHABLE)
    assert [(r.family, r.dst, r.prefixlen, r.type) for r in unreachable] == [
        (V4, "10.70.0.0", 27, RTN_UNREACHABLE), (V6, "fd00:70::", 120, RTN_UNREACHABLE)]
    assert R(V4, "10.71.0.0", 27, None, None, 254, PROTO, 0, RTN_BLACKHOLE) in \
        nl.route_list(table=254, route_type=RTN_BLACKHOLE)
    unicast = nl.route_list(family=V4, table=254, protocol=PROTO, route_type=RTN_UNICAST)
    assert [(r.dst, r.type) for r in unicast] == [("10.70.0.5", RTN_UNICAST)]
    out = node.run("ip", "route", "show", "proto", str(PROTO)).stdout.split("\n")
    assert "unreachable 10.70.0.0/27" in [line.strip() for line in out]
    assert "blackhole 10.71.0.0/27" in [line.strip() for line in out]
    out = node.run("ip", "-6", "route", "show", "proto", str(PROTO)).stdout
    assert "unreachable fd00:70::/120" in out
    # deleting needs no type; re-adding keeps the errno
    with pytest.raises(NetlinkError) as info:
        nl.route_add("10.70.0.0", 27, protocol=PROTO, route_type=RTN_UNREACHABLE)
    assert info.value.errno == errno.EEXIST
    assert nl.route_del("10.70.0.0", 27, protocol=PROTO) is True
    assert nl.route_del("fd00:70::", 120, protocol=PROTO) is True
    assert nl.route_list(table=254, protocol=PROTO, route_type=RTN_UNREACHABLE) == []
    # a bad type is refused before anything is sent
    with pytest.raises(NetlinkError) as info:
        nl.route_add("10.72.0.0", 27, protocol=PROTO, route_type=99)
    assert info.value.errno == errno.EINVAL
