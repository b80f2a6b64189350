"""coild's request safety, in process against the real etcd and real
network namespaces: one request per container at a time, request deadlines,
writes whose outcome is unknown, and reloads racing requests.

Races are injected deterministically: the no-op pause points
(``CNIService._reached``, ``NodeAllocator._reached``) are monkeypatched to
stop a thread on a ``threading.Event``; unknown outcomes are injected by
wrapping a store call so that it commits and then raises
``OutcomeUnknown`` (or raises before it commits). No wall-clock asserts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from types import SimpleNamespace

import pytest

from harness import Netns
from helpers import fail_once, hold_back_first_address_write, unreachable_once

from coil.coild.allocator import NodeAllocator
from coil.cni.protocol import MAGIC
from coil.cni.service import CNIService
from coil.coild.main import Coild
from coil.coild.podnet import PodNetwork
from coil.coild.pools import PoolResolver
from coil.coild.routes import RouteExporter
from coil.errors import AlreadyExists, OutcomeUnknown, StoreUnavailable
from coil.store import keys

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

WAIT = 30          # bound on every Event wait: a hang fails the test instead of blocking


def release(alloc, container_id):
    """Free the container's addresses the way the CNI service's DEL does."""
    for rec in alloc.resolve(container_id):
        alloc.release_address(rec)


class Node:
    """A node namespace with the real allocator, routes, pod network and CNI service."""

    def __init__(self, store):
        self.store = store
        self.ns = Netns("node")
        self.pods = []
        self.routes = RouteExporter(119, 30, netns=self.ns.path)
        self.removed = []
        self.alloc = NodeAllocator(store, "n1", on_block_added=lambda b: self.routes.add(b.cidr),
                                   on_block_removed=self._removed)
        self.svc = CNIService(self.alloc, PodNetwork(host_netns=self.ns.path), PoolResolver(store))

    def _removed(self, block):
        self.removed.append(block.cidr)
        self.routes.remove(block.cidr)

    def pod(self):
        p = Netns("pod")
        self.pods.append(p)
        return p

    def close(self):
        for p in self.pods:
            p.delete()
        self.ns.delete()

    def host_links(self):
        return [link for link in self.ns.links() if link != "lo"]

    def call(self, command, pod, cid, name=None):
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid,
               "CNI_NETNS": pod.path if pod else "", "CNI_IFNAME": "eth0",
               "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name or cid}",
               "CNI_PATH": "/opt/cni/bin"}
        data = MAGIC + b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()) + b"\0"
        data += json.dumps({"cniVersion": "1.0.0", "name": "t", "type": "coil"}).encode()
        code, body = self.svc.handle(data)
        return code, json.loads(body) if body else None


@pytest.fixture
def node(store):
    n = Node(store)
    try:
        yield n
    finally:
        n.close()


def etcd_ips(store) -> dict:
    addrs, _ = store.all_addresses()
    return {a.address: a.container_id for a in addrs}


def ip_of(result) -> str:
    return str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)


def run(fn, *args, events=None, tag=None):
    """Run fn in a thread; returns (thread, result list). Appends
    ("done", tag) to ``events`` when fn returned."""
    out = []

    def body():
        out.append(fn(*args))
        if events is not None:
            events.append(("done", tag))

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


# -- one request per container ---------------------------------------------------------

def test_two_adds_for_one_container_get_one_address(node):
    node.store.create_pool("default", "10.60.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    first_paused, second_waiting, go = threading.Event(), threading.Event(), threading.Event()
    events = []

    def hook(point, req):
        if point == "add:allocated" and not first_paused.is_set():
            first_paused.set()
            assert go.wait(WAIT)
        elif point == "lock:wait" and first_paused.is_set():
            second_waiting.set()
        elif point == "lock:held" and first_paused.is_set():
            events.append(("held", "second"))

    node.svc._reached = hook
    t1, r1 = run(node.call, "ADD", pod, "c1", events=events, tag="first")
    assert first_paused.wait(WAIT)            # the first ADD holds an address, not wired yet
    t2, r2 = run(node.call, "ADD", pod, "c1")
    assert second_waiting.wait(WAIT)
    go.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert events == [("done", "first"), ("held", "second")]   # one after the other
    (c1, res1), (c2, res2) = r1[0], r2[0]
    assert c1 == 0 and c2 == 0, (res1, res2)
    assert ip_of(res1) == ip_of(res2)
    assert res1["interfaces"] == res2["interfaces"]
    assert etcd_ips(node.store) == {ip_of(res1): "c1"}
    assert len(node.host_links()) == 1
    assert node.call("DEL", pod, "c1")[0] == 0
    assert etcd_ips(node.store) == {} and node.host_links() == [] and pod.links() == ["lo"]
    assert len(node.svc.containers) == 0      # the lock registry does not grow


@pytest.mark.parametrize("first", ["ADD", "DEL"])
def test_add_racing_del_for_one_container_stays_consistent(node, first):
    node.store.create_pool("default", "10.61.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    paused, other_waiting, go = threading.Event(), threading.Event(), threading.Event()
    pause_at = "add:wired" if first == "ADD" else "lock:held"
    events = []

    def hook(point, req):
        if point == pause_at and req.command == first and not paused.is_set():
            paused.set()
            assert go.wait(WAIT)
        elif point == "lock:wait" and req.command != first:
            other_waiting.set()
        elif point == "lock:held" and req.command != first:
            events.append(("held", "second"))

    node.svc._reached = hook
    second = "DEL" if first == "ADD" else "ADD"
    t1, r1 = run(node.call, first, pod, "c1", events=events, tag="first")
    assert paused.wait(WAIT)
    t2, r2 = run(node.call, second, pod, "c1")
    assert other_waiting.wait(WAIT)
    go.set()
    t1.join(WAIT)
    t2.join(WAIT)
    assert events == [("done", "first"), ("held", "second")]   # one after the other
    assert r1[0][0] == 0 and r2[0][0] == 0, (r1, r2)
    held = etcd_ips(node.store)
    if first == "ADD":          # ADD then DEL: nothing left
        assert held == {} and node.host_links() == [] and pod.links() == ["lo"]
        assert node.alloc.lookup("c1") == []
    else:                       # DEL (of nothing) then ADD: record and interface both there
        add_result = r2[0][1]
        assert held == {ip_of(add_result): "c1"}
        assert "eth0" in pod.links() and len(node.host_links()) == 1
        assert [a.address for a in node.alloc.lookup("c1")] == [ip_of(add_result)]
        assert node.call("DEL", pod, "c1")[0] == 0
    assert len(node.svc.containers) == 0


def test_gc_leaves_the_add_in_flight_alone(node):
    """GC (no valid attachment) racing an ADD of its network: the container
    has a request in flight, so GC does not wait for it and does not free
    it - the runtime lists it in a later GC once the ADD answered."""
    node.store.create_pool("default", "10.59.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    paused, gc_tried, go = threading.Event(), threading.Event(), threading.Event()
    events = []

    def hook(point, req):
        if point == "add:wired" and not paused.is_set():
            paused.set()
            assert go.wait(WAIT)
        elif point == "lock:wait" and req.command == "GC":
            gc_tried.set()

    node.svc._reached = hook
    t1, r1 = run(node.call, "ADD", pod, "c1", events=events, tag="add")
    assert paused.wait(WAIT)
    gc = {"cniVersion": "1.1.0", "name": "t", "type": "coil", "cni.dev/valid-attachments": []}
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}
    frame = MAGIC + b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()) + b"\0"
    t2, r2 = run(node.svc.handle, frame + json.dumps(gc).encode(), events=events, tag="gc")
    t2.join(WAIT)                      # GC answers while the ADD is still paused
    assert gc_tried.is_set() and r2[0] == (0, b"")
    go.set()
    t1.join(WAIT)
    assert r1[0][0] == 0, r1
    assert events == [("done", "gc"), ("done", "add")]
    assert etcd_ips(node.store) == {ip_of(r1[0][1]): "c1"}
    assert "eth0" in pod.links() and len(node.host_links()) == 1
    assert node.call("DEL", pod, "c1")[0] == 0
    assert len(node.svc.containers) == 0


def test_retried_add_returns_the_same_address(node):
    node.store.create_pool("default", "10.62.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    code, first = node.call("ADD", pod, "c1")
    assert code == 0
    code, again = node.call("ADD", pod, "c1")
    assert code == 0 and again == first
    assert etcd_ips(node.store) == {ip_of(first): "c1"}
    # the allocator itself is idempotent too (REST POST /ip retried) ...
    rec = node.alloc.allocate("default", 4, "default", "c1", "c1")
    assert rec.address == ip_of(first)
    # ... and refuses the same container ID for another pod
    with pytest.raises(AlreadyExists):
        node.alloc.allocate("default", 4, "default", "other", "c1")
    assert node.call("DEL", pod, "c1")[0] == 0


# -- deadlines ---------------------------------------------------------------------------

def test_add_past_its_deadline_is_rolled_back(node):
    node.store.create_pool("default", "10.63.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    now = [1000.0]
    node.svc.clock = lambda: now[0]           # a fake clock: no real waiting
    node.svc.request_timeout = 5.0
    seen = {}

    def hook(point, req):
        if point == "add:wired":              # wired and recorded; then the pause outlasts
            seen["ip"] = dict(etcd_ips(node.store))
            seen["links"] = pod.links()
            now[0] += 6.0

    node.svc._reached = hook
    code, err = node.call("ADD", pod, "c1")
    assert len(seen["ip"]) == 1 and "eth0" in seen["links"]   # it had really been done
    assert code == 1 and err["code"] == 11 and "deadline" in err["msg"], err
    assert etcd_ips(node.store) == {}
    assert pod.links() == ["lo"] and node.host_links() == []
    assert node.alloc.lookup("c1") == [] and node.alloc.count() == 0
    node.svc._reached = lambda point, req: None
    code, res = node.call("ADD", pod, "c1")  # the runtime's retry works
    assert code == 0 and etcd_ips(node.store) == {ip_of(res): "c1"}


# -- unknown outcomes --------------------------------------------------------------------

@pytest.mark.parametrize("commit", [True, False])
def test_assign_with_unknown_outcome(store, monkeypatch, commit):
    store.create_pool("default", "10.64.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")           # the block is held already
    calls = fail_once(monkeypatch, store, "assign_address", commit)
    rec = alloc.allocate("default", 4, "ns", "p1", "c1")
    assert calls
    assert {a: c for a, c in etcd_ips(store).items() if c == "c1"} == {rec.address: "c1"}
    assert alloc.count() == 2 == len(etcd_ips(store))
    block = alloc._blocks[rec.block]
    assert block.bitmap.count() == 2 and not block.pending and not block.quarantine
    if commit:   # the committed record is the one returned (no second address)
        assert rec.offset == calls[0][1]
    assert alloc.allocate("default", 4, "ns", "p1", "c1") == rec
    release(alloc, "c1")
    assert list(etcd_ips(store).values()) == ["c0"] and block.bitmap.count() == 1


@pytest.mark.parametrize("commit", [True, False])
@pytest.mark.parametrize("resolved_by", ["retry", "reload"])
def test_assign_unknown_and_read_back_failing_is_quarantined(store, monkeypatch, commit,
                                                             resolved_by):
    store.create_pool("default", "10.65.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    fail_once(monkeypatch, store, "assign_address", commit)
    unreachable_once(monkeypatch, store, "fence_address")
    with pytest.raises(StoreUnavailable):
        alloc.allocate("default", 4, "ns", "p1", "c1")
    quarantined = alloc.quarantined()
    (cidr, slots), = quarantined.items()
    (offset, cid), = slots.items()
    assert cid == "c1" and alloc.lookup("c1") == []
    assert alloc.unresolved()                                  # coild rescans soon:
    coild = SimpleNamespace(scan_interval=600.0, allocator=alloc)
    assert Coild._scan_due(coild, last=0.0, now=1.0)           # not 600 s later
    assert alloc._blocks[cidr].bitmap.test(offset)            # not handed out meanwhile
    other = alloc.allocate("default", 4, "ns", "p2", "c2")
    assert other.offset != offset
    if resolved_by == "reload":
        alloc.load()
    rec = alloc.allocate("default", 4, "ns", "p1", "c1")       # the runtime's retry
    assert alloc.quarantined() == {} and not alloc.unresolved()
    assert not Coild._scan_due(coild, last=0.0, now=1.0)
    assert Coild._scan_due(coild, last=0.0, now=600.0)
    in_etcd = etcd_ips(store)
    assert sorted(in_etcd.values()) == ["c0", "c1", "c2"]      # one address each
    if commit:
        assert rec.offset == offset                            # the committed one
    for c in ("c0", "c1", "c2"):
        release(alloc, c)
    assert etcd_ips(store) == {} and alloc._blocks[cidr].bitmap.count() == 0


@pytest.mark.parametrize("commit", [True, False])
def test_release_with_unknown_outcome(store, monkeypatch, commit):
    store.create_pool("default", "10.66.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    rec = alloc.allocate("default", 4, "ns", "p1", "c1")
    fail_once(monkeypatch, store, "release_address", commit)
    if commit:
        release(alloc, "c1")
    else:
        with pytest.raises(OutcomeUnknown):       # not freed: the DEL fails, is retried
            release(alloc, "c1")
        assert alloc.lookup("c1") == [rec] and etcd_ips(store) == {rec.address: "c1"}
        release(alloc, "c1")
    assert alloc.lookup("c1") == [] and etcd_ips(store) == {}
    assert alloc._blocks[rec.block].bitmap.count() == 0


@pytest.mark.parametrize("commit", [True, False])
def test_acquire_block_with_unknown_outcome(node, monkeypatch, commit):
    node.store.create_pool("default", "10.67.0.0/24", 4)
    node.alloc.load()
    fail_once(monkeypatch, node.store, "acquire_block", commit)
    rec = node.alloc.allocate("default", 4, "ns", "p1", "c1")
    blocks = node.store.node_blocks("n1")
    assert [b.cidr for b in blocks] == [rec.block]             # no block leaked
    assert [b.cidr for b in node.alloc.blocks()] == [rec.block]
    assert node.routes.current() == {rec.block}


def test_acquire_block_unknown_and_reload_failing_is_adopted_later(node, monkeypatch):
    node.store.create_pool("default", "10.58.0.0/24", 4)
    node.alloc.load()
    fail_once(monkeypatch, node.store, "acquire_block", True)    # committed, answer lost
    unreachable_once(monkeypatch, node.store, "node_blocks")     # and the reload fails
    with pytest.raises(StoreUnavailable):
        node.alloc.allocate("default", 4, "ns", "p1", "c1")
    (block,) = node.store.node_blocks("n1")                     # etcd gave it to the node
    assert node.alloc.blocks() == [] and node.alloc.unresolved()
    node.alloc.load()                                            # the next contact adopts it
    assert node.alloc.blocks() == [block] and not node.alloc.unresolved()
    assert node.routes.current() == {block.cidr}
    rec = node.alloc.allocate("default", 4, "ns", "p1", "c1")
    assert rec.block == block.cidr and node.store.node_blocks("n1") == [block]


@pytest.mark.parametrize("commit", [True, False])
def test_release_block_with_unknown_outcome(node, monkeypatch, commit):
    node.store.create_pool("default", "10.68.0.0/24", 4)
    node.alloc.load()
    rec = node.alloc.allocate("default", 4, "ns", "p1", "c1")
    release(node.alloc, "c1")
    fail_once(monkeypatch, node.store, "release_block", commit)
    returned = node.alloc.return_empty_blocks()
    if commit:     # it left the node: route removed
        assert [b.cidr for b in returned] == [rec.block]
        assert node.store.node_blocks("n1") == [] and node.alloc.blocks() == []
        assert node.routes.current() == set()
    else:          # still ours: kept, route kept
        assert returned == []
        assert [b.cidr for b in node.store.node_blocks("n1")] == [rec.block]
        assert [b.cidr for b in node.alloc.blocks()] == [rec.block]
        assert node.routes.current() == {rec.block}


def test_release_block_unknown_and_read_back_failing_waits_for_reload(node, monkeypatch):
    node.store.create_pool("default", "10.69.0.0/24", 4)
    node.alloc.load()
    rec = node.alloc.allocate("default", 4, "ns", "p1", "c1")
    release(node.alloc, "c1")
    fail_once(monkeypatch, node.store, "release_block", True)
    unreachable_once(monkeypatch, node.store, "get_block")
    with pytest.raises(OutcomeUnknown):
        node.alloc.return_empty_blocks()
    assert node.routes.current() == {rec.block}               # not known to be gone yet
    assert node.alloc.unresolved()
    node.alloc.load()                                          # it is gone: now the route goes
    assert node.routes.current() == set() and node.removed == [rec.block]


# -- reloads -----------------------------------------------------------------------------

def test_reload_keeps_changes_made_while_it_reads(node):
    node.store.create_pool("default", "10.70.0.0/24", 2)       # blocks of 4
    node.alloc.load()
    first = node.alloc.allocate("default", 4, "ns", "p1", "c1")
    read_done, go = threading.Event(), threading.Event()

    def hook(point):
        if point == "load:read":
            read_done.set()
            assert go.wait(WAIT)

    node.alloc._reached = hook
    t, out = run(node.alloc.load)
    assert read_done.wait(WAIT)            # etcd read, cache not swapped yet
    node.alloc._reached = lambda point: None
    added = [node.alloc.allocate("default", 4, "ns", f"p{i}", f"c{i}") for i in range(2, 6)]
    release(node.alloc, "c1")               # a DEL in the window
    blocks = {a.block for a in added}
    assert len(blocks) == 2                # the block filled: a second one taken in the window
    new_block = (blocks - {first.block}).pop()
    assert node.routes.current() == blocks
    go.set()
    t.join(WAIT)
    assert not t.is_alive()
    # nothing lost: the cache equals etcd, and the route of the new block stayed
    assert {b.cidr for b in node.alloc.blocks()} == blocks
    assert node.routes.current() == blocks and node.removed == []
    cached = {r.address: r.container_id for r in node.alloc.records()}
    assert cached == etcd_ips(node.store) == {a.address: a.container_id for a in added}
    assert node.alloc.lookup("c1") == []
    assert node.alloc._blocks[new_block].bitmap.count() == 1
    assert node.alloc._blocks[first.block].bitmap.count() == 3
    for i in range(2, 6):                  # and every DEL frees its address
        release(node.alloc, f"c{i}")
    assert etcd_ips(node.store) == {}


# -- the fence: an unknown address write can never commit after its read-back --------

def count_loads(monkeypatch, alloc) -> list:
    real, calls = alloc.load, []

    def load():
        calls.append(1)
        return real()

    monkeypatch.setattr(alloc, "load", load)
    return calls


def test_a_held_back_assignment_fails_its_guard_after_the_fence(store, monkeypatch):
    """The assignment's transaction is held back (a frozen member that has
    not applied it yet) while its caller gets OutcomeUnknown; the read-back
    (the fence) runs, the ADD is answered, the container DELeted; only then
    is the very same transaction sent: its guard fails, nothing is written,
    and the slot is handed out again."""
    store.create_pool("default", "10.67.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    held_back, real_txn = hold_back_first_address_write(monkeypatch, store.etcd)
    loads = count_loads(monkeypatch, alloc)
    rec = alloc.allocate("default", 4, "ns", "p1", "c1")       # fenced: not committed
    assert held_back
    cidr = rec.block
    # the cache adopted the fence's revision: the retry needed no reload
    assert alloc._blocks[cidr].block.revision == store.get_block("default", cidr).revision
    assert loads == []
    release(alloc, "c1")
    ok, _, _ = real_txn(*held_back[0])                          # the member wakes up
    assert not ok
    assert sorted(etcd_ips(store).values()) == ["c0"]
    assert alloc.quarantined() == {} and alloc.count() == 1
    # every slot of the block is handed out again, the held-back one included
    late = keys.parse_ip_key(held_back[0][1][0][1])
    got = [alloc.allocate("default", 4, "ns", f"p{i}", f"c{i}") for i in range(2, 17)]
    assert len(alloc.blocks()) == 1 and len(etcd_ips(store)) == 16
    assert late in {(a.block, a.offset) for a in got}
    assert loads == []


@pytest.mark.parametrize("commit", [True, False])
def test_an_assignment_in_flight_across_a_fence_retries_without_leaking(store, monkeypatch,
                                                                        commit):
    """A fence moves the block's revision on while another container's
    assignment in the same block is in flight with the old one: that
    assignment loses its guard (BlockLost), sees that the cache moved on,
    and retries against the new revision (no reload, nothing leaked)."""
    store.create_pool("default", "10.68.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    fail_once(monkeypatch, store, "assign_address", commit)
    unreachable_once(monkeypatch, store, "fence_address")
    with pytest.raises(StoreUnavailable):
        alloc.allocate("default", 4, "ns", "pq", "cq")         # quarantined
    assert alloc.quarantined()
    real_assign = store.assign_address
    stale = []

    def assign(block, *args, **kwargs):
        if args[3] == "ca" and not stale:
            stale.append(block)
            alloc.resolve("cq")            # the fence runs while this write is in flight
        return real_assign(block, *args, **kwargs)

    monkeypatch.setattr(store, "assign_address", assign)
    loads = count_loads(monkeypatch, alloc)
    rec = alloc.allocate("default", 4, "ns", "pa", "ca")
    assert stale and loads == []
    assert alloc._blocks[rec.block].block.revision > stale[0].revision
    want = ["c0", "ca"] + (["cq"] if commit else [])
    assert sorted(etcd_ips(store).values()) == want
    assert sorted(r.container_id for r in alloc.records()) == want
    assert alloc.quarantined() == {} and not alloc.unresolved()
    for c in want:
        release(alloc, c)
    assert etcd_ips(store) == {} and alloc._blocks[rec.block].bitmap.count() == 0


def test_del_of_an_unresolved_slot_answers_try_again(node, monkeypatch):
    """A DEL that cannot read back the container's quarantined slot answers
    11 and frees nothing; the runtime's retry of the DEL frees the record."""
    store = node.store
    store.create_pool("default", "10.69.0.0/24", 4)
    node.alloc.load()
    pod = node.pod()
    fail_once(monkeypatch, store, "assign_address", True)      # committed, answer lost
    unreachable_once(monkeypatch, store, "fence_address")
    code, res = node.call("ADD", pod, "c1")
    assert code == 1 and res["code"] == 11
    assert list(etcd_ips(store).values()) == ["c1"]
    unreachable_once(monkeypatch, store, "fence_address")
    code, res = node.call("DEL", pod, "c1")
    assert code == 1 and res["code"] == 11                     # try again, not success
    assert list(etcd_ips(store).values()) == ["c1"]
    code, res = node.call("DEL", pod, "c1")
    assert code == 0
    assert etcd_ips(store) == {} and node.alloc.quarantined() == {}


def test_a_reload_keeps_an_unfenced_slot_until_a_fence_decides_it(store, monkeypatch):
    """The write is held back, its fence fails, and so does the reload's
    fence: the reload must keep the slot quarantined (the block's revision
    is unchanged, so the write can still commit), not take the absent key
    for "not committed". The write then commits late; the container's DEL
    fences, finds the record and frees it: nothing leaks."""
    store.create_pool("default", "10.70.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    held_back, real_txn = hold_back_first_address_write(monkeypatch, store.etcd)
    unreachable_once(monkeypatch, store, "fence_address")
    with pytest.raises(StoreUnavailable):
        alloc.allocate("default", 4, "ns", "p1", "c1")
    quarantined = alloc.quarantined()
    unreachable_once(monkeypatch, store, "fence_address")      # the reload's fence fails
    alloc.load()
    assert alloc.quarantined() == quarantined and alloc.unresolved()
    (cidr, slots), = quarantined.items()
    (offset, _), = slots.items()
    assert alloc._blocks[cidr].bitmap.test(offset)              # still not handed out
    ok, _, _ = real_txn(*held_back[0])                          # the late commit
    assert ok and sorted(etcd_ips(store).values()) == ["c0", "c1"]
    release(alloc, "c1")                                        # the runtime's DEL
    assert sorted(etcd_ips(store).values()) == ["c0"]
    assert alloc.quarantined() == {} and not alloc.unresolved()
    assert alloc._blocks[cidr].bitmap.count() == 1
