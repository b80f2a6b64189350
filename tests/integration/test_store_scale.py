"""Costs that must not grow with the cluster, counted on a real etcd.

Every etcd request of the store goes through ``Etcd._range`` (reads) or
``Etcd.txn`` (transactions); the ``requests`` fixture counts both on the
store's client, so these tests assert how many round trips an operation
costs and what each read covered, not how long it took.
"""

from __future__ import annotations

import ipaddress
import json
import math

import pytest

from coil.errors import PoolExhausted
from coil.store import keys, model
from coil.store.model import RANDOM_TRIES, SCAN_PAGE, SMALL_POOL_BLOCKS

LARGE = "10.0.0.0/20"          # block size 2: 1,024 blocks, above SMALL_POOL_BLOCKS
LARGE_BLOCKS = 1024


class Requests:
    def __init__(self, etcd, monkeypatch):
        self.ranges = []       # (key, range_end, limit, keys_only) of each range request
        self.txns = 0
        real_range, real_txn = etcd._range, etcd.txn

        def counting_range(req):
            self.ranges.append((req.key.decode(), req.range_end.decode(errors="replace"),
                                req.limit, req.keys_only))
            return real_range(req)

        def counting_txn(*args, **kwargs):
            self.txns += 1
            return real_txn(*args, **kwargs)

        monkeypatch.setattr(etcd, "_range", counting_range)
        monkeypatch.setattr(etcd, "txn", counting_txn)

    def reset(self):
        self.ranges.clear()
        self.txns = 0

    @property
    def total(self) -> int:
        return len(self.ranges) + self.txns

    def prefix_reads(self, prefix: str) -> list:
        return [r for r in self.ranges if r[1] and prefix in r[0]]


@pytest.fixture
def requests(store, monkeypatch):
    return Requests(store.etcd, monkeypatch)


def hold_blocks(store, pool: str, cidrs, node="other"):
    """Write held blocks directly (block key + index, as acquire_block does),
    60 per transaction: test setup for pools of thousands of blocks."""
    cidrs = list(cidrs)
    for i in range(0, len(cidrs), 60):
        ops = []
        for c in cidrs[i:i + 60]:
            ops.append(("put", keys.block(pool, c),
                        json.dumps({"node": node, "subnet": LARGE, "acquired_at": ""}).encode()))
            ops.append(("put", keys.node_block(node, c), pool.encode()))
        ok, _, _ = store.etcd.txn([], ops)
        assert ok


def blocks_of(subnet: str, size: int) -> list[str]:
    net = ipaddress.ip_network(subnet)
    return [str(b) for b in net.subnets(new_prefix=net.max_prefixlen - size)]


def test_large_pool_acquire_reads_no_block_key(store, requests):
    """Taking a block of a large pool reads the pool key and nothing else:
    no range over the pool's blocks, whatever it holds."""
    store.create_pool("big", LARGE, 2)
    assert LARGE_BLOCKS > SMALL_POOL_BLOCKS
    hold_blocks(store, "big", blocks_of(LARGE, 2)[:512])       # half full
    got = set()
    for i in range(40):
        requests.reset()
        b = store.acquire_block("big", f"node-{i}")
        got.add(b.cidr)
        assert requests.prefix_reads(keys.BLOCK) == [], "acquire read the pool's block keys"
        assert len(requests.ranges) == 1                        # the pool key
        assert 1 <= requests.txns <= RANDOM_TRIES
        assert ipaddress.ip_network(b.cidr).subnet_of(ipaddress.ip_network(LARGE))
        assert store.etcd.get(keys.node_block(f"node-{i}", b.cidr)).value == b"big"
    assert len(got) == 40 and not got & set(blocks_of(LARGE, 2)[:512])
    assert len(store.pool_blocks("big")) == 552


def test_last_free_blocks_of_a_99_percent_full_pool_are_found(store, requests):
    store.create_pool("big", LARGE, 2)
    every = blocks_of(LARGE, 2)
    free = set(every[5::103])                                   # 10 free blocks, spread out
    assert len(free) == 10
    hold_blocks(store, "big", [c for c in every if c not in free])
    got = set()
    for i in range(10):
        requests.reset()
        got.add(store.acquire_block("big", f"late-{i}").cidr)
        # the random tries, then one paged keys-only scan (and a retry at worst)
        assert requests.txns <= RANDOM_TRIES + 2
        scans = requests.prefix_reads(keys.pool_blocks("big"))
        assert all(keys_only and limit == SCAN_PAGE for _, _, limit, keys_only in scans)
    assert got == free
    assert len(store.pool_blocks("big")) == LARGE_BLOCKS


def test_full_large_pool_raises_exhausted_after_bounded_requests(store, requests):
    store.create_pool("big", LARGE, 2)
    hold_blocks(store, "big", blocks_of(LARGE, 2))
    before = store.etcd.get_prefix("")[0]
    requests.reset()
    with pytest.raises(PoolExhausted) as info:
        store.acquire_block("big", "node-x")
    assert info.value.pool == "big"
    pages = math.ceil(LARGE_BLOCKS / SCAN_PAGE)
    assert len(requests.ranges) == 1 + pages                    # pool key + the paged scan
    assert requests.txns == RANDOM_TRIES
    assert store.etcd.get_prefix("")[0] == before               # nothing written


def test_random_search_follows_a_subnet_added_meanwhile(store, monkeypatch):
    """The create is guarded by the pool's revision: a subnet added between
    reading the pool and the create makes it fail, and the pool read back
    in the same transaction is used for the next try."""
    store.create_pool("big", LARGE, 2)
    hold_blocks(store, "big", blocks_of(LARGE, 2))              # full
    real_txn = store.etcd.txn
    state = {"added": False}

    def txn_adding_a_subnet_first(compares, success, failure=()):
        if not state["added"] and any(op[0] == "put" and op[1].startswith(keys.BLOCK)
                                      for op in success):
            state["added"] = True
            store.add_subnet("big", "10.1.0.0/28")              # 4 more blocks
        return real_txn(compares, success, failure)

    monkeypatch.setattr(store.etcd, "txn", txn_adding_a_subnet_first)
    b = store.acquire_block("big", "node-x")
    assert state["added"]
    assert ipaddress.ip_network(b.cidr).subnet_of(ipaddress.ip_network("10.1.0.0/28"))


def test_small_pool_is_filled_lowest_first_with_one_read(store, requests):
    store.create_pool("small", "10.0.0.0/24", 3)                # 32 blocks
    for i in range(3):
        requests.reset()
        assert store.acquire_block("small", "n").cidr == f"10.0.0.{8 * i}/29"
        assert len(requests.ranges) == 2 and requests.txns == 1


def test_paged_reads_are_complete_and_bounded(store, requests, monkeypatch):
    store.create_pool("big", LARGE, 2)
    held = blocks_of(LARGE, 2)[:95]
    hold_blocks(store, "big", held)
    monkeypatch.setattr(model, "SCAN_PAGE", 10)
    requests.reset()
    assert sorted(b.cidr for b in store.all_blocks()) == sorted(held)
    assert len(requests.ranges) == 10                           # ceil(95 / 10)
    assert all(limit == 10 for _, _, limit, _ in requests.ranges)
    requests.reset()
    assert {b.cidr for b in store.pool_blocks("big")} == set(held)
    assert len(requests.ranges) == 10


def test_pool_usage_requests_do_not_grow_with_blocks(store, requests):
    """Per-block counts would be one request per block; past
    PER_BLOCK_COUNT_LIMIT blocks the usage reads the address keys in pages."""
    store.create_pool("big", LARGE, 2)
    blocks = [store.acquire_block("big", f"n{i % 7}") for i in range(model.PER_BLOCK_COUNT_LIMIT + 40)]
    for i, b in enumerate(blocks[:30]):
        for off in range(i % 4 + 1):
            store.assign_address(b, off, "ns", f"p{i}-{off}", f"c{i}-{off}")
    requests.reset()
    u = store.pool_usage("big")
    assert len(requests.ranges) <= 4 and requests.txns == 0     # pool, blocks, addresses
    rows = {r["block"]: r for r in u["blocks"]}
    assert u["blocks_used"] == len(blocks)
    for i, b in enumerate(blocks):
        want = i % 4 + 1 if i < 30 else 0
        assert (rows[b.cidr]["used"], rows[b.cidr]["free"]) == (want, 4 - want)
        assert rows[b.cidr]["node"] == f"n{i % 7}"


def test_a_collision_aims_the_next_create_at_a_probed_free_block(store, requests, monkeypatch):
    """The failed create's transaction also reads RANDOM_PROBES random block
    keys; the next create goes to one of them that was free: one collision
    costs exactly one more transaction, and no range read."""
    from coil.store.model import RANDOM_PROBES, IPAMStore
    store.create_pool("big", LARGE, 2)
    every = blocks_of(LARGE, 2)
    held, free = every[:900], every[1000]
    hold_blocks(store, "big", held)
    net = ipaddress.ip_network(LARGE)
    picks = iter([held[0]] + held[1:RANDOM_PROBES] + [free] + held[:RANDOM_PROBES] * 4)
    monkeypatch.setattr(IPAMStore, "_random_block",
                        staticmethod(lambda pool, nets: (ipaddress.ip_network(next(picks)), net)))
    requests.reset()
    b = store.acquire_block("big", "node-x")
    assert b.cidr == free
    assert requests.txns == 2 and len(requests.ranges) == 1
