"""Node liveness records: ``node-alive/<node>``, attached to an etcd lease.

Each coild keeps its node's record alive by renewing the lease; when coild
stops renewing (killed, node down, cut off from etcd), etcd deletes the
record once the lease's TTL has passed. coil-controller frees a node's
blocks only while the record is absent (``IPAMStore.free_block`` compares
it in the same transaction).
"""

from __future__ import annotations

import json
import os

from coil.errors import Conflict
from coil.store import keys
from coil.store.etcd import KV, Etcd

MAX_RETRIES = 16


def read(etcd: Etcd, node: str) -> KV | None:
    """The node's liveness record, or None when its lease has expired (or
    it never had one). Raises StoreUnavailable."""
    return etcd.get(keys.node_alive(node))


def claim(etcd: Etcd, node: str, lease_id: int, since: str) -> int:
    """Write the node's record under ``lease_id`` (replacing a record of a
    previous coild of the node, whose lease may still run). One transaction
    guarded by what was read. Returns the revision. Raises StoreUnavailable,
    Conflict. Safe to repeat."""
    key = keys.node_alive(node)
    value = json.dumps({"pid": os.getpid(), "since": since}, separators=(",", ":"),
                       sort_keys=True).encode()
    for _ in range(MAX_RETRIES):
        kv = etcd.get(key)
        guard = ("version", key, "==", 0) if kv is None else ("mod", key, "==", kv.mod_revision)
        ok, rev, _ = etcd.txn([guard], [("put", key, value, lease_id)])
        if ok:
            return rev
    raise Conflict(f"liveness record of node {node} kept changing while being written")
