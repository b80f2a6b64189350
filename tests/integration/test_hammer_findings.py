"""Failures the chaos hammer found (tests/integration/test_hammer.py with
``COIL_HAMMER_FAULTS=etcd-freeze``, and one with member stops), reduced to
deterministic cases.

The first two are address leaks after a transaction whose outcome was
unknown, the way a frozen etcd member (SIGSTOP, then SIGCONT) produces
them: the request reaches the member, its answer does not come back in
time, and the member may still commit it later. Both are fixed: a DEL
(and CHECK, and a repeated ADD) first reads back the container's
quarantined slots and answers "try again" when it cannot, and the
read-back is a fence (``IPAMStore.fence_address``) that moves the block
key's mod revision on, so the late transaction's guard can never hold
again.

The third is a reservation left in the cache for good (its block was never
given back), fixed by tying a reloaded copy of a block to the copy it
replaced by lineage instead of by revision (``NodeAllocator._both``).
"""

from __future__ import annotations

import json
import threading

import pytest

from helpers import (fail_once, hold_back_first_address_write, hold_first_call,
                     unreachable_once)
from coil.coild.allocator import NodeAllocator
from coil.errors import StoreUnavailable


def release(alloc, container_id):
    """Free the container's addresses the way the CNI service's DEL does
    (it reads back the container's quarantined slots first)."""
    for rec in alloc.resolve(container_id):
        alloc.release_address(rec)


def held_by(store) -> list[str]:
    kvs, _ = store.etcd.get_prefix("ip/")
    return sorted(json.loads(kv.value)["container_id"] for kv in kvs)


def test_del_after_an_add_with_unknown_outcome_frees_what_it_committed(store, monkeypatch):
    """An ADD's transaction commits but its answer is lost, and the read-back
    fails too: the slot is quarantined and the ADD answers "try again". The
    runtime then DELs the container (kubelet does, and never retries that
    ADD: the sandbox is gone). The DEL answers success at once without
    reading the slot back, so the committed record stays in etcd for good."""
    store.create_pool("default", "10.64.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    fail_once(monkeypatch, store, "assign_address", commit=True)   # the answer is lost
    unreachable_once(monkeypatch, store, "fence_address")         # and the read-back fails
    with pytest.raises(StoreUnavailable):
        alloc.allocate("default", 4, "ns", "p1", "c1")
    assert held_by(store) == ["c0", "c1"]             # it did commit
    assert alloc.quarantined() and alloc.lookup("c1") == []
    release(alloc, "c1")                               # the runtime's DEL
    assert held_by(store) == ["c0"]
    assert alloc.quarantined() == {} and alloc.lookup("c1") == []


def test_a_late_commit_cannot_bring_back_a_deleted_containers_address(store, monkeypatch):
    """The first transaction of an ADD waits at a frozen member; its caller
    times out (outcome unknown), reads the key back (absent: "not
    committed"), takes the slot again and answers. The container is DELeted.
    Then the member wakes up and commits the first transaction: its guard
    (the key does not exist) holds again, and the deleted container holds
    the address in etcd. In the hammer the same container then showed two
    records and CHECK failed with "prevResult addresses differ from the
    held". A fence (for example a per-node key every assignment compares and
    the read-back bumps first) would make the late transaction fail."""
    store.create_pool("default", "10.64.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    # held at the frozen member
    queued, real_txn = hold_back_first_address_write(monkeypatch, store.etcd)
    alloc.allocate("default", 4, "ns", "p1", "c1")
    release(alloc, "c1")
    assert held_by(store) == ["c0"]
    real_txn(*queued[0])            # the member wakes up: the very same transaction
    assert held_by(store) == ["c0"]


def test_a_write_in_flight_across_a_reload_and_a_fence_leaves_no_reservation(store, monkeypatch):
    """Found by the hammer (seed 3669530497, an etcd member stopped): the
    emptied block never went back to the pool though etcd held no address
    in it. An ADD's write was in flight when a reload replaced the cached
    block (carrying the write's reserved slot over), and then the DEL of
    another container fenced a quarantined slot of that block, which moved
    the new copy's revision on but not the old one's. The write failed
    (the block had moved) and ended its reservation in the old copy only:
    the slot stayed reserved in the cache for good, and a block with a
    reserved slot is never given back."""
    store.create_pool("default", "10.64.0.0/24", 2)          # blocks of 4
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "p0", "c0")
    # c1's write: outcome unknown, and its read-back fails: quarantined
    fail_once(monkeypatch, store, "assign_address", commit=False)
    unreachable_once(monkeypatch, store, "fence_address")
    with pytest.raises(StoreUnavailable):
        alloc.allocate("default", 4, "ns", "p1", "c1")
    ((cidr, slots),) = alloc.quarantined().items()
    assert cidr == "10.64.0.0/30" and list(slots.values()) == ["c1"]
    # c2's write waits at the store, its slot reserved
    reached, go = hold_first_call(monkeypatch, store, "assign_address")
    got = {}
    t = threading.Thread(target=lambda: got.setdefault(
        "c2", alloc.allocate("default", 4, "ns", "p2", "c2")))
    t.start()
    assert reached.wait(30)
    # a reload while it waits (its own read-back of c1 fails: still quarantined)
    unreachable_once(monkeypatch, store, "fence_address")
    alloc.load()
    assert alloc.quarantined()
    # the DEL of c1 fences its slot: the block's revision moves on
    release(alloc, "c1")
    assert alloc.quarantined() == {}
    go.set()                               # c2's write compares the old revision
    t.join(30)
    assert not t.is_alive() and got["c2"].container_id == "c2"
    assert held_by(store) == ["c0", "c2"]
    release(alloc, "c0")
    release(alloc, "c2")
    assert held_by(store) == []
    returned = alloc.return_empty_blocks()
    assert [b.cidr for b in returned] == ["10.64.0.0/30"] and alloc.blocks() == []
    alloc.load()                           # and a reload does not bring a reservation back
    assert alloc.blocks() == []
