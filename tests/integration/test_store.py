"""IPAMStore against a real etcd: pools, subnets, blocks, addresses.

Every rejected input is also checked to have written nothing: the full
key/value dump of the test's prefix is compared before and after.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json

import pytest

from coil.errors import (AlreadyExists, CoilError, Conflict, InvalidArgument, NotFound,
                         PoolExhausted)
from coil.store import keys
from coil.store.model import MAX_BLOCK_SIZE, Block, BlockLost


# -- helpers ---------------------------------------------------------------------

def dump(store) -> dict:
    """Every key under the test's prefix with its value and mod revision."""
    kvs, _ = store.etcd.get_prefix("")
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


def rejected(store, exc_type, fn, *args, **kwargs):
    """Call fn, expect exc_type, and assert etcd is unchanged. Returns the error."""
    before = dump(store)
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert dump(store) == before, f"{fn.__name__}{args} wrote to etcd although it failed"
    assert "\n" not in info.value.one_line()
    return info.value


def unchanged(store, fn, *args, **kwargs):
    """Call fn and assert etcd is unchanged. Returns fn's result."""
    before = dump(store)
    result = fn(*args, **kwargs)
    assert dump(store) == before, f"{fn.__name__}{args} wrote to etcd"
    return result


def value(store, key):
    kv = store.etcd.get(key)
    return None if kv is None else json.loads(kv.value)


@pytest.fixture
def default_pool(store):
    return store.create_pool("default", "10.0.0.0/24", 3)   # 32 blocks of 8


# -- pools -----------------------------------------------------------------------

def test_create_pool_writes_pool_and_subnet_keys(store):
    p = store.create_pool("default", "10.0.0.0/24", 3)
    assert p.name == "default"
    assert p.subnets == (ipaddress.ip_network("10.0.0.0/24"),)
    assert p.block_size == 3
    assert p.revision > 0
    assert p.to_json() == {"name": "default", "subnets": ["10.0.0.0/24"], "block_size": 3}
    assert value(store, "pool/default") == {"subnets": ["10.0.0.0/24"], "block_size": 3}
    assert value(store, "subnet/10.0.0.0/24") == {"pool": "default"}
    assert store.etcd.get(keys.SUBNETS_GUARD) is not None
    assert store.get_pool("default") == p


def test_list_pools_sorted(store):
    store.create_pool("zeta", "10.9.0.0/24", 4)
    store.create_pool("default", "10.0.0.0/16", 5)
    store.create_pool("alpha", "fd00::/112", 6)
    pools = store.list_pools()
    assert [p.name for p in pools] == ["alpha", "default", "zeta"]
    assert pools[0].subnets == (ipaddress.ip_network("fd00::/112"),)
    assert [p.block_size for p in pools] == [6, 5, 4]


def test_list_pools_empty(store):
    assert store.list_pools() == []


def test_get_unknown_pool(store):
    err = rejected(store, NotFound, store.get_pool, "missing")
    assert "'missing'" in str(err)


def test_create_existing_pool_rejected(store, default_pool):
    err = rejected(store, AlreadyExists, store.create_pool, "default", "10.1.0.0/24", 3)
    assert "'default'" in str(err)


@pytest.mark.parametrize("name", [
    "Default", "a_b", "-a", "a-", "", "x" * 64, "a.b", "a/b", "a b", "pool/x", "é",
])
def test_invalid_pool_names(store, name):
    err = rejected(store, InvalidArgument, store.create_pool, name, "10.0.0.0/24", 3)
    assert repr(name) in str(err)
    rejected(store, InvalidArgument, store.get_pool, name)


def test_invalid_pool_name_on_add_subnet(store):
    rejected(store, InvalidArgument, store.add_subnet, "Bad_Name", "10.0.0.0/24")


def test_longest_pool_name_accepted(store):
    name = "a" * 63
    assert store.create_pool(name, "10.0.0.0/24", 3).name == name


@pytest.mark.parametrize("subnet", [
    "10.0.0.0", "10.0.0.1/24", "bogus/24", "10.0.0.0/33", "10.0.0.0/abc", "", "fd00::1/64",
    "fd00::/129", "10.0.0.0/24/1",
])
def test_invalid_subnets(store, subnet):
    err = rejected(store, InvalidArgument, store.create_pool, "default", subnet, 3)
    assert repr(subnet) in str(err)


def test_host_bits_message_suggests_network(store):
    err = rejected(store, InvalidArgument, store.create_pool, "default", "10.0.0.7/24", 3)
    assert "10.0.0.0/24" in str(err)


# -- subnets: unique and non-overlapping ---------------------------------------------

OVERLAPS = {
    4: ("10.10.0.0/16", {
        "duplicate": "10.10.0.0/16",
        "contained": "10.10.5.0/24",
        "containing": "10.0.0.0/8",
        "overlapping": "10.10.255.0/24",
    }),
    6: ("fd00:10::/64", {
        "duplicate": "fd00:10::/64",
        "contained": "fd00:10::/112",
        "containing": "fd00::/16",
        "overlapping": "fd00:10:0:0:ffff::/80",
    }),
}
CASES = [(v, kind) for v in (4, 6) for kind in ("duplicate", "contained", "containing",
                                                 "overlapping")]


@pytest.mark.parametrize("version,kind", CASES)
def test_subnet_conflicts_with_another_pool(store, version, kind):
    first, others = OVERLAPS[version]
    store.create_pool("default", first, 4)
    new = others[kind]
    err = rejected(store, AlreadyExists, store.create_pool, "other", new, 4)
    assert str(ipaddress.ip_network(new)) in str(err)
    assert "'default'" in str(err)
    # and the other pool was not created
    rejected(store, NotFound, store.get_pool, "other")


@pytest.mark.parametrize("version,kind", CASES)
def test_subnet_conflicts_on_add_subnet_same_pool(store, version, kind):
    first, others = OVERLAPS[version]
    store.create_pool("default", first, 4)
    new = others[kind]
    err = rejected(store, AlreadyExists, store.add_subnet, "default", new)
    assert str(ipaddress.ip_network(new)) in str(err)


@pytest.mark.parametrize("version,kind", CASES)
def test_subnet_conflicts_on_add_subnet_other_pool(store, version, kind):
    first, others = OVERLAPS[version]
    store.create_pool("default", first, 4)
    store.create_pool("other", "172.16.0.0/24" if version == 4 else "fd99::/112", 4)
    new = others[kind]
    rejected(store, AlreadyExists, store.add_subnet, "other", new)


def test_adjacent_subnets_and_other_family_are_fine(store):
    store.create_pool("default", "10.10.0.0/24", 4)
    store.create_pool("other", "10.10.1.0/24", 4)
    store.add_subnet("other", "10.10.2.0/23")
    # ::ffff:10.10.0.0/120 is IPv6; it does not clash with the IPv4 10.10.0.0/24
    store.add_subnet("default", "::ffff:a0a:0/120")
    subnets = {kv.key for kv in store.etcd.get_prefix(keys.SUBNET)[0]}
    assert subnets == {"subnet/10.10.0.0/24", "subnet/10.10.1.0/24", "subnet/10.10.2.0/23",
                       "subnet/::ffff:a0a:0/120"}


def test_add_subnet(store, default_pool):
    guard_before = store.etcd.get(keys.SUBNETS_GUARD).value
    p = store.add_subnet("default", "10.1.0.0/24")
    assert p.subnets == (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("10.1.0.0/24"))
    assert p.block_size == 3
    assert store.get_pool("default").subnets == p.subnets
    assert value(store, "pool/default") == {"subnets": ["10.0.0.0/24", "10.1.0.0/24"],
                                            "block_size": 3}
    assert value(store, "subnet/10.1.0.0/24") == {"pool": "default"}
    assert store.etcd.get(keys.SUBNETS_GUARD).value != guard_before
    p6 = store.add_subnet("default", "fd00:1::/112")
    assert len(p6.subnets) == 3


def test_add_subnet_to_unknown_pool(store, default_pool):
    err = rejected(store, NotFound, store.add_subnet, "missing", "10.1.0.0/24")
    assert "'missing'" in str(err)


def test_add_invalid_subnet(store, default_pool):
    rejected(store, InvalidArgument, store.add_subnet, "default", "10.1.0.1/24")
    rejected(store, InvalidArgument, store.add_subnet, "default", "not-a-subnet")


# -- block size ------------------------------------------------------------------

@pytest.mark.parametrize("size", [-1, 17, 100, "x", "3.5", 1.5, "", None, "0x3"])
def test_block_size_out_of_range(store, size):
    err = rejected(store, InvalidArgument, store.create_pool, "default", "10.0.0.0/8", size)
    assert "block size" in str(err)
    assert str(size) in str(err)


def test_block_size_bounds_accepted(store):
    assert store.create_pool("zero", "10.0.0.0/24", 0).block_size == 0
    assert store.create_pool("big", "10.1.0.0/16", MAX_BLOCK_SIZE).block_size == MAX_BLOCK_SIZE
    assert store.create_pool("text", "10.2.0.0/24", "5").block_size == 5


def test_block_size_larger_than_subnet(store):
    err = rejected(store, InvalidArgument, store.create_pool, "default", "10.0.0.0/24", 9)
    assert "9" in str(err) and "10.0.0.0/24" in str(err)
    err = rejected(store, InvalidArgument, store.create_pool, "default", "fd00::/120", 9)
    assert "fd00::/120" in str(err)
    # equal to the subnet: one block
    assert store.create_pool("default", "10.0.0.0/24", 8).block_size == 8


def test_added_subnet_smaller_than_block(store):
    store.create_pool("default", "10.0.0.0/24", 5)
    err = rejected(store, InvalidArgument, store.add_subnet, "default", "10.1.0.0/28")
    assert "10.1.0.0/28" in str(err)


# -- blocks ----------------------------------------------------------------------

def test_acquire_block(store, default_pool):
    b = store.acquire_block("default", "node-1")
    net = ipaddress.ip_network(b.cidr)
    subnet = ipaddress.ip_network("10.0.0.0/24")
    assert net.prefixlen == 32 - 3
    assert net.subnet_of(subnet)
    assert int(net.network_address) % 8 == 0
    assert b.pool == "default" and b.node == "node-1"
    assert b.subnet == "10.0.0.0/24"
    assert b.size == 8
    assert b.revision > 0
    datetime.datetime.strptime(b.acquired_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    rec = value(store, keys.block("default", b.cidr))
    assert rec == {"node": "node-1", "subnet": "10.0.0.0/24", "acquired_at": b.acquired_at}
    assert store.etcd.get(keys.block("default", b.cidr)).mod_revision == b.revision
    assert store.etcd.get(keys.node_block("node-1", b.cidr)).value == b"default"


def test_blocks_are_sequential_and_distinct(store, default_pool):
    got = [store.acquire_block("default", f"node-{i % 3}").cidr for i in range(10)]
    assert got == [f"10.0.0.{8 * i}/29" for i in range(10)]


def test_freed_block_is_reused_first(store, default_pool):
    blocks = [store.acquire_block("default", "node-1") for _ in range(3)]
    assert store.release_block(blocks[1])
    assert store.acquire_block("default", "node-2").cidr == blocks[1].cidr


def test_exhaustion(store):
    store.create_pool("small", "10.0.0.0/28", 2)   # 4 blocks
    got = {store.acquire_block("small", "node-1").cidr for _ in range(4)}
    assert got == {"10.0.0.0/30", "10.0.0.4/30", "10.0.0.8/30", "10.0.0.12/30"}
    err = rejected(store, PoolExhausted, store.acquire_block, "small", "node-2")
    assert err.pool == "small"
    assert "'small'" in str(err)
    assert "add-subnet" in err.one_line()
    # a new subnet ends the exhaustion
    store.add_subnet("small", "10.0.1.0/30")
    assert store.acquire_block("small", "node-2").cidr == "10.0.1.0/30"
    rejected(store, PoolExhausted, store.acquire_block, "small", "node-2")


def test_exhaustion_is_per_ip_version(store):
    store.create_pool("dual", "10.0.0.0/30", 2)
    store.add_subnet("dual", "fd00::/126")
    store.acquire_block("dual", "node-1", version=4)
    rejected(store, PoolExhausted, store.acquire_block, "dual", "node-1", version=4)
    b6 = store.acquire_block("dual", "node-1", version=6)
    assert b6.cidr == "fd00::/126"
    rejected(store, PoolExhausted, store.acquire_block, "dual", "node-1", version=6)


def test_ipv6_blocks(store):
    store.create_pool("global", "192.168.0.0/24", 4)
    store.add_subnet("global", "fd00:1::/112")
    blocks = [store.acquire_block("global", "node-1", version=6) for _ in range(3)]
    subnet = ipaddress.ip_network("fd00:1::/112")
    for i, b in enumerate(blocks):
        net = ipaddress.ip_network(b.cidr)
        assert net.version == 6 and net.prefixlen == 124
        assert net.subnet_of(subnet)
        assert b.subnet == "fd00:1::/112"
        assert int(net.network_address) % 16 == 0
    # 4,112 blocks: a large pool, so blocks are chosen at random, never twice
    assert len({b.cidr for b in blocks}) == 3
    b4 = store.acquire_block("global", "node-1", version=4)
    assert ipaddress.ip_network(b4.cidr).version == 4
    # the IPv6 address keys work with the colons and slashes of the CIDR
    a = store.assign_address(blocks[2], 15, "ns", "pod", "c1")
    assert a.address == str(ipaddress.ip_network(blocks[2].cidr).network_address + 15)
    info = store.address_info(a.address)
    assert info["block"] == blocks[2].cidr and info["node"] == "node-1"


def test_no_subnet_of_that_version(store, default_pool):
    err = rejected(store, InvalidArgument, store.acquire_block, "default", "node-1", version=6)
    assert "IPv6" in str(err) and "'default'" in str(err)
    store.create_pool("v6only", "fd00::/112", 4)
    err = rejected(store, InvalidArgument, store.acquire_block, "v6only", "node-1", version=4)
    assert "IPv4" in str(err)


def test_acquire_from_unknown_pool(store, default_pool):
    err = rejected(store, NotFound, store.acquire_block, "missing", "node-1")
    assert "'missing'" in str(err)


@pytest.mark.parametrize("node", ["", "Node1", "node_1", "-node", "node-", "a" * 254, "a/b"])
def test_acquire_with_invalid_node_name(store, default_pool, node):
    err = rejected(store, InvalidArgument, store.acquire_block, "default", node)
    assert repr(node) in str(err)


def test_node_name_may_be_a_dns_subdomain(store, default_pool):
    assert store.acquire_block("default", "worker-1.example.com").node == "worker-1.example.com"


def test_release_block_refuses_while_address_held(store, default_pool):
    b = store.acquire_block("default", "node-1")
    a = store.assign_address(b, 3, "ns", "pod", "cid")
    assert unchanged(store, store.release_block, b) is False
    assert store.release_address(b.cidr, 3, a.revision)
    assert store.release_block(b) is True
    assert store.etcd.get(keys.block("default", b.cidr)) is None
    assert store.etcd.get(keys.node_block("node-1", b.cidr)) is None
    # safe to repeat
    assert unchanged(store, store.release_block, b) is False


def test_release_block_refuses_when_revision_changed(store, default_pool):
    old = store.acquire_block("default", "node-1")
    assert store.release_block(old)
    new = store.acquire_block("default", "node-2")
    assert new.cidr == old.cidr and new.revision != old.revision
    assert unchanged(store, store.release_block, old) is False
    # a stale copy with a wrong revision but the right node also fails
    stale = Block(new.pool, new.cidr, new.node, new.revision - 1)
    assert unchanged(store, store.release_block, stale) is False
    assert value(store, keys.block("default", new.cidr))["node"] == "node-2"
    assert store.etcd.get(keys.node_block("node-2", new.cidr)) is not None


def test_free_block_removes_addresses_too(store, default_pool):
    b1 = store.acquire_block("default", "node-1")
    b2 = store.acquire_block("default", "node-1")
    for off in (0, 1, 7):
        store.assign_address(b1, off, "ns", f"pod-{off}", f"c{off}")
    keep = store.assign_address(b2, 2, "ns", "other", "c-other")
    assert store.free_block(b1) is True
    assert store.etcd.get(keys.block("default", b1.cidr)) is None
    assert store.etcd.get(keys.node_block("node-1", b1.cidr)) is None
    assert store.block_addresses(b1.cidr) == []
    assert store.block_addresses(b2.cidr) == [keep]
    assert [b.cidr for b in store.node_blocks("node-1")] == [b2.cidr]
    # safe to repeat, and a stale revision changes nothing
    assert unchanged(store, store.free_block, b1) is False
    stale = Block(b2.pool, b2.cidr, b2.node, b2.revision + 1000)
    assert unchanged(store, store.free_block, stale) is False


def test_free_block_does_not_touch_similar_cidrs(store):
    # ip/10.0.0.0/2x/... must not be caught by the prefix of ip/10.0.0.0/2/...
    store.create_pool("wide", "10.0.0.0/8", 16)
    store.create_pool("narrow", "11.0.0.0/24", 2)
    wide = store.acquire_block("wide", "node-1")          # 10.0.0.0/16
    assert wide.cidr == "10.0.0.0/16"
    store.assign_address(wide, 1, "ns", "a", "c1")
    narrow = store.acquire_block("narrow", "node-1")      # 11.0.0.0/30
    store.assign_address(narrow, 1, "ns", "b", "c2")
    assert store.free_block(narrow)
    assert len(store.block_addresses(wide.cidr)) == 1


# -- addresses ---------------------------------------------------------------------

def test_assign_address_record(store, default_pool):
    b = store.acquire_block("default", "node-1")
    a = store.assign_address(b, 5, "team-a", "web-0", "abc123")
    assert a.address == str(ipaddress.ip_network(b.cidr).network_address + 5)
    assert a.block == b.cidr and a.offset == 5
    assert (a.namespace, a.pod, a.container_id) == ("team-a", "web-0", "abc123")
    assert a.revision > b.revision
    datetime.datetime.strptime(a.created_at, "%Y-%m-%dT%H:%M:%S.%fZ")
    kv = store.etcd.get(keys.ip(b.cidr, 5))
    assert kv.mod_revision == a.revision
    assert json.loads(kv.value) == {"namespace": "team-a", "pod": "web-0",
                                    "container_id": "abc123", "created_at": a.created_at}
    assert a.to_json() == {"address": a.address, "block": b.cidr, "namespace": "team-a",
                           "pod": "web-0", "container_id": "abc123",
                           "created_at": a.created_at}
    assert store.block_addresses(b.cidr) == [a]
    assert store.count_addresses(b.cidr) == 1
    all_addrs, rev = store.all_addresses()
    assert all_addrs == [a] and rev >= a.revision
    # a record written before records carried an origin reads as unknown, ifname eth0
    assert (a.origin, a.network, a.ifname, a.release_if_leaked) == ("", "", "eth0", False)


def test_address_record_origin_fields(store, default_pool):
    b = store.acquire_block("default", "node-1")
    cni = store.assign_address(b, 1, "ns", "p", "c1",
                               {"origin": "cni", "network": "k8s-pod-network", "ifname": "net1"})
    rest = store.assign_address(b, 2, "ns", "q", "c2",
                                {"origin": "rest", "release_if_leaked": True})
    assert json.loads(store.etcd.get(keys.ip(b.cidr, 1)).value)["network"] == "k8s-pod-network"
    by_offset = {a.offset: a for a in store.block_addresses(b.cidr)}
    assert by_offset[1] == cni and by_offset[2] == rest
    assert (cni.origin, cni.network, cni.ifname) == ("cni", "k8s-pod-network", "net1")
    assert (rest.origin, rest.release_if_leaked) == ("rest", True)
    assert cni.to_json()["ifname"] == "net1" and rest.to_json()["release_if_leaked"] is True
    # an unknown or mistyped field is refused and nothing is written
    for bad in ({"color": "red"}, {"release_if_leaked": "yes"}, {"origin": 1}):
        with pytest.raises(InvalidArgument):
            store.assign_address(b, 3, "ns", "r", "c3", bad)
    assert store.count_addresses(b.cidr) == 2


def test_free_block_refused_while_node_is_alive(store, default_pool):
    """The liveness record is compared in the release transaction."""
    from coil.store import liveness
    b = store.acquire_block("default", "node-1")
    store.assign_address(b, 0, "ns", "p", "c1")
    lease = store.etcd.lease_grant(30)
    liveness.claim(store.etcd, "node-1", lease, "now")
    assert liveness.read(store.etcd, "node-1") is not None
    assert store.free_block(b) is False
    assert store.count_addresses(b.cidr) == 1 and store.node_blocks("node-1") == [b]
    assert store.etcd.lease_revoke(lease) is True          # the lease ends: record gone
    assert liveness.read(store.etcd, "node-1") is None
    assert store.etcd.lease_revoke(lease) is False
    assert store.etcd.lease_keepalive(lease) <= 0
    assert store.free_block(b) is True
    assert store.node_blocks("node-1") == [] and store.count_addresses(b.cidr) == 0


def test_assign_every_offset(store, default_pool):
    b = store.acquire_block("default", "node-1")
    got = [store.assign_address(b, off, "ns", f"p{off}", f"c{off}") for off in range(b.size)]
    assert all(got)
    assert [a.address for a in got] == [f"10.0.0.{i}" for i in range(8)]
    assert store.count_addresses(b.cidr) == 8


def test_assign_taken_address_returns_none(store, default_pool):
    b = store.acquire_block("default", "node-1")
    first = store.assign_address(b, 1, "ns", "a", "c1")
    assert unchanged(store, store.assign_address, b, 1, "ns", "b", "c2") is None
    assert store.block_addresses(b.cidr) == [first]


def test_assign_addresses_all_or_none(store, default_pool):
    """Several address writes in one transaction (coild's group commit):
    all recorded with one revision, or - a slot taken, a block moved on, one
    block given with two revisions - none, and etcd unchanged."""
    b1 = store.acquire_block("default", "node-1")
    b2 = store.acquire_block("default", "node-1")
    got = store.assign_addresses([(b1, 1, "ns", "a", "c-a", None),
                                  (b2, 2, "ns", "b", "c-b", {"origin": "cni", "ifname": "net1"}),
                                  (b1, 3, "ns", "c", "c-c", None)])
    assert [(a.block, a.offset, a.pod) for a in got] == [(b1.cidr, 1, "a"), (b2.cidr, 2, "b"),
                                                         (b1.cidr, 3, "c")]
    assert len({a.revision for a in got}) == 1 and got[1].ifname == "net1"
    assert sorted(store.block_addresses(b1.cidr) + store.block_addresses(b2.cidr),
                  key=lambda a: a.offset) == got
    # a taken slot: nothing of the batch is written
    assert unchanged(store, store.assign_addresses, [(b1, 4, "ns", "d", "c-d", None),
                                                     (b1, 1, "ns", "e", "c-e", None)]) is None
    # one block with two revisions: one is stale, nothing is sent
    moved = dataclasses.replace(b1, revision=b1.revision + 1)
    assert unchanged(store, store.assign_addresses, [(b1, 5, "ns", "f", "c-f", None),
                                                     (moved, 6, "ns", "g", "c-g", None)]) is None
    # the block moved on (its key rewritten): nothing is written
    store.etcd.txn([], [("touch", keys.block(b2.pool, b2.cidr))])
    assert unchanged(store, store.assign_addresses, [(b2, 7, "ns", "h", "c-h", None)]) is None
    for bad in ([], [(b1, 5, "ns", "i", "c-i", None)] * 33,
                [(b1, 99, "ns", "j", "c-j", None)], [(b1, 5, "ns", "k", "c-k", {"bogus": 1})]):
        rejected(store, InvalidArgument, store.assign_addresses, bad)


@pytest.mark.parametrize("offset", [-1, 8, 1000])
def test_assign_offset_outside_block(store, default_pool, offset):
    b = store.acquire_block("default", "node-1")
    err = rejected(store, InvalidArgument, store.assign_address, b, offset, "ns", "p", "c")
    assert str(offset) in str(err) and b.cidr in str(err)


def test_assign_after_block_freed_raises_block_lost(store, default_pool):
    b = store.acquire_block("default", "node-1")
    store.assign_address(b, 0, "ns", "a", "c1")
    assert store.free_block(b)
    err = rejected(store, BlockLost, store.assign_address, b, 1, "ns", "b", "c2")
    assert isinstance(err, Conflict) and isinstance(err, CoilError)
    assert b.cidr in str(err) and "node-1" in str(err)


def test_assign_after_block_released_and_retaken(store, default_pool):
    old = store.acquire_block("default", "node-1")
    assert store.release_block(old)
    new = store.acquire_block("default", "node-2")
    assert new.cidr == old.cidr
    rejected(store, BlockLost, store.assign_address, old, 0, "ns", "a", "c1")
    # also when the offset is taken by the new owner: still lost, not "taken"
    store.assign_address(new, 0, "ns", "b", "c2")
    rejected(store, BlockLost, store.assign_address, old, 0, "ns", "a", "c1")


def test_release_address(store, default_pool):
    b = store.acquire_block("default", "node-1")
    a = store.assign_address(b, 4, "ns", "p", "c")
    assert unchanged(store, store.release_address, b.cidr, 4, a.revision + 1) is False
    assert unchanged(store, store.release_address, b.cidr, 4, a.revision - 1) is False
    assert store.etcd.get(keys.ip(b.cidr, 4)) is not None
    assert store.release_address(b.cidr, 4, a.revision) is True
    assert store.etcd.get(keys.ip(b.cidr, 4)) is None
    # safe to repeat
    assert unchanged(store, store.release_address, b.cidr, 4, a.revision) is False
    assert unchanged(store, store.release_address, b.cidr, 4) is False


def test_release_address_stale_revision_after_reassign(store, default_pool):
    b = store.acquire_block("default", "node-1")
    first = store.assign_address(b, 4, "ns", "p", "c1")
    assert store.release_address(b.cidr, 4, first.revision)
    second = store.assign_address(b, 4, "ns", "p", "c2")
    # the first owner's late release must not delete the second record
    assert unchanged(store, store.release_address, b.cidr, 4, first.revision) is False
    assert store.block_addresses(b.cidr) == [second]


def test_release_address_without_revision(store, default_pool):
    b = store.acquire_block("default", "node-1")
    store.assign_address(b, 6, "ns", "p", "c")
    assert store.release_address(b.cidr, 6) is True
    assert store.count_addresses(b.cidr) == 0


def test_address_info(store):
    store.create_pool("default", "10.0.0.0/24", 3)
    store.create_pool("global", "192.168.0.0/24", 2)
    b = store.acquire_block("default", "node-1")
    store.acquire_block("global", "node-2")
    a = store.assign_address(b, 2, "team-a", "web-0", "abc")
    info = unchanged(store, store.address_info, "10.0.0.2")
    assert info == {"address": "10.0.0.2", "block": b.cidr, "namespace": "team-a",
                    "pod": "web-0", "container_id": "abc", "created_at": a.created_at,
                    "pool": "default", "node": "node-1"}
    assert store.address_info(" 10.0.0.2 ")["address"] == "10.0.0.2"


def test_address_info_errors(store, default_pool):
    b = store.acquire_block("default", "node-1")
    err = rejected(store, NotFound, store.address_info, "10.0.0.3")
    assert "10.0.0.3" in str(err) and b.cidr in str(err) and "node-1" in str(err)
    err = rejected(store, NotFound, store.address_info, "10.0.0.200")
    assert "10.0.0.200" in str(err) and "free block" in str(err)
    err = rejected(store, NotFound, store.address_info, "172.16.0.1")
    assert "172.16.0.1" in str(err)
    err = rejected(store, NotFound, store.address_info, "fd00::1")
    assert "fd00::1" in str(err)
    for bad in ("bogus", "10.0.0.256", "10.0.0.0/24", ""):
        err = rejected(store, InvalidArgument, store.address_info, bad)
        assert repr(bad) in str(err)


def test_free_address(store, default_pool):
    b = store.acquire_block("default", "node-1")
    a = store.assign_address(b, 2, "team-a", "web-0", "abc")
    other = store.assign_address(b, 3, "team-a", "web-1", "def")
    rec = store.free_address("10.0.0.2")
    assert rec == a
    assert store.block_addresses(b.cidr) == [other]
    # the block stays with its node
    assert [x.cidr for x in store.node_blocks("node-1")] == [b.cidr]
    err = rejected(store, NotFound, store.free_address, "10.0.0.2")
    assert "10.0.0.2" in str(err)
    rejected(store, NotFound, store.free_address, "172.16.0.1")
    rejected(store, InvalidArgument, store.free_address, "10.0.0.x")


def test_node_blocks(store):
    store.create_pool("default", "10.0.0.0/24", 3)
    store.create_pool("global", "192.168.0.0/24", 2)
    store.add_subnet("global", "fd00::/112")
    mine = [store.acquire_block("default", "node-1"),
            store.acquire_block("global", "node-1"),
            store.acquire_block("global", "node-1", version=6)]
    theirs = store.acquire_block("default", "node-2")
    got = unchanged(store, store.node_blocks, "node-1")
    assert sorted(got, key=lambda b: b.cidr) == sorted(mine, key=lambda b: b.cidr)
    assert store.node_blocks("node-2") == [theirs]
    assert store.node_blocks("node-3") == []
    # the index follows releases
    assert store.release_block(mine[0])
    assert {b.cidr for b in store.node_blocks("node-1")} == {mine[1].cidr, mine[2].cidr}
    # blocks read back carry the revision that guards writes
    for b in store.node_blocks("node-1"):
        assert store.assign_address(b, 0, "ns", "p", b.cidr) is not None


def test_node_blocks_index_matches_block_keys(store, default_pool):
    for i in range(6):
        store.acquire_block("default", f"node-{i % 2}")
    blocks = {(b.node, b.cidr, b.pool) for b in store.all_blocks()}
    index = set()
    for kv in store.etcd.get_prefix(keys.NODE_BLOCK)[0]:
        node, _, cidr = kv.key[len(keys.NODE_BLOCK):].partition("/")
        index.add((node, cidr, kv.value.decode()))
    assert blocks == index and len(blocks) == 6
    assert {b.cidr for b in store.pool_blocks("default")} == {c for _, c, _ in blocks}


def test_pool_usage(store):
    store.create_pool("default", "10.0.0.0/24", 3)      # 32 blocks of 8
    store.add_subnet("default", "10.0.1.0/28")          # 2 more
    store.add_subnet("default", "fd00::/120")           # 32 more
    b1 = store.acquire_block("default", "node-1")
    b2 = store.acquire_block("default", "node-2")
    b6 = store.acquire_block("default", "node-1", version=6)
    for off in range(3):
        store.assign_address(b1, off, "ns", f"p{off}", f"c{off}")
    store.assign_address(b6, 0, "ns", "p6", "c6")
    u = unchanged(store, store.pool_usage, "default")
    assert u["pool"] == "default"
    assert u["subnets"] == ["10.0.0.0/24", "10.0.1.0/28", "fd00::/120"]
    assert u["block_size"] == 3 and u["addresses_per_block"] == 8
    assert (u["blocks_total"], u["blocks_used"], u["blocks_free"]) == (66, 3, 63)
    rows = {r["block"]: r for r in u["blocks"]}
    assert [r["block"] for r in u["blocks"]] == [b1.cidr, b2.cidr, b6.cidr]
    assert (rows[b1.cidr]["node"], rows[b1.cidr]["used"], rows[b1.cidr]["free"]) == ("node-1", 3, 5)
    assert (rows[b2.cidr]["node"], rows[b2.cidr]["used"], rows[b2.cidr]["free"]) == ("node-2", 0, 8)
    assert (rows[b6.cidr]["used"], rows[b6.cidr]["free"]) == (1, 7)
    assert rows[b1.cidr]["acquired_at"] == b1.acquired_at

    one = store.pool_usage("default", "fd00::/120")
    assert one["subnets"] == ["fd00::/120"]
    assert (one["blocks_total"], one["blocks_used"]) == (32, 1)
    assert [r["block"] for r in one["blocks"]] == [b6.cidr]


def test_pool_usage_errors(store, default_pool):
    store.create_pool("other", "10.5.0.0/24", 3)
    err = rejected(store, NotFound, store.pool_usage, "default", "10.5.0.0/24")
    assert "10.5.0.0/24" in str(err) and "10.0.0.0/24" in str(err)
    rejected(store, NotFound, store.pool_usage, "missing")
    rejected(store, InvalidArgument, store.pool_usage, "default", "10.0.0.1/24")
    rejected(store, InvalidArgument, store.pool_usage, "Bad_Name")


def test_store_uses_only_its_prefix(store, etcd_server, etcd_prefix):
    """Two stores on one etcd with different prefixes do not see each other."""
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    store.create_pool("default", "10.0.0.0/24", 3)
    other = IPAMStore(Etcd(EtcdConfig(endpoints=(etcd_server.endpoint,),
                                      prefix=etcd_prefix.rstrip("/") + "-other/")))
    try:
        assert other.list_pools() == []
        other.create_pool("default", "10.0.0.0/24", 3)   # same subnet: separate prefix
        assert len(store.list_pools()) == 1
    finally:
        other.etcd.txn([], [("delete-prefix", "")])
        other.close()
    assert set(dump(store)) == {"pool/default", "subnet/10.0.0.0/24", keys.SUBNETS_GUARD}
