"""Pools, blocks and addresses in etcd, each change one guarded transaction.

Invariant under any concurrency, crash or retry: a block or an address is
never held by two owners, because every acquisition is a create guarded by
``version(key) == 0``, every address create is also guarded by the block
key's mod revision (the block is still the caller's, unchanged), and a block
is only released when no address key exists under it (range compare).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import json
import random
import re
from dataclasses import dataclass

from coil.errors import (AlreadyExists, BlockLost, Conflict, InvalidArgument, NotFound,
                         PoolExhausted)
from coil.store import keys
from coil.store.etcd import Etcd

MAX_RETRIES = 64
MAX_BLOCK_SIZE = 16  # 65,536 addresses per block
SMALL_POOL_BLOCKS = 256   # pools this small are read whole (one request) and filled lowest first
RANDOM_TRIES = 8          # random guarded creates before a paged scan of a large pool
RANDOM_PROBES = 16        # blocks a failed random create also reads, to aim the next one
SCAN_PAGE = 2000          # keys per range request of a paged read
MAX_TXN_ITEMS = 64       # records per multi-record transaction (compares + ops <= 128)
PER_BLOCK_COUNT_LIMIT = 32  # pool usage: up to this many blocks, one count request per block
DEFAULT_POOL = "default"
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NODE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def validate_pool_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 63 or not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid pool name {name!r}: use a DNS label (lower-case letters, digits "
            f"and '-', at most 63 characters), like a Kubernetes namespace")
    return name


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > 253 or not _NODE_RE.match(name):
        raise InvalidArgument(
            f"invalid node name {name!r}: use a DNS subdomain (lower-case letters, "
            f"digits, '-' and '.')")
    return name


def parse_subnet(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Parse a subnet in CIDR form. Raises InvalidArgument naming the value."""
    raw = str(text).strip()
    if "/" not in raw:
        raise InvalidArgument(f"invalid subnet {text!r}: prefix length missing (e.g. {raw}/24)")
    try:
        return ipaddress.ip_network(raw, strict=True)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise InvalidArgument(f"invalid subnet {text!r}: expected a CIDR like 10.64.0.0/16") from None
    raise InvalidArgument(f"invalid subnet {text!r}: host bits set (did you mean {loose}?)")


def validate_block_size(size, subnet=None) -> int:
    try:
        value = int(size)
        if str(size).strip() != str(value):
            raise ValueError
    except (TypeError, ValueError):
        raise InvalidArgument(f"invalid block size {size!r}: expected an integer 0..{MAX_BLOCK_SIZE}") from None
    if not 0 <= value <= MAX_BLOCK_SIZE:
        raise InvalidArgument(f"invalid block size {value}: must be 0..{MAX_BLOCK_SIZE} "
                              f"(size 5 means blocks of 32 addresses)")
    if subnet is not None:
        host_bits = subnet.max_prefixlen - subnet.prefixlen
        if value > host_bits:
            raise InvalidArgument(f"invalid block size {value} for subnet {subnet}: "
                                  f"a /{subnet.prefixlen} holds at most 2^{host_bits} addresses")
    return value


@functools.lru_cache(maxsize=4096)
def _block_base(cidr: str):
    """The first address of a block (decoding many records of one block
    parses its CIDR once)."""
    return ipaddress.ip_network(cidr).network_address


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Pool:
    name: str
    subnets: tuple
    block_size: int
    revision: int = 0

    def to_json(self) -> dict:
        return {"name": self.name, "subnets": [str(s) for s in self.subnets],
                "block_size": self.block_size}


@dataclass(frozen=True)
class Block:
    pool: str
    cidr: str
    node: str
    revision: int
    subnet: str = ""
    acquired_at: str = ""

    # parsed once per Block (blocks are immutable; every address write and
    # every allocation asks)
    @functools.cached_property
    def network(self):
        return ipaddress.ip_network(self.cidr)

    @functools.cached_property
    def size(self) -> int:
        return self.network.num_addresses


@dataclass(frozen=True)
class Address:
    address: str
    block: str
    offset: int
    namespace: str
    pod: str
    container_id: str
    created_at: str
    revision: int = 0
    # who made the record: ORIGIN_CNI, ORIGIN_REST, or "" (written before
    # records carried an origin: never freed by CNI GC nor the leak scan)
    origin: str = ""
    network: str = ""            # CNI network name (netconf "name"); "" unknown
    ifname: str = "eth0"         # CNI_IFNAME of the attachment
    release_if_leaked: bool = False   # a REST owner's opt-in to the leak release

    @property
    def version(self) -> int:
        """4 or 6: the IP version of ``address`` (parsed)."""
        return ipaddress.ip_address(self.address).version

    def to_json(self) -> dict:
        out = {"address": self.address, "block": self.block, "namespace": self.namespace,
               "pod": self.pod, "container_id": self.container_id,
               "created_at": self.created_at}
        if self.origin:
            out["origin"] = self.origin
        if self.origin == ORIGIN_CNI:
            out.update(network=self.network, ifname=self.ifname)
        if self.release_if_leaked:
            out["release_if_leaked"] = True
        return out

    @property
    def legacy(self) -> bool:
        """Written before records named their attachment (no ``origin``):
        read as ifname ``eth0`` of any network."""
        return not self.origin

    def of_attachment(self, network: str | None, ifname: str) -> bool:
        """Whether this record belongs to the CNI attachment (its container
        ID, ``ifname``) within network ``network`` (None: any network, for
        a DEL whose configuration has no name). A record written by CNI ADD
        names its network and ifname; a legacy record (no origin) counts as
        ``eth0`` of every network; a REST record is no CNI attachment."""
        if self.legacy:
            return self.ifname == ifname
        return (self.origin == ORIGIN_CNI and self.ifname == ifname
                and (network is None or self.network == network))

    def of_rest(self) -> bool:
        """Whether the REST API owns this record: made by ``POST /ip``, or
        legacy (no origin: v1's REST and CNI records were one kind)."""
        return self.origin != ORIGIN_CNI


ORIGIN_CNI = "cni"
ORIGIN_REST = "rest"
# optional fields of an address record, and their types
RECORD_FIELDS = {"origin": str, "network": str, "ifname": str, "release_if_leaked": bool}


class IPAMStore:
    """Pools, blocks and addresses. Thread-safe (etcd does the locking).

    Every method that writes is one guarded transaction, retried at most
    ``MAX_RETRIES`` times on a lost race (then ``Conflict``). All raise
    ``StoreUnavailable`` when etcd cannot be reached.
    """

    def __init__(self, etcd: Etcd):
        self.etcd = etcd

    def close(self):
        self.etcd.close()

    # -- pools ----------------------------------------------------------------
    def _decode_pool(self, name, kv) -> Pool:
        data = json.loads(kv.value)
        return Pool(name, tuple(ipaddress.ip_network(s) for s in data["subnets"]),
                    int(data["block_size"]), kv.mod_revision)

    def get_pool(self, name: str) -> Pool:
        """Raises NotFound."""
        validate_pool_name(name)
        kv = self.etcd.get(keys.pool(name))
        if kv is None:
            raise NotFound(f"pool {name!r} does not exist", hint="list pools with 'coilctl pool list'")
        return self._decode_pool(name, kv)

    def list_pools(self) -> list[Pool]:
        kvs, _ = self.etcd.get_prefix(keys.POOL)
        return sorted((self._decode_pool(kv.key[len(keys.POOL):], kv) for kv in kvs),
                      key=lambda p: p.name)

    def _check_subnet_free(self, net) -> tuple[list, int]:
        """Returns (compares guarding the subnet set, next guard generation)."""
        guard = self.etcd.get(keys.SUBNETS_GUARD)
        kvs, _ = self.etcd.get_prefix(keys.SUBNET)
        for kv in kvs:
            other = ipaddress.ip_network(kv.key[len(keys.SUBNET):])
            if other.version == net.version and other.overlaps(net):
                owner = json.loads(kv.value).get("pool", "?")
                if other == net:
                    raise AlreadyExists(f"subnet {net} already belongs to pool {owner!r}")
                raise AlreadyExists(f"subnet {net} overlaps subnet {other} of pool {owner!r}")
        if guard is None:
            return [("version", keys.SUBNETS_GUARD, "==", 0)], 1
        return [("mod", keys.SUBNETS_GUARD, "==", guard.mod_revision)], int(guard.value or b"0") + 1

    def create_pool(self, name: str, subnet: str, block_size) -> Pool:
        """Create a pool with its first subnet.

        Raises InvalidArgument, AlreadyExists (pool, or subnet overlap).
        """
        validate_pool_name(name)
        net = parse_subnet(subnet)
        size = validate_block_size(block_size, net)
        for _ in range(MAX_RETRIES):
            if self.etcd.get(keys.pool(name)) is not None:
                raise AlreadyExists(f"pool {name!r} already exists",
                                    hint="add subnets with 'coilctl pool add-subnet'")
            guards, gen = self._check_subnet_free(net)
            ok, rev, _ = self.etcd.txn(
                guards + [("version", keys.pool(name), "==", 0)],
                [("put", keys.pool(name), _dumps({"subnets": [str(net)], "block_size": size})),
                 ("put", keys.subnet(str(net)), _dumps({"pool": name})),
                 ("put", keys.SUBNETS_GUARD, str(gen).encode())])
            if ok:
                return Pool(name, (net,), size, rev)
        raise Conflict(f"creating pool {name!r}: too many concurrent changes, try again")

    def add_subnet(self, name: str, subnet: str) -> Pool:
        """Add a subnet to an existing pool. Raises NotFound, InvalidArgument, AlreadyExists."""
        net = parse_subnet(subnet)
        for _ in range(MAX_RETRIES):
            pool = self.get_pool(name)
            validate_block_size(pool.block_size, net)
            guards, gen = self._check_subnet_free(net)
            subnets = list(pool.subnets) + [net]
            ok, rev, _ = self.etcd.txn(
                guards + [("mod", keys.pool(name), "==", pool.revision)],
                [("put", keys.pool(name), _dumps({"subnets": [str(s) for s in subnets],
                                                  "block_size": pool.block_size})),
                 ("put", keys.subnet(str(net)), _dumps({"pool": name})),
                 ("put", keys.SUBNETS_GUARD, str(gen).encode())])
            if ok:
                return Pool(name, tuple(subnets), pool.block_size, rev)
        raise Conflict(f"adding subnet {net} to pool {name!r}: too many concurrent changes")

    @staticmethod
    def _holders(blocks) -> str:
        nodes = sorted({b.node for b in blocks})
        shown = ", ".join(nodes[:10]) + (f" and {len(nodes) - 10} more" if len(nodes) > 10 else "")
        return f"{len(blocks)} block{'s' if len(blocks) != 1 else ''} held by {shown}"

    def delete_pool(self, name: str) -> Pool:
        """Delete a pool and its subnets. One transaction, guarded by the
        pool's revision and by a range compare proving no block key exists
        under ``block/<pool>/``; refuses (Conflict naming the nodes that hold
        blocks) while any block is held. Raises NotFound, Conflict."""
        validate_pool_name(name)
        for _ in range(MAX_RETRIES):
            pool = self.get_pool(name)
            guard = self.etcd.get(keys.SUBNETS_GUARD)
            gen = int(guard.value or b"0") + 1 if guard is not None else 1
            ok, _, responses = self.etcd.txn(
                [("mod", keys.pool(name), "==", pool.revision),
                 ("prefix-empty", keys.pool_blocks(name)),
                 ("mod", keys.SUBNETS_GUARD, "==", guard.mod_revision) if guard is not None
                 else ("version", keys.SUBNETS_GUARD, "==", 0)],
                [("delete", keys.pool(name))] +
                [("delete", keys.subnet(str(n))) for n in pool.subnets] +
                [("put", keys.SUBNETS_GUARD, str(gen).encode())])
            if ok:
                return pool
            held = self.pool_blocks(name)
            if held:
                raise Conflict(f"pool {name!r} is in use: {self._holders(held)}",
                               hint="drain those nodes, or free a dead node's blocks "
                                    "with 'coilctl node release'")
        raise Conflict(f"deleting pool {name!r}: too many concurrent changes, try again")

    def remove_subnet(self, name: str, subnet: str) -> Pool:
        """Remove ``subnet`` from pool ``name``. One transaction, guarded by
        the pool's revision and by a range compare proving that no block key
        of the pool was written since the read that found no block of the
        subnet held. Refuses (Conflict naming the nodes) while a block of
        the subnet is held, and refuses to remove the last subnet. Raises
        InvalidArgument, NotFound, Conflict."""
        validate_pool_name(name)
        net = parse_subnet(subnet)
        for _ in range(MAX_RETRIES):
            pool = self.get_pool(name)
            if net not in pool.subnets:
                raise NotFound(f"subnet {net} is not a subnet of pool {name!r} "
                               f"(its subnets: {', '.join(map(str, pool.subnets))})")
            if len(pool.subnets) == 1:
                raise InvalidArgument(f"subnet {net} is the last subnet of pool {name!r}",
                                      hint=f"delete the pool with 'coilctl pool delete {name}'")
            kvs, rev = self.etcd.get_prefix_paged(keys.pool_blocks(name), SCAN_PAGE)
            held = [b for b in map(self._decode_block, kvs)
                    if b.network.version == net.version and b.network.subnet_of(net)]
            if held:
                raise Conflict(f"subnet {net} of pool {name!r} is in use: {self._holders(held)}",
                               hint="drain those nodes, or free a dead node's blocks "
                                    "with 'coilctl node release'")
            guard = self.etcd.get(keys.SUBNETS_GUARD)
            gen = int(guard.value or b"0") + 1 if guard is not None else 1
            subnets = [s for s in pool.subnets if s != net]
            ok, rev2, _ = self.etcd.txn(
                [("mod", keys.pool(name), "==", pool.revision),
                 ("prefix-mod-below", keys.pool_blocks(name), rev + 1),
                 ("mod", keys.SUBNETS_GUARD, "==", guard.mod_revision) if guard is not None
                 else ("version", keys.SUBNETS_GUARD, "==", 0)],
                [("put", keys.pool(name), _dumps({"subnets": [str(s) for s in subnets],
                                                  "block_size": pool.block_size})),
                 ("delete", keys.subnet(str(net))),
                 ("put", keys.SUBNETS_GUARD, str(gen).encode())])
            if ok:
                return Pool(name, tuple(subnets), pool.block_size, rev2)
        raise Conflict(f"removing subnet {net} from pool {name!r}: too many concurrent "
                       f"changes, try again")

    def node_alive(self, node: str):
        """The node's liveness record (``node-alive/<node>``) or None."""
        return self.etcd.get(keys.node_alive(node))

    def release_node(self, node: str, force: bool = False) -> list[tuple[Block, int]]:
        """Free the blocks of a dead node by hand.

        Refuses (Conflict) while the node's liveness record exists, and,
        unless ``force``, while any of its blocks holds an address (naming
        them). Each block is then freed by one transaction guarded by the
        block's revision, by the absence of ``node-alive/<node>`` and (without
        ``force``) by a range compare proving the block holds no address.
        Returns [(block, addresses freed)] of the blocks freed. Safe to
        repeat. Raises InvalidArgument, Conflict."""
        validate_node_name(node)
        if self.node_alive(node) is not None:
            raise Conflict(f"node {node!r} is alive: its coild holds the liveness record "
                           f"{keys.node_alive(node)}",
                           hint="stop its coild and wait for the lease to expire")
        blocks = self.node_blocks(node)
        counts = self.address_counts(b.cidr for b in blocks)
        busy = [b for b in blocks if counts[b.cidr]]
        if busy and not force:
            n = sum(counts[b.cidr] for b in busy)
            raise Conflict(f"node {node!r} still holds {n} address{'es' if n != 1 else ''} in "
                           f"block{'s' if len(busy) != 1 else ''} "
                           f"{', '.join(b.cidr for b in busy[:10])}"
                           + (f" and {len(busy) - 10} more" if len(busy) > 10 else ""),
                           hint="check them with 'coilctl ipam check'; add --force to free "
                                "them with their blocks")
        freed = []
        for b in blocks:
            guards = [("mod", keys.block(b.pool, b.cidr), "==", b.revision),
                      ("version", keys.node_alive(node), "==", 0)]
            if not force:
                guards.append(("prefix-empty", keys.block_ips(b.cidr)))
            ok, _, responses = self.etcd.txn(
                guards,
                [("delete", keys.block(b.pool, b.cidr)),
                 ("delete", keys.node_block(node, b.cidr)),
                 ("delete-prefix", keys.block_ips(b.cidr))],
                [("get", keys.node_alive(node))])
            if ok:
                freed.append((b, counts[b.cidr]))
            elif responses and responses[0].response_range.kvs:
                raise Conflict(f"node {node!r} came alive while its blocks were being freed "
                               f"({len(freed)} freed)")
        return freed

    # -- blocks ---------------------------------------------------------------
    def _decode_block(self, kv) -> Block:
        pool_name, cidr = keys.parse_block_key(kv.key)
        data = json.loads(kv.value)
        return Block(pool_name, cidr, data["node"], kv.mod_revision,
                     data.get("subnet", ""), data.get("acquired_at", ""))

    def pool_blocks(self, pool_name: str) -> list[Block]:
        """Every held block of the pool (paged, one snapshot)."""
        kvs, _ = self.etcd.get_prefix_paged(keys.pool_blocks(pool_name), SCAN_PAGE)
        return [self._decode_block(kv) for kv in kvs]

    def all_blocks(self) -> list[Block]:
        """Every held block (paged, one snapshot)."""
        kvs, _ = self.etcd.get_prefix_paged(keys.BLOCK, SCAN_PAGE)
        return [self._decode_block(kv) for kv in kvs]

    def node_blocks(self, node: str) -> list[Block]:
        """Blocks held by ``node`` (one range read plus one transaction)."""
        kvs, _ = self.etcd.get_prefix(keys.node_blocks(node))
        if not kvs:
            return []
        wanted = [keys.block(kv.value.decode(), kv.key[len(keys.node_blocks(node)):]) for kv in kvs]
        _, _, responses = self.etcd.txn([], [("get", k) for k in wanted])
        blocks = []
        for resp in responses:
            for kv in resp.response_range.kvs:
                block = self._decode_block(self.etcd.decode_kv(kv))
                if block.node == node:
                    blocks.append(block)
        return blocks

    @staticmethod
    def _free_candidates(pool: Pool, used: set, version: int, want: int) -> list:
        """Up to ``want`` free blocks of ``pool``, lowest first: (block, subnet)."""
        used_nets = [ipaddress.ip_network(c) for c in used]
        used_nets = [n for n in used_nets if n.version == version]
        step = 1 << pool.block_size
        out = []
        for net in pool.subnets:
            if net.version != version:
                continue
            base = int(net.network_address)
            end = base + net.num_addresses
            count = net.num_addresses >> pool.block_size
            taken = sorted((int(n.network_address) - base) // step for n in used_nets
                           if base <= int(n.network_address) < end)
            idx, ti = 0, 0
            while idx < count and len(out) < want:
                while ti < len(taken) and taken[ti] < idx:
                    ti += 1
                if ti < len(taken) and taken[ti] == idx:
                    idx += 1
                    continue
                addr = ipaddress.ip_address(base + idx * step)
                out.append((ipaddress.ip_network(f"{addr}/{net.max_prefixlen - pool.block_size}"), net))
                idx += 1
            if len(out) >= want:
                break
        return out

    @staticmethod
    def _random_block(pool: Pool, nets: list):
        """A block of ``nets`` chosen uniformly at random: (block, subnet)."""
        total = sum(net.num_addresses >> pool.block_size for net in nets)
        pick = random.randrange(total)
        for net in nets:
            count = net.num_addresses >> pool.block_size
            if pick < count:
                addr = ipaddress.ip_address(int(net.network_address) + (pick << pool.block_size))
                return ipaddress.ip_network(f"{addr}/{net.max_prefixlen - pool.block_size}"), net
            pick -= count
        raise AssertionError("unreachable")

    def has_free_block(self, pool: Pool, version: int) -> bool:
        """Whether ``pool`` has a block of IPv``version`` no node holds
        (reads the pool's block keys). Raises StoreUnavailable."""
        return bool(self._free_candidates(pool, self._used_blocks(pool), version, 1))

    def _used_blocks(self, pool: Pool) -> set:
        """CIDRs of the pool's held blocks: keys only, in pages of ``SCAN_PAGE``."""
        used = set()
        for kvs, _ in self.etcd.iter_prefix_pages(keys.pool_blocks(pool.name), SCAN_PAGE,
                                                  keys_only=True):
            used.update(keys.parse_block_key(kv.key)[1] for kv in kvs)
        return used

    def acquire_block(self, pool_name: str, node: str, version: int = 4) -> Block:
        """Take a free block of ``pool_name`` for ``node``.

        A pool of at most ``SMALL_POOL_BLOCKS`` blocks is read (keys only, one
        request) and its lowest free block taken. In a larger pool the cost
        does not depend on how many blocks are held: a block chosen at random
        is created with no prior read, guarded by ``version == 0`` (Calico's
        random search). When it is held already, the same transaction's
        failure branch reads ``RANDOM_PROBES`` other random block keys, and
        the next create aims at one of those found free, so a collision
        costs one more transaction even in a pool that is 90 % full. Only
        when ``RANDOM_TRIES`` creates failed (a nearly full pool) does it
        read the pool's block keys in pages to find the remaining free ones,
        so the very last free block is still found, and a full pool raises
        PoolExhausted after ``1 + RANDOM_TRIES + ceil(blocks / SCAN_PAGE)``
        requests.

        Raises NotFound (pool), InvalidArgument (no subnet of that IP
        version), PoolExhausted, Conflict (retry bound). Not idempotent: each
        call takes one more block.
        """
        validate_node_name(node)
        pool = self.get_pool(pool_name)
        random_left = RANDOM_TRIES
        probed: list = []        # blocks seen free by the last failed create
        for attempt in range(MAX_RETRIES):
            nets = [s for s in pool.subnets if s.version == version]
            if not nets:
                raise InvalidArgument(f"pool {pool_name!r} has no IPv{version} subnet",
                                      hint=f"add one with 'coilctl pool add-subnet {pool_name} SUBNET'")
            blocks_total = sum(s.num_addresses >> pool.block_size for s in pool.subnets)
            probes: list = []
            if blocks_total <= SMALL_POOL_BLOCKS or random_left <= 0:
                candidates = self._free_candidates(pool, self._used_blocks(pool), version,
                                                   attempt + 1)
                if not candidates:
                    raise PoolExhausted(pool_name, f"address pool {pool_name!r} has no free "
                                                   f"IPv{version} block left")
                block_net, subnet = random.choice(candidates)
            else:
                random_left -= 1
                block_net, subnet = probed[0] if probed else self._random_block(pool, nets)
                probes = [self._random_block(pool, nets) for _ in range(RANDOM_PROBES)]
            cidr = str(block_net)
            acquired_at = now_iso()
            ok, rev, responses = self.etcd.txn(
                [("version", keys.block(pool_name, cidr), "==", 0),
                 ("mod", keys.pool(pool_name), "==", pool.revision)],
                [("put", keys.block(pool_name, cidr),
                  _dumps({"node": node, "subnet": str(subnet), "acquired_at": acquired_at})),
                 ("put", keys.node_block(node, cidr), pool_name.encode())],
                [("get", keys.pool(pool_name))] +
                [("get", keys.block(pool_name, str(b))) for b, _ in probes])
            if ok:
                return Block(pool_name, cidr, node, rev, str(subnet), acquired_at)
            kvs = responses[0].response_range.kvs if responses else []
            if not kvs:
                raise NotFound(f"pool {pool_name!r} does not exist",
                               hint="list pools with 'coilctl pool list'")
            if kvs[0].mod_revision != pool.revision:    # subnets changed: use the new list
                pool = self._decode_pool(pool_name, self.etcd.decode_kv(kvs[0]))
                probed = []
            else:
                probed = [p for p, r in zip(probes, responses[1:]) if not r.response_range.kvs]
        raise Conflict(f"taking a block of pool {pool_name!r}: lost the race "
                       f"{MAX_RETRIES} times, try again")

    def release_block(self, block: Block) -> bool:
        """Give an empty block back. Returns False (and changes nothing) when
        the block still holds an address or is no longer the caller's.
        Safe to repeat."""
        ok, _, _ = self.etcd.txn(
            [("mod", keys.block(block.pool, block.cidr), "==", block.revision),
             ("prefix-empty", keys.block_ips(block.cidr))],
            [("delete", keys.block(block.pool, block.cidr)),
             ("delete", keys.node_block(block.node, block.cidr))])
        return ok

    def free_block(self, block: Block) -> bool:
        """Free a block and every address in it (the node is gone).

        One transaction guarded by the block's revision and by the absence
        of the node's liveness record (``node-alive/<node>``): False, and
        nothing changed, when the block changed meanwhile or the node's
        coild is alive. Safe to repeat."""
        ok, _, _ = self.etcd.txn(
            [("mod", keys.block(block.pool, block.cidr), "==", block.revision),
             ("version", keys.node_alive(block.node), "==", 0)],
            [("delete", keys.block(block.pool, block.cidr)),
             ("delete", keys.node_block(block.node, block.cidr)),
             ("delete-prefix", keys.block_ips(block.cidr))])
        return ok

    # -- addresses ------------------------------------------------------------
    def _decode_address(self, kv) -> Address:
        cidr, offset = keys.parse_ip_key(kv.key)
        data = json.loads(kv.value)
        addr = _block_base(cidr) + offset
        opt = {k: v for k, v in data.items()
               if k in RECORD_FIELDS and isinstance(v, RECORD_FIELDS[k])} if len(data) > 4 else {}
        return Address(str(addr), cidr, offset, data.get("namespace", ""), data.get("pod", ""),
                       data.get("container_id", ""), data.get("created_at", ""),
                       kv.mod_revision, **opt)

    def assign_address(self, block: Block, offset: int, namespace: str, pod: str,
                       container_id: str, extra: dict | None = None) -> Address | None:
        """Record the address at ``offset`` of ``block`` for a container.

        ``extra``: optional record fields (``RECORD_FIELDS``: origin, network,
        ifname, release_if_leaked). Returns None when that address is already
        taken (nothing written). Raises BlockLost when the block is no longer
        the caller's, InvalidArgument for an unknown or mistyped field.
        """
        value = self._address_value(block, offset, namespace, pod, container_id, extra)
        created_at, opt = value["created_at"], value["opt"]
        ip_key = keys.ip(block.cidr, offset)
        block_key = keys.block(block.pool, block.cidr)
        ok, rev, responses = self.etcd.txn(
            [("mod", block_key, "==", block.revision), ("version", ip_key, "==", 0)],
            [("put", ip_key, value["json"])],
            [("get", block_key)])
        if ok:
            addr = block.network.network_address + offset
            return Address(str(addr), block.cidr, offset, namespace, pod, container_id,
                           created_at, rev, **opt)
        kvs = responses[0].response_range.kvs if responses else []
        if not kvs or kvs[0].mod_revision != block.revision:
            raise BlockLost(f"block {block.cidr} of pool {block.pool!r} is no longer held "
                            f"by node {block.node!r}")
        return None

    def assign_addresses(self, items) -> list[Address] | None:
        """Several ``assign_address`` in one transaction, all or none
        (``items``: (block, offset, namespace, pod, container_id, extra)):
        each block's key must still have the mod revision its item compares
        and each address key must be free. Returns the records, or None when
        any compare failed or two items give one block with two revisions
        (nothing written; the caller finds out which with
        ``assign_address`` per item). At most ``MAX_TXN_ITEMS // 2``
        items (one compare per item and at most one per block: etcd's
        default --max-txn-ops is 128). Raises InvalidArgument as
        ``assign_address``."""
        items = list(items)
        if not 0 < len(items) <= MAX_TXN_ITEMS // 2:
            raise InvalidArgument(f"assign_addresses takes 1..{MAX_TXN_ITEMS // 2} addresses")
        values = [self._address_value(*item) for item in items]
        blocks, compares, puts = {}, [], []
        for (block, offset, *_), value in zip(items, values):
            block_key = keys.block(block.pool, block.cidr)
            if blocks.setdefault(block_key, block.revision) != block.revision:
                return None       # one of the two revisions is stale: it cannot commit
            ip_key = keys.ip(block.cidr, offset)
            compares.append(("version", ip_key, "==", 0))
            puts.append(("put", ip_key, value["json"]))
        compares[:0] = [("mod", k, "==", rev) for k, rev in blocks.items()]
        ok, rev, _ = self.etcd.txn(compares, puts)
        if not ok:
            return None
        return [Address(str(block.network.network_address + offset), block.cidr, offset,
                        namespace, pod, container_id, value["created_at"], rev, **value["opt"])
                for (block, offset, namespace, pod, container_id, _), value in zip(items, values)]

    @staticmethod
    def _address_value(block: Block, offset: int, namespace: str, pod: str,
                       container_id: str, extra: dict | None) -> dict:
        """The checked record of one assignment: its JSON, created_at and
        optional fields. Raises InvalidArgument."""
        if not 0 <= offset < block.size:
            raise InvalidArgument(f"offset {offset} is outside block {block.cidr}")
        opt = dict(extra or {})
        for k, v in opt.items():
            if k not in RECORD_FIELDS or not isinstance(v, RECORD_FIELDS[k]):
                raise InvalidArgument(f"invalid address record field {k}={v!r}")
        created_at = now_iso()
        return {"created_at": created_at, "opt": opt,
                "json": _dumps({"namespace": namespace, "pod": pod, "container_id": container_id,
                                "created_at": created_at, **opt})}

    def fence_address(self, block: Block, offset: int) -> tuple[bool, Address | None, Block | None]:
        """Decide an ``assign_address`` whose outcome is unknown, for good.

        One transaction guarded by the block key's mod revision the
        assignment compared (``block.revision``). Success: the block key is
        rewritten unchanged (a new mod revision) and the address key read.
        Failure (the block key changed already): the block key and the
        address key are read. Either way the block key's mod revision is no
        longer ``block.revision`` once this answers, so the assignment, if it
        still waits at a member, can never commit later: the address key read
        here is its final outcome.

        Returns (whether this fence rewrote the block key, the record at
        ``offset`` or None, the block as etcd holds it now or None when it is
        free). Raises StoreUnavailable (OutcomeUnknown
        when the fence itself may or may not have committed)."""
        ip_key = keys.ip(block.cidr, offset)
        block_key = keys.block(block.pool, block.cidr)
        ok, rev, responses = self.etcd.txn(
            [("mod", block_key, "==", block.revision)],
            [("touch", block_key), ("get", ip_key)],
            [("get", block_key), ("get", ip_key)])
        if ok:
            now = dataclasses.replace(block, revision=rev)
        else:
            kvs = responses[0].response_range.kvs
            now = self._decode_block(self.etcd.decode_kv(kvs[0])) if kvs else None
        kvs = responses[1].response_range.kvs
        rec = self._decode_address(self.etcd.decode_kv(kvs[0])) if kvs else None
        return ok, rec, now

    def release_address(self, cidr: str, offset: int, revision: int | None = None) -> bool:
        """Delete an address record; with ``revision``, only that very record.
        Returns False when nothing matched. Safe to repeat."""
        ip_key = keys.ip(cidr, offset)
        guard = ("mod", ip_key, "==", revision) if revision else ("version", ip_key, ">", 0)
        ok, _, _ = self.etcd.txn([guard], [("delete", ip_key)])
        return ok

    def release_addresses(self, items) -> bool:
        """Delete several address records in one transaction, each guarded
        by its own mod revision (``items``: (cidr, offset, revision)); all
        or none. Returns False when any of them changed or is gone. At most
        ``MAX_TXN_ITEMS`` items (etcd's default --max-txn-ops is 128)."""
        items = list(items)
        if not 0 < len(items) <= MAX_TXN_ITEMS or any(not rev for _, _, rev in items):
            raise InvalidArgument(f"release_addresses takes 1..{MAX_TXN_ITEMS} records, "
                                  f"each with its revision")
        ip_keys = [keys.ip(cidr, offset) for cidr, offset, _ in items]
        ok, _, _ = self.etcd.txn([("mod", k, "==", rev) for k, (_, _, rev) in zip(ip_keys, items)],
                                 [("delete", k) for k in ip_keys])
        return ok

    def get_address(self, cidr: str, offset: int) -> Address | None:
        """The record at ``offset`` of block ``cidr``, or None. One read
        (used to resolve a transaction whose outcome is unknown)."""
        kv = self.etcd.get(keys.ip(cidr, offset))
        return self._decode_address(kv) if kv is not None else None

    def get_block(self, pool_name: str, cidr: str) -> Block | None:
        """The block key as etcd holds it now, or None when the block is free."""
        kv = self.etcd.get(keys.block(pool_name, cidr))
        return self._decode_block(kv) if kv is not None else None

    def block_addresses(self, cidr: str) -> list[Address]:
        kvs, _ = self.etcd.get_prefix(keys.block_ips(cidr))
        return [self._decode_address(kv) for kv in kvs]

    def all_addresses(self) -> tuple[list[Address], int]:
        """Every address record and the snapshot's revision (paged)."""
        return self.all_addresses_paged(SCAN_PAGE)

    def all_addresses_paged(self, page_size: int = 5000) -> tuple[list[Address], int]:
        """Every address record, read as one consistent snapshot (the first
        page's revision) in pages of ``page_size`` keys. A single range of
        more than ~30,000 records would exceed gRPC's 4 MiB message limit."""
        kvs, revision = self.etcd.get_prefix_paged(keys.IP, page_size)
        return [self._decode_address(kv) for kv in kvs], revision

    def address_counts(self, cidrs) -> dict[str, int]:
        """Number of addresses held in each block of ``cidrs``. Few blocks: one
        count request each; many: one keys-only read of all address keys in
        pages of ``SCAN_PAGE``, so the number of requests never grows with the
        number of blocks."""
        cidrs = list(cidrs)
        if len(cidrs) <= PER_BLOCK_COUNT_LIMIT:
            return {c: self.count_addresses(c) for c in cidrs}
        counts = dict.fromkeys(cidrs, 0)
        for kvs, _ in self.etcd.iter_prefix_pages(keys.IP, SCAN_PAGE, keys_only=True):
            for kv in kvs:
                cidr = keys.parse_ip_key(kv.key)[0]
                if cidr in counts:
                    counts[cidr] += 1
        return counts

    def count_addresses(self, cidr: str) -> int:
        return self.etcd.count_prefix(keys.block_ips(cidr))

    def _locate(self, address: str):
        try:
            addr = ipaddress.ip_address(str(address).strip())
        except ValueError:
            raise InvalidArgument(f"invalid address {address!r}: expected an IPv4 or IPv6 address") from None
        for pool in self.list_pools():
            for net in pool.subnets:
                if addr.version == net.version and addr in net:
                    block_net = ipaddress.ip_network(
                        f"{addr}/{net.max_prefixlen - pool.block_size}", strict=False)
                    return addr, pool, block_net
        raise NotFound(f"address {addr} is not in any pool's subnet")

    def address_info(self, address: str) -> dict:
        """Pool, block, node and assignment of an address.

        Raises InvalidArgument, NotFound (no pool, or not assigned)."""
        addr, pool, block_net = self._locate(address)
        cidr = str(block_net)
        offset = int(addr) - int(block_net.network_address)
        _, _, responses = self.etcd.txn([], [("get", keys.block(pool.name, cidr)),
                                             ("get", keys.ip(cidr, offset))])
        block_kvs = responses[0].response_range.kvs
        ip_kvs = responses[1].response_range.kvs
        if not ip_kvs:
            owner = json.loads(block_kvs[0].value)["node"] if block_kvs else None
            where = f"block {cidr} of node {owner!r}" if owner else f"free block {cidr}"
            raise NotFound(f"address {addr} is not assigned (pool {pool.name!r}, {where})")
        rec = self._decode_address(self.etcd.decode_kv(ip_kvs[0]))
        info = rec.to_json()
        info.update(pool=pool.name,
                    node=json.loads(block_kvs[0].value)["node"] if block_kvs else None)
        return info

    def free_address(self, address: str) -> Address:
        """Free an assigned address by hand. Raises InvalidArgument, NotFound,
        Conflict (changed while freeing)."""
        addr, pool, block_net = self._locate(address)
        cidr = str(block_net)
        offset = int(addr) - int(block_net.network_address)
        kv = self.etcd.get(keys.ip(cidr, offset))
        if kv is None:
            raise NotFound(f"address {addr} is not assigned (pool {pool.name!r})")
        rec = self._decode_address(kv)
        if not self.release_address(cidr, offset, kv.mod_revision):
            raise Conflict(f"address {addr} changed while being freed, try again")
        return rec

    def pool_usage(self, name: str, subnet: str | None = None) -> dict:
        """Block usage of a pool (optionally one subnet): per node, per block."""
        pool = self.get_pool(name)
        nets = list(pool.subnets)
        if subnet is not None:
            net = parse_subnet(subnet)
            if net not in nets:
                raise NotFound(f"subnet {net} is not a subnet of pool {name!r} "
                               f"(its subnets: {', '.join(map(str, nets))})")
            nets = [net]
        blocks = [b for b in self.pool_blocks(name)
                  if any(b.network.subnet_of(n) for n in nets if n.version == b.network.version)]
        per_block = 1 << pool.block_size
        total_blocks = sum(n.num_addresses >> pool.block_size for n in nets)
        rows = []
        counts = self.address_counts(b.cidr for b in blocks)
        for b in sorted(blocks, key=lambda b: (b.network.version, b.network)):
            used = counts[b.cidr]
            rows.append({"block": b.cidr, "node": b.node, "used": used,
                         "free": per_block - used, "acquired_at": b.acquired_at})
        return {"pool": name, "subnets": [str(n) for n in nets], "block_size": pool.block_size,
                "addresses_per_block": per_block, "blocks_total": total_blocks,
                "blocks_used": len(blocks), "blocks_free": total_blocks - len(blocks),
                "blocks": rows}
