"""NodeAllocator against the real etcd: concurrent threads, block growth,
reload after changes made behind its back."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from coil.coild.allocator import ALLOCATE_ATTEMPTS, NodeAllocator
from coil.errors import AlreadyExists, Conflict, PoolExhausted
from helpers import wait_for


def test_threads_get_unique_addresses_and_blocks_grow(store):
    store.create_pool("default", "10.50.0.0/24", 3)        # blocks of 8
    added, removed = [], []
    alloc = NodeAllocator(store, "n1", on_block_added=added.append, on_block_removed=removed.append)
    alloc.load()
    results, errors = [], []

    def worker(t):
        try:
            for i in range(10):
                results.append(alloc.allocate("default", 4, "ns", f"p{t}-{i}", f"c{t}-{i}"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    addrs = [r.address for r in results]
    assert len(addrs) == 80 and len(set(addrs)) == 80
    assert len(added) == 10 and {b.cidr for b in added} == {b.cidr for b in alloc.blocks()}
    etcd_addrs, _ = store.all_addresses()
    assert sorted(a.address for a in etcd_addrs) == sorted(addrs)
    # a repeated allocation is answered with the held address; another pod
    # under the same container ID is refused
    assert alloc.allocate("default", 4, "ns", "p0-0", "c0-0") in results
    with pytest.raises(AlreadyExists):
        alloc.allocate("default", 4, "ns", "other", "c0-0")


def test_exhaustion_and_empty_block_return(store):
    store.create_pool("default", "10.51.0.0/29", 2)        # two blocks of 4
    removed = []
    alloc = NodeAllocator(store, "n1", on_block_removed=removed.append)
    alloc.load()
    recs = [alloc.allocate("default", 4, "ns", f"p{i}", f"c{i}") for i in range(8)]
    with pytest.raises(PoolExhausted):
        alloc.allocate("default", 4, "ns", "p9", "c9")
    for rec in recs[:4]:
        alloc.release_address(rec)
    returned = alloc.return_empty_blocks()
    assert [b.cidr for b in returned] == ["10.51.0.0/30"] and removed == returned
    assert [b.cidr for b in store.node_blocks("n1")] == ["10.51.0.4/30"]
    # the returned block is taken again when needed
    again = alloc.allocate("default", 4, "ns", "px", "cx")
    assert ipaddress.ip_address(again.address) in ipaddress.ip_network("10.51.0.0/30")


def test_lost_races_are_conflict_not_exhaustion(store, monkeypatch):
    """A rival writer takes every slot the allocator reserves, just before
    its write: after the retry bound the allocation fails with Conflict (the
    CNI "try again" code 11), not PoolExhausted, and holds nothing."""
    from coil.cni import spec
    from coil.cni.service import CNIService
    store.create_pool("default", "10.52.0.0/16", 8)         # blocks of 256: never full here
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    real = store.assign_address
    rivals = []

    def rival_first(block, offset, namespace, pod, container_id, extra=None):
        rivals.append(real(block, offset, "ns", f"rival{offset}", f"r{offset}"))
        return real(block, offset, namespace, pod, container_id, extra)     # None: taken

    monkeypatch.setattr(store, "assign_address", rival_first)
    with pytest.raises(Conflict) as info:
        alloc.allocate("default", 4, "ns", "p1", "c1")
    assert not isinstance(info.value, PoolExhausted)
    # the first round takes a block; every other one lost its slot to the rival
    assert len(rivals) == ALLOCATE_ATTEMPTS - 1 and all(r is not None for r in rivals)
    assert alloc.lookup("c1") == []
    addrs, _ = store.all_addresses()
    assert sorted(a.container_id for a in addrs) == sorted(r.container_id for r in rivals)
    err = CNIService._cni_error(info.value)
    assert err.code == spec.ERR_TRY_AGAIN == 11 and "try again" in err.msg
    monkeypatch.setattr(store, "assign_address", real)       # the race is over: it succeeds
    assert alloc.allocate("default", 4, "ns", "p1", "c1").container_id == "c1"


def test_reload_sees_changes_made_behind_its_back(store):
    store.create_pool("default", "10.52.0.0/24", 3)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    rec = alloc.allocate("default", 4, "ns", "p", "c")
    store.free_address(rec.address)                 # coilctl address free
    alloc.load()
    assert alloc.lookup("c") == []
    block = alloc.blocks()[0]
    assert store.free_block(block)                   # coil-controller freed the node's block
    other = NodeAllocator(store, "n2")
    taken = other.store.acquire_block("default", "n2")
    assert taken.cidr == block.cidr                  # someone else owns it now
    rec2 = alloc.allocate("default", 4, "ns", "p2", "c2")   # stale cache: BlockLost -> reload
    assert ipaddress.ip_address(rec2.address) not in ipaddress.ip_network(block.cidr)


def test_lost_races_are_503_on_the_rest_api(store, monkeypatch, tmp_path):
    """POST /ip whose allocation loses every race answers 503 (try again,
    like CNI code 11) with the Conflict's one line, not 500 "internal"."""
    import json
    import os
    from types import SimpleNamespace

    from harness import unix_http

    from coil.coild.pools import PoolResolver
    from coil.coild.server import ApiSocketServer
    store.create_pool("default", "10.53.0.0/16", 8)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    real = store.assign_address

    def rival_first(block, offset, namespace, pod, container_id, extra=None):
        real(block, offset, "ns", f"rival{offset}", f"r{offset}")
        return real(block, offset, namespace, pod, container_id, extra)     # None: taken

    monkeypatch.setattr(store, "assign_address", rival_first)
    path = os.path.join(str(tmp_path), "api.sock")
    server = ApiSocketServer(path, SimpleNamespace(allocator=alloc, pools=PoolResolver(store)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, text = unix_http(path, "POST", "/ip", json.dumps(
            {"pod-namespace": "default", "pod-name": "web", "container-id": "c1"}))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
    body = json.loads(text)
    assert (status, body["status"]) == (503, 503), body
    assert "lost the race" in body["error"] and "try again" in body["error"]
    assert alloc.lookup("c1") == []


# -- DEL releases under churn: one transaction for the releases that queue ---------------

def _held_first_release(alloc, monkeypatch):
    """Hold the first release in flight (a pause point inside its one-record
    transaction) so that the next ones queue behind it."""
    entered, go = threading.Event(), threading.Event()
    real = alloc.store.release_address

    def held(*args, **kw):
        if not entered.is_set():
            entered.set()
            assert go.wait(30)
        return real(*args, **kw)
    monkeypatch.setattr(alloc.store, "release_address", held)
    return entered, go


def _release_all(alloc, recs):
    errors, threads = [], []
    for rec in recs:
        def call(rec=rec):
            try:
                alloc.release_address(rec)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        threads.append(threading.Thread(target=call))
        threads[-1].start()
    return errors, threads


def _queued(alloc, n):
    wait_for(lambda: len(alloc._releases._queue) >= n, interval=0.001,
             what=f"{n} releases queued")


@pytest.mark.parametrize("fault", ["none", "unknown-not-committed", "unknown-committed",
                                   "one-changed"])
def test_queued_releases_go_out_in_one_transaction(store, monkeypatch, fault):
    """Releases that arrive while one is in flight are deleted by one guarded
    transaction. When that transaction fails, or its outcome is unknown
    (committed or not), each falls back to its own revision-guarded delete:
    every record ends up released, none twice, and nothing else is touched."""
    from coil.errors import OutcomeUnknown
    store.create_pool("default", "10.52.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    recs = [alloc.allocate("default", 4, "ns", f"p{i}", f"c{i}") for i in range(9)]
    keep = alloc.allocate("default", 4, "ns", "keep", "c-keep")
    entered, go = _held_first_release(alloc, monkeypatch)
    batches = []
    real_many = store.release_addresses

    def many(items):
        items = list(items)
        batches.append(items)
        if fault == "unknown-not-committed":
            raise OutcomeUnknown("deadline exceeded (test)")
        if fault == "unknown-committed":
            real_many(items)
            raise OutcomeUnknown("connection lost after the commit (test)")
        if fault == "one-changed":       # someone freed one of them meanwhile
            cidr, offset, rev = items[0]
            assert store.release_address(cidr, offset, rev)
        return real_many(items)
    monkeypatch.setattr(store, "release_addresses", many)

    errors, first = _release_all(alloc, recs[:1])
    assert entered.wait(30)
    more_errors, rest = _release_all(alloc, recs[1:])
    _queued(alloc, 8)
    go.set()
    for t in first + rest:
        t.join(30)
    assert errors == [] and more_errors == []
    assert len(batches) == 1 and sorted(o for _, o, _ in batches[0]) == \
        sorted(r.offset for r in recs[1:])
    held, _ = store.all_addresses()
    assert [a.address for a in held] == [keep.address]          # all freed, keep kept
    assert {r.address for r in alloc.records()} == {keep.address}
    # the freed slots are reused
    again = [alloc.allocate("default", 4, "ns", f"q{i}", f"d{i}") for i in range(9)]
    assert len({a.address for a in again} | {keep.address}) == 10
