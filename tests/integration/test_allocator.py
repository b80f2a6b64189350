"""NodeAllocator against the real etcd: concurrent threads, block growth,
reload after changes made behind its back."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from coil.coild.allocator import ALLOCATE_ATTEMPTS, NodeAllocator
from coil.errors import AlreadyExists, Conflict, PoolExhausted
from coil.store import keys
from helpers import hold_first_call, wait_for


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

def _faulty_batches(monkeypatch, store, method: str, fault: str, inject=None) -> list:
    """Wrap ``store.<method>`` (a multi-record transaction). Its first batch
    raises OutcomeUnknown for the faults "unknown-not-committed" and
    "unknown-committed" (after committing), and runs ``inject(items)``
    before it commits for the others; the retries' batches run as they are.
    Returns the batches seen."""
    from coil.errors import OutcomeUnknown
    batches = []
    real = getattr(store, method)

    def many(items):
        items = list(items)
        batches.append(items)
        if len(batches) > 1:
            return real(items)
        if fault == "unknown-not-committed":
            raise OutcomeUnknown("deadline exceeded (test)")
        if fault == "unknown-committed":
            real(items)
            raise OutcomeUnknown("connection lost after the commit (test)")
        if inject is not None:
            inject(items)
        return real(items)
    monkeypatch.setattr(store, method, many)
    return batches


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
    store.create_pool("default", "10.52.0.0/24", 4)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    recs = [alloc.allocate("default", 4, "ns", f"p{i}", f"c{i}") for i in range(9)]
    keep = alloc.allocate("default", 4, "ns", "keep", "c-keep")
    entered, go = hold_first_call(monkeypatch, alloc.store, "release_address")

    def one_changed(items):              # someone freed one of them meanwhile
        if fault == "one-changed":
            cidr, offset, rev = items[0]
            assert store.release_address(cidr, offset, rev)
    batches = _faulty_batches(monkeypatch, store, "release_addresses", fault, one_changed)

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


# -- ADDs under churn: one transaction for the address writes that queue -----------

def _allocate_all(alloc, names):
    out, errors, threads = {}, [], []
    for name in names:
        def call(name=name):
            try:
                out[name] = alloc.allocate("default", 4, "ns", name, f"c-{name}")
            except Exception as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)
        threads.append(threading.Thread(target=call))
        threads[-1].start()
    return out, errors, threads


@pytest.mark.parametrize("fault", ["none", "one-taken", "block-moved", "unknown-not-committed",
                                   "unknown-committed"])
def test_queued_address_writes_go_out_in_one_transaction(store, monkeypatch, fault):
    """Address writes that queue behind one in flight are committed by one
    guarded transaction. When a compare of that transaction fails (a slot
    taken or the block moved behind the allocator's back), each writes on
    its own; when its outcome is unknown (committed or not), each fences and
    reads back its own slot. Every ADD ends with one address of its own,
    recorded once; the slot somebody else took stays theirs."""
    store.create_pool("default", "10.53.0.0/24", 5)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    warm = alloc.allocate("default", 4, "ns", "warm", "c-warm")    # the node holds a block
    entered, go = hold_first_call(monkeypatch, alloc.store, "assign_address")
    intruder = []

    def behind_its_back(items):
        if fault == "one-taken":          # another writer took one of the slots meanwhile
            block, offset = items[0][0], items[0][1]
            intruder.append(store.assign_address(block, offset, "other", "intruder", "c-x"))
        if fault == "block-moved":        # e.g. a fence of another request moved it on
            block = items[0][0]
            store.etcd.txn([], [("touch", keys.block(block.pool, block.cidr))])
    batches = _faulty_batches(monkeypatch, store, "assign_addresses", fault, behind_its_back)

    first, errors, threads = _allocate_all(alloc, ["a0"])
    assert entered.wait(30)
    rest, more_errors, more = _allocate_all(alloc, [f"a{i}" for i in range(1, 9)])
    wait_for(lambda: len(alloc._assigns._queue) >= 8, interval=0.001, what="8 writes queued")
    go.set()
    for t in threads + more:
        t.join(30)
    assert errors == [] and more_errors == []
    got = {**first, **rest}
    # the eight that queued went out together; only the faults that make
    # writers retry (a moved block, a batch that did not commit) batch again
    assert len(batches[0]) == 8
    if fault in ("none", "one-taken", "unknown-committed"):
        assert len(batches) == 1
    assert sorted(i[3] for i in batches[0]) == sorted(f"a{i}" for i in range(1, 9))
    # one address each, none shared, each recorded once and under its pod
    assert len({r.address for r in got.values()} | {warm.address}) == 10
    held, _ = store.all_addresses()
    by_pod = {a.pod: a for a in held}
    assert len(held) == 10 + len(intruder)
    for name, rec in got.items():
        assert by_pod[name].address == rec.address and by_pod[name].container_id == f"c-{name}"
        assert by_pod[name].revision == rec.revision
    if fault == "one-taken":
        assert intruder[0] is not None and by_pod["intruder"].address == intruder[0].address
        assert intruder[0].address not in {r.address for r in got.values()}
    assert {r.address for r in alloc.records()} == {a.address for a in held} - \
        {a.address for a in held if a.pod == "intruder"}
    # everything is released cleanly; the other writer's record stays
    for rec in list(got.values()) + [warm]:
        alloc.release_address(rec)
    left, _ = store.all_addresses()
    assert [a.pod for a in left] == (["intruder"] if intruder else [])


def test_a_refused_write_in_a_batch_fails_its_own_caller_only(store, monkeypatch):
    """One queued write the store refuses (an invalid record field: nothing
    is sent) does not fail the others of its batch: each writes alone and
    only the bad one gets InvalidArgument; its slot is free again."""
    from coil.errors import InvalidArgument
    store.create_pool("default", "10.54.0.0/24", 5)
    alloc = NodeAllocator(store, "n1")
    alloc.load()
    alloc.allocate("default", 4, "ns", "warm", "c-warm")
    entered, go = hold_first_call(monkeypatch, alloc.store, "assign_address")
    batches = _faulty_batches(monkeypatch, store, "assign_addresses", "none")
    first, errors, threads = _allocate_all(alloc, ["a0"])
    assert entered.wait(30)
    rest, more_errors, more = _allocate_all(alloc, ["a1", "a2"])
    bad = {}

    def call_bad():
        try:
            alloc.allocate("default", 4, "ns", "bad", "c-bad", extra={"ifname": 7})
        except InvalidArgument as exc:
            bad["error"] = exc
    more.append(threading.Thread(target=call_bad))
    more[-1].start()
    wait_for(lambda: len(alloc._assigns._queue) >= 3, interval=0.001, what="3 writes queued")
    go.set()
    for t in threads + more:
        t.join(30)
    assert errors == [] and more_errors == []
    assert len(batches) == 1 and len(batches[0]) == 3         # it was in the batch
    assert "ifname" in str(bad["error"])
    held, _ = store.all_addresses()
    assert sorted(a.pod for a in held) == ["a0", "a1", "a2", "warm"]
    assert alloc.lookup("c-bad") == []
    # nothing stays reserved: every other slot of the block is there to be taken
    more_recs = [alloc.allocate("default", 4, "ns", f"f{i}", f"c-f{i}") for i in range(28)]
    assert len({r.address for r in more_recs} | {a.address for a in held}) == 32
    assert len({r.block for r in more_recs + held}) == 1
