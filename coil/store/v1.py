"""Coil v1 (v1.1.9) stores: detect them, and convert them in place.

v1 wrote, under the same prefix (default ``/coil/``):

    pool/<name>                      {"subnets": [CIDR...], "block_size": N}   (same as now)
    subnet/<network-address>         ""        one per subnet, no prefix length
    block/<pool>/<network-address>   {"free": [CIDR...], "nodes": {"<node>": [CIDR...]}}
                                     one document per subnet, all its blocks
    ip/<block-network-address>/<offset>
                                     {"container_id", "namespace", "pod", "created_at"}
                                     (before v1.0.2: the plain text "<namespace>/<pod>")

The unambiguous marker of a v1 store is a ``subnet/`` key without a ``/``
after the address: the current layout's ``subnet/<CIDR>`` always has one.
``detect`` reads only the keys of ``subnet/`` (a handful), so every role can
afford it at start. The migration removes those markers in its very last
steps, so an interrupted migration is still detected as v1 and refused.

``migrate`` converts step by step; each step is one guarded transaction
(the v1 document's mod revision unchanged, the new key absent), so a run can
be interrupted anywhere and repeated: finished steps are recognised and
skipped. Nothing is ever deleted before its replacement exists.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import re
from dataclasses import dataclass, field

from coil.errors import Conflict, InvalidArgument, V1StoreDetected
from coil.store import keys
from coil.store.model import _dumps

MIGRATE_COMMAND = "coilctl migrate v1"

# Test hook: called with the step just applied; tests monkeypatch it to
# interrupt a migration after N steps. Production code never sets it.
_after_step = None


def _v1_subnet_marker(key: str) -> bool:
    """``subnet/10.11.0.0`` (v1) vs ``subnet/10.11.0.0/16`` (now)."""
    return key.startswith(keys.SUBNET) and "/" not in key[len(keys.SUBNET):]


def _v1_block_doc(key: str) -> bool:
    """``block/<pool>/10.11.0.0`` (v1 document) vs ``block/<pool>/10.11.0.0/27``."""
    rest = key[len(keys.BLOCK):]
    return key.startswith(keys.BLOCK) and rest.count("/") == 1


def _v1_ip_key(key: str) -> bool:
    """``ip/10.11.0.0/5`` (v1) vs ``ip/10.11.0.0/27/5`` (now)."""
    return key.startswith(keys.IP) and key[len(keys.IP):].count("/") == 1


def detect(etcd) -> str | None:
    """The first v1 marker key under the prefix, or None. One keys-only read
    of ``subnet/``. Raises StoreUnavailable."""
    kvs, _ = etcd.get_prefix(keys.SUBNET, keys_only=True)
    for kv in kvs:
        if _v1_subnet_marker(kv.key):
            return kv.key
    return None


def refuse_if_v1(etcd, role: str) -> None:
    """Raise V1StoreDetected (one line naming the migration) on a v1 store."""
    marker = detect(etcd)
    if marker is not None:
        raise V1StoreDetected(
            f"etcd prefix {etcd.prefix} holds a Coil v1 store ({marker} is in v1 form); "
            f"{role} does not read or write it: convert it first with '{MIGRATE_COMMAND}'",
            hint="see docs/upgrade-from-v1.md")


# -- reading v1 values ---------------------------------------------------------
_GO_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
EPOCH = "1970-01-01T00:00:00.000000Z"


def go_time_to_iso(text) -> str:
    """Go's RFC 3339 (nanoseconds, any offset) -> our UTC microsecond form."""
    m = _GO_TIME.match(str(text or ""))
    if not m:
        return EPOCH
    base, frac, zone = m.groups()
    micros = int(((frac or "") + "000000")[:6])
    tz = datetime.timezone.utc if zone == "Z" else datetime.timezone(
        datetime.timedelta(hours=int(zone[:3]), minutes=int(zone[0] + zone[4:])))
    try:
        t = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(
            microsecond=micros, tzinfo=tz)
        t = t.astimezone(datetime.timezone.utc)
    except (ValueError, OverflowError):
        return EPOCH
    return f"{t.year:04d}-" + t.strftime("%m-%dT%H:%M:%S.%fZ")   # %Y does not pad year 1


def convert_address_value(raw: bytes) -> tuple[dict, bool]:
    """A v1 ``ip/`` value -> (our record, legacy). Legacy values (before
    v1.0.2) are the text ``<namespace>/<pod>`` with no container ID."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        return ({"container_id": str(data.get("container_id", "")),
                 "namespace": str(data.get("namespace", "")),
                 "pod": str(data.get("pod", "")),
                 "created_at": go_time_to_iso(data.get("created_at"))}, False)
    text = raw.decode("utf-8", "replace")
    ns, _, pod = text.partition("/")
    return {"container_id": "", "namespace": ns, "pod": pod, "created_at": EPOCH}, True


# -- the plan --------------------------------------------------------------------
@dataclass
class Step:
    kind: str                     # subnet | block | address | document | marker
    key: str                      # the key this step creates or removes
    compares: list
    ops: list
    done: bool = False
    info: dict = field(default_factory=dict)


@dataclass
class Plan:
    pools: list = field(default_factory=list)
    blocks: list = field(default_factory=list)       # {"pool", "block", "node", "subnet"}
    addresses: int = 0
    legacy: list = field(default_factory=list)       # addresses without a container ID
    orphans: list = field(default_factory=list)      # addresses in blocks no node held
    stray_markers: list = field(default_factory=list)
    steps: list = field(default_factory=list)


def _pools(etcd) -> dict:
    kvs, _ = etcd.get_prefix(keys.POOL)
    out = {}
    for kv in kvs:
        name = kv.key[len(keys.POOL):]
        try:
            data = json.loads(kv.value)
            nets = [ipaddress.ip_network(s) for s in data["subnets"]]
            size = int(data["block_size"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument(f"cannot migrate: {kv.key} is not a v1 pool: {kv.value[:80]!r}") from None
        out[name] = (nets, size, kv.mod_revision)
    return out


def _subnet_of(pools: dict, addr) -> tuple[str, object] | tuple[None, None]:
    for name, (nets, _size, _rev) in pools.items():
        for net in nets:
            if net.version == addr.version and addr in net:
                return name, net
    return None, None


def plan(etcd, now: str | None = None) -> Plan:
    """Read the store and build every step; mark the ones already done.

    Raises InvalidArgument when the v1 data contradicts itself (a block held
    by two nodes, a block outside its subnet): then nothing is written.
    """
    from coil.store.model import now_iso
    now = now or now_iso()
    p = Plan()
    pools = _pools(etcd)
    for name in sorted(pools):
        nets, size, _ = pools[name]
        p.pools.append({"name": name, "subnets": [str(n) for n in nets], "block_size": size})

    subnet_kvs, _ = etcd.get_prefix(keys.SUBNET)
    markers = {kv.key: kv for kv in subnet_kvs if _v1_subnet_marker(kv.key)}
    new_subnets = {kv.key for kv in subnet_kvs if not _v1_subnet_marker(kv.key)}
    block_kvs, _ = etcd.get_prefix(keys.BLOCK)
    docs = {kv.key: kv for kv in block_kvs if _v1_block_doc(kv.key)}
    new_blocks = {}
    for kv in block_kvs:
        if not _v1_block_doc(kv.key):
            new_blocks[kv.key] = json.loads(kv.value).get("node")
    ip_kvs, _ = etcd.get_prefix(keys.IP)
    v1_ips = [kv for kv in ip_kvs if _v1_ip_key(kv.key)]
    new_ips = {kv.key for kv in ip_kvs if not _v1_ip_key(kv.key)}

    # 1. subnet/<CIDR> for every subnet of every pool
    marker_for = {}
    for name in sorted(pools):
        nets, _size, pool_rev = pools[name]
        for net in nets:
            key = keys.subnet(str(net))
            marker_for[f"{keys.SUBNET}{net.network_address}"] = key
            step = Step("subnet", key, [("version", key, "==", 0), ("mod", keys.pool(name), "==", pool_rev)],
                        [("put", key, _dumps({"pool": name}))], done=key in new_subnets,
                        info={"pool": name, "subnet": str(net)})
            p.steps.append(step)

    # 2. one block key (+ its node index) per block a node holds
    held = {}                                  # block network -> (pool, cidr)
    for dkey in sorted(docs):
        kv = docs[dkey]
        pool_name = dkey[len(keys.BLOCK):].partition("/")[0]
        if pool_name not in pools:
            raise InvalidArgument(f"cannot migrate: {dkey} names pool {pool_name!r}, which does not exist")
        nets, size, _ = pools[pool_name]
        try:
            doc = json.loads(kv.value)
            nodes = doc.get("nodes") or {}
        except (ValueError, AttributeError):
            raise InvalidArgument(f"cannot migrate: {dkey} is not a v1 block document") from None
        subnet_addr = ipaddress.ip_address(dkey.rpartition("/")[2])
        subnet = next((n for n in nets if n.network_address == subnet_addr), None)
        if subnet is None:
            raise InvalidArgument(f"cannot migrate: {dkey} is not a subnet of pool {pool_name!r}")
        for node in sorted(nodes):
            for text in nodes[node] or []:
                block = ipaddress.ip_network(text)
                if not block.subnet_of(subnet) or block.prefixlen != subnet.max_prefixlen - size:
                    raise InvalidArgument(f"cannot migrate: block {block} of node {node!r} in {dkey} "
                                          f"is not a block of {subnet} with size {size}")
                if block in held:
                    raise InvalidArgument(f"cannot migrate: block {block} is held by two nodes in v1 "
                                          f"({held[block][2]!r} and {node!r}); free one by hand first")
                cidr = str(block)
                held[block] = (pool_name, cidr, node)
                bkey = keys.block(pool_name, cidr)
                done = bkey in new_blocks
                if done and new_blocks[bkey] != node:
                    raise InvalidArgument(f"cannot migrate: {bkey} exists for node {new_blocks[bkey]!r}, "
                                          f"v1 gives the block to {node!r}")
                p.blocks.append({"pool": pool_name, "block": cidr, "node": node, "subnet": str(subnet)})
                p.steps.append(Step(
                    "block", bkey, [("mod", dkey, "==", kv.mod_revision), ("version", bkey, "==", 0)],
                    [("put", bkey, _dumps({"node": node, "subnet": str(subnet), "acquired_at": now})),
                     ("put", keys.node_block(node, cidr), pool_name.encode())],
                    done=done, info={"pool": pool_name, "block": cidr, "node": node}))

    # 3. every v1 address moves to ip/<block-CIDR>/<offset> (create + delete, one txn)
    p.addresses = sum(1 for k in new_ips)            # converted by an earlier run
    for kv in sorted(v1_ips, key=lambda kv: kv.key):
        base_text, _, off_text = kv.key[len(keys.IP):].partition("/")
        try:
            base = ipaddress.ip_address(base_text)
            offset = int(off_text)
        except ValueError:
            raise InvalidArgument(f"cannot migrate: {kv.key} is not a v1 address key") from None
        pool_name, subnet = _subnet_of(pools, base)
        if pool_name is None:
            raise InvalidArgument(f"cannot migrate: {kv.key} is in no pool's subnet")
        size = pools[pool_name][1]
        block = ipaddress.ip_network(f"{base}/{subnet.max_prefixlen - size}", strict=False)
        if block.network_address != base or not 0 <= offset < block.num_addresses:
            raise InvalidArgument(f"cannot migrate: {kv.key} is not an address of a block of "
                                  f"pool {pool_name!r}")
        cidr = str(block)
        new_key = keys.ip(cidr, offset)
        record, legacy = convert_address_value(kv.value)
        address = str(block.network_address + offset)
        p.addresses += 1
        if legacy:
            p.legacy.append({"address": address, "namespace": record["namespace"], "pod": record["pod"]})
        compares = [("mod", kv.key, "==", kv.mod_revision), ("version", new_key, "==", 0)]
        if block in held:
            compares.append(("version", keys.block(pool_name, cidr), ">", 0))
        else:
            p.orphans.append({"address": address, "block": cidr, "pool": pool_name, **record})
        p.steps.append(Step("address", new_key, compares,
                            [("put", new_key, _dumps(record)), ("delete", kv.key)],
                            info={"address": address, "from": kv.key}))

    # 4. the v1 documents go once all their blocks exist
    for dkey in sorted(docs):
        p.steps.append(Step("document", dkey, [("mod", dkey, "==", docs[dkey].mod_revision)],
                            [("delete", dkey)], info={"document": dkey}))
    # 5. last, the v1 subnet markers: until they are gone the store is "v1"
    for mkey in sorted(markers):
        new_key = marker_for.get(mkey)
        compares = [("mod", mkey, "==", markers[mkey].mod_revision)]
        if new_key:
            compares.append(("version", new_key, ">", 0))
        else:
            p.stray_markers.append(mkey)
        p.steps.append(Step("marker", mkey, compares, [("delete", mkey)], info={"marker": mkey}))
    return p


def _apply_subnet(etcd, step: Step) -> bool:
    guard = etcd.get(keys.SUBNETS_GUARD)
    if guard is None:
        gcmp, gen = ("version", keys.SUBNETS_GUARD, "==", 0), 1
    else:
        gcmp, gen = ("mod", keys.SUBNETS_GUARD, "==", guard.mod_revision), int(guard.value or b"0") + 1
    ok, _, _ = etcd.txn(step.compares + [gcmp],
                        step.ops + [("put", keys.SUBNETS_GUARD, str(gen).encode())])
    return ok


def _verify_before_cleanup(etcd, p: Plan):
    """Before v1 documents and markers go: every block and address exists in
    the new layout and no v1 address key is left."""
    kvs, _ = etcd.get_prefix(keys.IP, keys_only=True)
    left = [kv.key for kv in kvs if _v1_ip_key(kv.key)]
    if left:
        raise Conflict(f"migration: v1 address key {left[0]} appeared during the migration "
                       f"(is a v1 coild still running?); stop it and run '{MIGRATE_COMMAND}' again")
    kvs, _ = etcd.get_prefix(keys.BLOCK, keys_only=True)
    have = {kv.key for kv in kvs}
    for b in p.blocks:
        if keys.block(b["pool"], b["block"]) not in have:
            raise Conflict(f"migration: block {b['block']} of node {b['node']!r} is missing; "
                           f"run '{MIGRATE_COMMAND}' again")


def migrate(etcd, dry_run: bool = False) -> dict:
    """Convert a v1 store in place; returns the report.

    Safe to interrupt and to repeat: each step is one guarded transaction,
    and a step already done is skipped. Raises InvalidArgument (inconsistent
    v1 data; nothing written), Conflict (the store changed underneath: a v1
    coild still running), StoreUnavailable.
    """
    p = plan(etcd)
    todo = [s for s in p.steps if not s.done]
    # address, document and marker steps are "done" when their source is gone,
    # which plan() already reflects: they are only planned for keys that exist
    report = {
        "v1": detect(etcd) is not None or bool(todo),
        "dry_run": dry_run,
        "pools": p.pools,
        "blocks": p.blocks,
        "addresses": p.addresses,
        "legacy_addresses": p.legacy,
        "orphan_addresses": p.orphans,
        "stray_subnet_markers": p.stray_markers,
        "steps": {"total": len(p.steps), "already_done": len(p.steps) - len(todo),
                  "applied": 0, "pending": len(todo)},
    }
    if dry_run or not todo:
        return report
    applied = 0
    verified = False
    for step in todo:
        if step.kind in ("document", "marker") and not verified:
            _verify_before_cleanup(etcd, p)
            verified = True
        if step.kind == "subnet":
            ok = _apply_subnet(etcd, step)
        else:
            ok, _, _ = etcd.txn(step.compares, step.ops)
        if not ok:
            raise Conflict(f"migration step '{step.kind} {step.key}' found the store changed "
                           f"(is a v1 coild or coilctl still running?); stop them and run "
                           f"'{MIGRATE_COMMAND}' again, it resumes")
        applied += 1
        report["steps"]["applied"] = applied
        report["steps"]["pending"] = len(todo) - applied
        if _after_step is not None:
            _after_step(step, applied)
    return report
