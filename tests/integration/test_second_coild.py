"""A live node keeps its liveness record, its routes and its pods' veths
whatever a second coild does, for real: etcd, network namespaces, coild as
a process, the libcni client.

- a second coild started by mistake on a node (its port or socket in use)
  stops before it changes anything: before, it rewrote ``node-alive/<node>``
  under its own lease (which then lapsed while the first coild ran on), and
  under another node name it removed the node's table 119 routes and the
  veths of every running pod, then exited on "address already in use";
- a liveness record that was rewritten under another lease, or deleted, is
  written again by the live coild's next renewal (before, a live lease was
  taken as proof, the record vanished for good, and coil-controller could
  free the blocks of a live node once its Node object was gone).
"""

from __future__ import annotations

import ipaddress
import os
import signal

import pytest

from harness import Coild, CoilNode
from helpers import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

TTL = 3


@pytest.fixture
def node(etcd_server, store, etcd_prefix, tmp_path):
    os.makedirs(tmp_path / "first")
    n = CoilNode(str(tmp_path / "first"), etcd_server.unix_endpoint, etcd_prefix,
                 extra=["--liveness-ttl", f"{TTL}s"])
    n.store = store
    n.second = None
    try:
        yield n
    finally:
        try:
            if n.second is not None:
                n.second.stop(signal.SIGKILL)
        finally:
            n.close()


def alive(store, name="node1"):
    from coil.store import liveness
    return liveness.read(store.etcd, name)


def second_coild(n, tmp_path, name: str, **kw) -> Coild:
    """Another coild in the same node namespace, with its own sockets."""
    os.makedirs(tmp_path / name, exist_ok=True)
    c = Coild(n.ns, str(tmp_path / name), n.coild.etcd_endpoint, n.coild.prefix,
              node_name=name, extra=["--liveness-ttl", f"{TTL}s"])
    for k, v in kw.items():
        setattr(c, k, v)
    n.second = c
    return c


@pytest.mark.parametrize("name", ["node1", "node1-typo"], ids=["same-name", "other-name"])
def test_a_second_coild_that_cannot_listen_changes_nothing(node, tmp_path, name):
    node.store.create_pool("default", "10.151.0.0/24", 4)
    node.start()
    pod = node.new_pod()
    rc, out = node.cni.call("add", pod, "c1", "default", "p1")
    assert rc == 0, (out, node.coild.log())
    ip = str(ipaddress.ip_interface(out["ips"][0]["address"]).ip)
    host_veth = out["interfaces"][0]["name"]
    block = node.store.node_blocks("node1")[0].cidr
    before = alive(node.store)
    assert before is not None and host_veth in node.ns.links()
    assert block in node.ns.routes("route", "show", "table", "119")

    # the same --http port: it is in use in this namespace
    second = second_coild(node, tmp_path, name)
    second.start(wait=False)
    assert second.proc.wait(60) == 1
    log = second.log()
    assert "cannot listen on --http 127.0.0.1:9383" in log, log
    assert "Traceback" not in log
    assert "liveness record written" not in log and "state loaded" not in log, log

    # nothing of the first coild's node changed
    now = alive(node.store)
    assert (now.lease, now.mod_revision) == (before.lease, before.mod_revision)
    assert alive(node.store, "node1-typo") is None
    assert host_veth in node.ns.links()
    assert block in node.ns.routes("route", "show", "table", "119")
    assert pod.exec("ip", "-o", "addr", "show", "dev", "eth0").stdout.count(ip) == 1
    # and the first coild still serves its pod
    rc, out = node.cni.call("del", pod, "c1", "default", "p1")
    assert rc == 0, out
    assert node.store.etcd.count_prefix("ip/") == 0


def test_a_second_coild_on_the_plugin_socket_changes_nothing(node, tmp_path):
    """Same check when the plugin socket is what is in use (--http off)."""
    node.store.create_pool("default", "10.152.0.0/24", 4)
    node.start()
    before = alive(node.store)
    second = second_coild(node, tmp_path, "node1-typo", socket=node.coild.socket)
    second.extra += ["--http", ""]
    second.start(wait=False)
    assert second.proc.wait(60) == 1
    log = second.log()
    assert f"cannot listen on --socket {node.coild.socket}" in log, log
    assert "Traceback" not in log and "state loaded" not in log, log
    now = alive(node.store)
    assert (now.lease, now.mod_revision) == (before.lease, before.mod_revision)
    assert alive(node.store, "node1-typo") is None


def test_a_second_coild_under_another_name_with_free_listeners_changes_nothing(node,
                                                                              tmp_path):
    """Every listener of its own free, but the namespace's table 119 holds the
    routes of node1's blocks and node1's coild is alive: the second coild
    (a wrong COIL_NODE_NAME) refuses to start before it writes or removes
    anything."""
    node.store.create_pool("default", "10.154.0.0/24", 4)
    node.start()
    pod = node.new_pod()
    rc, out = node.cni.call("add", pod, "c1", "default", "p1")
    assert rc == 0, (out, node.coild.log())
    host_veth = out["interfaces"][0]["name"]
    block = node.store.node_blocks("node1")[0].cidr
    before = alive(node.store)
    second = second_coild(node, tmp_path, "node1-typo", http_port=9390)
    second.start(wait=False)
    assert second.proc.wait(60) == 1
    log = second.log()
    assert f"holds the route of block {block}, which node 'node1' holds" in log, log
    assert "COIL_NODE_NAME" in log and "Traceback" not in log, log
    assert "state loaded" not in log, log
    now = alive(node.store)
    assert (now.lease, now.mod_revision) == (before.lease, before.mod_revision)
    assert alive(node.store, "node1-typo") is None
    assert host_veth in node.ns.links()
    assert block in node.ns.routes("route", "show", "table", "119")
    rc, out = node.cni.call("check", pod, "c1", "default", "p1")
    assert rc == 0, out


def test_a_renamed_node_starts_once_the_old_names_lease_is_gone(node, tmp_path):
    """The same table under a new name starts when the old name's coild is
    gone (its liveness record expired): the old blocks' routes are removed."""
    node.store.create_pool("default", "10.155.0.0/24", 4)
    node.start()
    pod = node.new_pod()
    rc, out = node.cni.call("add", pod, "c1", "default", "p1")
    assert rc == 0, out
    block = node.store.node_blocks("node1")[0].cidr
    node.coild.stop(signal.SIGKILL)
    from coil.store import liveness
    kv = liveness.read(node.store.etcd, "node1")
    assert kv is not None and node.store.etcd.lease_revoke(kv.lease)   # the TTL, at once
    renamed = second_coild(node, tmp_path, "node1-renamed", http_port=9391)
    renamed.start()
    assert block not in node.ns.routes("route", "show", "table", "119")
    assert "state loaded" in renamed.log()
    renamed.stop()


# -- the live coild keeps its record ---------------------------------------------------
def test_renewal_takes_back_a_record_written_under_another_lease(store):
    """Deterministic, no coild process: the keeper itself on a real etcd."""
    from coil.coild.heartbeat import LivenessKeeper
    from coil.store import liveness
    keeper = LivenessKeeper(store.etcd, "n1", ttl=30)
    keeper.ensure()
    assert alive(store, "n1").lease == keeper.lease_id
    # a second coild of the same node name writes the record under its lease
    foreign = store.etcd.lease_grant(30)
    liveness.claim(store.etcd, "n1", foreign, "2026-01-01T00:00:00Z")
    assert alive(store, "n1").lease == foreign
    keeper.renew()
    assert alive(store, "n1").lease == keeper.lease_id
    assert keeper.rewritten == 1
    # ... and stops: its lease ends, the record stays
    assert store.etcd.lease_revoke(foreign)
    assert alive(store, "n1") is not None
    # deleted by hand: written again too
    ok, _, _ = store.etcd.txn([], [("delete", "node-alive/n1")])
    assert ok and alive(store, "n1") is None
    keeper.renew()
    assert alive(store, "n1").lease == keeper.lease_id
    assert keeper.rewritten == 2
    # an intact record costs a read, no write
    rev = alive(store, "n1").mod_revision
    keeper.renew()
    assert alive(store, "n1").mod_revision == rev and keeper.rewritten == 2
    store.etcd.lease_revoke(keeper.lease_id)


def test_live_coild_writes_back_a_record_that_lapsed_under_another_lease(node):
    """The same through a running coild: a record moved to a lease that then
    ends is back under coild's lease within a renewal (every TTL/3)."""
    from coil.store import liveness
    node.store.create_pool("default", "10.153.0.0/24", 4)
    node.start()
    mine = alive(node.store).lease
    foreign = node.store.etcd.lease_grant(60)
    liveness.claim(node.store.etcd, "node1", foreign, "2026-01-01T00:00:00Z")
    node.store.etcd.lease_revoke(foreign)      # the record is gone with it
    back = wait_for(lambda: alive(node.store), timeout=60, what="record written again")
    assert back.lease == mine
    assert "liveness record missing or under another lease" in node.coild.log()
