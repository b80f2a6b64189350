"""NodeAllocator against the real etcd: concurrent threads, block growth,
reload after changes made behind its back."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from coil.coild.allocator import NodeAllocator
from coil.errors import AlreadyExists, PoolExhausted


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
