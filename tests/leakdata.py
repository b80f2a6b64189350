"""Planting IPAM state in bulk, for the leak-scan tests and benchmarks.

``plant_addresses`` writes blocks and address records straight into etcd,
128 puts per transaction (etcd's default --max-txn-ops), using the store's
key layout (coil/store/keys.py) and value shapes. Creating 100,000 Pods
through the API would take far too long; instead a few hundred Pods are
created and the join is checked against a known split of the planted
addresses.
"""

from __future__ import annotations

import datetime
import ipaddress
import json

from coil.store import keys

TXN_OPS = 128


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def bulk_put(etcd, items):
    """Put (key, bytes) pairs, TXN_OPS per unguarded transaction."""
    batch = []
    for key, value in items:
        batch.append(("put", key, value))
        if len(batch) == TXN_OPS:
            etcd.txn([], batch)
            batch = []
    if batch:
        etcd.txn([], batch)


def plant_addresses(store, pool: str, subnet: str, count: int, nodes: list[str],
                    created_at, block_size: int = 5, record=None):
    """Plant ``count`` addresses of ``pool`` (created first if missing) in
    consecutive blocks of ``subnet``, blocks dealt round-robin to ``nodes``.

    ``created_at(i)`` gives the created_at string of the i-th address;
    ``record(i)``, its optional fields (default: a CNI attachment).
    Returns the list of (address, block_cidr, offset) in order.
    """
    from coil.errors import NotFound
    try:
        store.get_pool(pool)
    except NotFound:
        store.create_pool(pool, subnet, block_size)
    net = ipaddress.ip_network(subnet)
    per_block = 1 << block_size
    prefixlen = net.max_prefixlen - block_size
    base = int(net.network_address)
    planted = []

    def items():
        now = iso(0)
        nblocks = (count + per_block - 1) // per_block
        for b in range(nblocks):
            start = base + b * per_block
            cidr = f"{ipaddress.ip_address(start)}/{prefixlen}"
            node = nodes[b % len(nodes)]
            yield keys.block(pool, cidr), _dumps({"node": node, "subnet": subnet,
                                                  "acquired_at": now})
            yield keys.node_block(node, cidr), pool.encode()
            for off in range(per_block):
                i = b * per_block + off
                if i >= count:
                    break
                addr = str(ipaddress.ip_address(start + off))
                planted.append((addr, cidr, off))
                yield keys.ip(cidr, off), _dumps({
                    "namespace": "ns", "pod": f"pod-{i}", "container_id": f"c{i:08x}",
                    "created_at": created_at(i), **(record(i) if record else
                                                    {"origin": "cni", "network": "k8s",
                                                     "ifname": "eth0"})})

    bulk_put(store.etcd, items())
    return planted


def pod_manifest(name: str, ips=(), *, host_network: bool = False, phase: str | None = None,
                 node: str | None = None) -> tuple[dict, dict | None]:
    """(Pod body, status patch or None)."""
    spec = {"containers": [{"name": "c", "image": "registry.invalid/pause:1"}],
            "automountServiceAccountToken": False}
    if host_network:
        spec["hostNetwork"] = True
    if node:
        spec["nodeName"] = node
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
    status = None
    if ips or phase:
        status = {"phase": phase or "Running"}
        if ips:
            status["podIP"] = ips[0]
            status["podIPs"] = [{"ip": ip} for ip in ips]
    return body, status


def create_pods(core, namespace: str, pods):
    """Create Pods and set their status; ``pods`` is a list of (body, status)."""
    for body, status in pods:
        core.create_namespaced_pod(namespace, body)
        if status:
            core.patch_namespaced_pod_status(body["metadata"]["name"], namespace,
                                             {"status": status})


def delete_pods(core, namespace: str):
    core.delete_collection_namespaced_pod(namespace, grace_period_seconds=0)
