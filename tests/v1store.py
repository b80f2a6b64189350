"""Write a Coil v1 store the way v1.1.9 wrote it (for migration tests).

Mirrors cybozu-go/coil release-1.1 ``model/pool.go`` (AddPool, AddSubnet),
``model/block.go`` (AcquireBlock), ``model/ip.go`` (AllocateIP) and
``block.go``/``pool.go``/``ip.go`` (the JSON of each value), byte for byte:

    pool/<name>                     {"subnets":["10.11.0.0/16"],"block_size":5}
    subnet/<network-address>        ""   (empty value)
    block/<pool>/<network-address>  {"free":["10.11.0.64/27",...],"nodes":{"node1":["10.11.0.0/27"]}}
    ip/<block-address>/<offset>     {"container_id":"..","namespace":"..","pod":"..","created_at":".."}
                                    (v1.0.2 and older: "<namespace>/<pod>")

Go's encoding/json: struct fields in declaration order, map keys sorted,
a nil slice as ``null``, no spaces, and ``time.Time`` in RFC 3339 with
nanoseconds. Every write is the same transaction v1 used, through the real
etcd API (no shortcut, no mock).
"""

from __future__ import annotations

import ipaddress
import json


def _go_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _assignment(free, nodes) -> bytes:
    # BlockAssignment.MarshalJSON: {"free": [...] or null, "nodes": {sorted}}
    return _go_json({"free": [str(n) for n in free] or None,
                     "nodes": {k: [str(n) for n in nodes[k]] for k in sorted(nodes)}})


class V1Writer:
    """v1's model operations on a real etcd (coil.store.etcd.Etcd)."""

    def __init__(self, etcd):
        self.etcd = etcd

    def add_pool(self, name: str, subnet: str, block_size: int):
        net = ipaddress.ip_network(subnet)
        free = list(net.subnets(new_prefix=net.max_prefixlen - block_size))
        ok, _, _ = self.etcd.txn(
            [("version", f"pool/{name}", "==", 0), ("version", f"subnet/{net.network_address}", "==", 0)],
            [("put", f"pool/{name}", _go_json({"subnets": [str(net)], "block_size": block_size})),
             ("put", f"subnet/{net.network_address}", b""),
             ("put", f"block/{name}/{net.network_address}", _assignment(free, {}))])
        assert ok

    def add_subnet(self, name: str, subnet: str):
        net = ipaddress.ip_network(subnet)
        kv = self.etcd.get(f"pool/{name}")
        pool = json.loads(kv.value)
        pool["subnets"].append(str(net))
        free = list(net.subnets(new_prefix=net.max_prefixlen - pool["block_size"]))
        ok, _, _ = self.etcd.txn(
            [("mod", f"pool/{name}", "==", kv.mod_revision),
             ("version", f"subnet/{net.network_address}", "==", 0)],
            [("put", f"pool/{name}", _go_json(pool)),
             ("put", f"subnet/{net.network_address}", b""),
             ("put", f"block/{name}/{net.network_address}", _assignment(free, {}))])
        assert ok

    def acquire_block(self, node: str, pool: str) -> ipaddress._BaseNetwork:
        kvs, _ = self.etcd.get_prefix(f"block/{pool}/")
        for kv in kvs:                                # key order, first with a free block
            doc = json.loads(kv.value)
            if doc["free"]:
                break
        else:
            raise AssertionError("out of blocks")
        first = doc["free"].pop(0)
        nodes = {k: [ipaddress.ip_network(b) for b in v] for k, v in doc["nodes"].items()}
        nodes.setdefault(node, []).append(ipaddress.ip_network(first))
        ok, _, _ = self.etcd.txn([("mod", kv.key, "==", kv.mod_revision)],
                                 [("put", kv.key, _assignment(doc["free"], nodes))])
        assert ok
        return ipaddress.ip_network(first)

    def allocate_ip(self, block, container_id: str, namespace: str, pod: str,
                    created_at: str = "2024-05-06T07:08:09.123456789Z") -> str:
        for offset in range(block.num_addresses):
            key = f"ip/{block.network_address}/{offset}"
            value = _go_json({"container_id": container_id, "namespace": namespace, "pod": pod,
                              "created_at": created_at})
            ok, _, _ = self.etcd.txn([("version", key, "==", 0)], [("put", key, value)])
            if ok:
                return str(block.network_address + offset)
        raise AssertionError("block is full")

    def allocate_legacy_ip(self, block, namespace: str, pod: str) -> str:
        """An address recorded by v1.0.2 or older: the value is "<ns>/<pod>"."""
        for offset in range(block.num_addresses):
            key = f"ip/{block.network_address}/{offset}"
            ok, _, _ = self.etcd.txn([("version", key, "==", 0)],
                                     [("put", key, f"{namespace}/{pod}".encode())])
            if ok:
                return str(block.network_address + offset)
        raise AssertionError("block is full")


def dump(etcd) -> dict:
    """Every key under the prefix -> its value (bytes)."""
    kvs, _ = etcd.get_prefix("")
    return {kv.key: kv.value for kv in kvs}


def build_cluster_store(etcd) -> dict:
    """Several pools, subnets, nodes, blocks and addresses, as a v1 cluster
    would leave them. Returns {address: (namespace, pod, container_id, node)}."""
    w = V1Writer(etcd)
    w.add_pool("default", "10.60.0.0/27", 2)          # 8 blocks of 4
    w.add_subnet("default", "10.60.1.0/28")            # 4 more blocks
    w.add_pool("team", "10.61.0.0/26", 3)              # 8 blocks of 8
    w.add_pool("spare", "10.62.0.0/28", 2)             # no block taken
    held = {}
    n1a = w.acquire_block("node1", "default")
    n2a = w.acquire_block("node2", "default")
    n1b = w.acquire_block("node1", "default")
    n3a = w.acquire_block("node3", "default")          # node3 holds an empty block
    n1t = w.acquire_block("node1", "team")
    n2t = w.acquire_block("node2", "team")
    for i in range(4):                                  # n1a full
        a = w.allocate_ip(n1a, f"cid-a{i}", "default", f"web-{i}")
        held[a] = ("default", f"web-{i}", f"cid-a{i}", "node1")
    a = w.allocate_ip(n1b, "cid-b0", "default", "api-0")
    held[a] = ("default", "api-0", "cid-b0", "node1")
    for i in range(3):
        a = w.allocate_ip(n1t, f"cid-t{i}", "team", f"team-{i}")
        held[a] = ("team", f"team-{i}", f"cid-t{i}", "node1")
    a = w.allocate_ip(n2a, "cid-n2", "default", "db-0")
    held[a] = ("default", "db-0", "cid-n2", "node2")
    a = w.allocate_legacy_ip(n2a, "default", "old-pod")
    held[a] = ("default", "old-pod", "", "node2")
    a = w.allocate_ip(n2t, "cid-n2t", "team", "team-x")
    held[a] = ("team", "team-x", "cid-n2t", "node2")
    return held
