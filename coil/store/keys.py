"""The etcd key layout. docs/schema.md mirrors this module.

All keys are relative to the configured prefix (default ``/coil/``).

    pool/<name>                   {"subnets": [CIDR...], "block_size": N}
    subnet/<CIDR>                 {"pool": <name>}      one per subnet: uniqueness
    subnets-guard                 "<generation>"        serialises subnet changes
    block/<pool>/<block-CIDR>     {"node", "subnet", "acquired_at"}  one per held block
    node-block/<node>/<block-CIDR>  "<pool>"            index of a node's blocks
    ip/<block-CIDR>/<offset>      {"namespace", "pod", "container_id", "created_at",
                                   "origin", "network", "ifname", "release_if_leaked"}
    node-alive/<node>             {"pid", "since"}     under the node's coild lease

An address record's ``container_id``, ``network`` and ``ifname`` name the
CNI attachment it belongs to: the spec's key (container ID, ifname) within
the network name (``Address.of_attachment``); one container may hold
records of several attachments. ``origin`` rest records belong to no CNI
attachment. Address records written before ``origin``/``network``/``ifname``
existed read as origin unknown, network unknown, ifname ``eth0``: the eth0
attachment of any network (see docs/schema.md).

A free block has no key: taking one is a create guarded by
``version(block/...) == 0``, so nodes taking blocks never rewrite a shared
document.

Coil v1's layout under the same prefix (``subnet/<address>``, one
``block/<pool>/<subnet-address>`` document per subnet, ``ip/<address>/<offset>``)
is recognised and converted only by ``coil.store.v1``.
"""

POOL = "pool/"
SUBNET = "subnet/"
SUBNETS_GUARD = "subnets-guard"
BLOCK = "block/"
NODE_BLOCK = "node-block/"
IP = "ip/"
NODE_ALIVE = "node-alive/"


def pool(name: str) -> str:
    return f"{POOL}{name}"


def subnet(cidr: str) -> str:
    return f"{SUBNET}{cidr}"


def pool_blocks(pool_name: str) -> str:
    return f"{BLOCK}{pool_name}/"


def block(pool_name: str, block_cidr: str) -> str:
    return f"{BLOCK}{pool_name}/{block_cidr}"


def node_blocks(node: str) -> str:
    return f"{NODE_BLOCK}{node}/"


def node_block(node: str, block_cidr: str) -> str:
    return f"{NODE_BLOCK}{node}/{block_cidr}"


def block_ips(block_cidr: str) -> str:
    return f"{IP}{block_cidr}/"


def ip(block_cidr: str, offset: int) -> str:
    return f"{IP}{block_cidr}/{offset}"


def node_alive(node: str) -> str:
    """The liveness record of ``node``'s coild (attached to an etcd lease)."""
    return f"{NODE_ALIVE}{node}"


def parse_block_key(key: str) -> tuple[str, str]:
    """``block/<pool>/<cidr>`` -> (pool, cidr)."""
    rest = key[len(BLOCK):]
    pool_name, _, cidr = rest.partition("/")
    return pool_name, cidr


def parse_ip_key(key: str) -> tuple[str, int]:
    """``ip/<cidr>/<offset>`` -> (block cidr, offset)."""
    rest = key[len(IP):]
    cidr, _, offset = rest.rpartition("/")
    return cidr, int(offset)
