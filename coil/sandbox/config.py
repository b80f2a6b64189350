"""What ``up`` builds: the sandbox's Config (validated), its fixed names and
addresses, and SandboxError, the error every part of the sandbox raises."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from coil.errors import CoilError
from coil.sandbox import bird

REFERENCE_PLUGINS = "/usr/lib/cni"
ETCD_SOCKET = "etcd.sock:0"           # etcd names UNIX listeners HOST:PORT; the file is this
GATEWAY = "169.254.1.1"               # the pods' gateway: coild's host-side veth address


class SandboxError(CoilError):
    """Something the sandbox could not do; the message says what and where."""


@dataclass
class Config:
    """What ``up`` builds. Every address is private and lives only inside
    the sandbox's namespaces."""
    nodes: int = 3
    pods: int = 3                        # default-namespace pods per node
    global_pods: int = 1                 # pods of namespace "global" (on node1)
    name: str = "coilsb"                 # prefix of every namespace name
    fabric_subnet: str = "10.250.0.0/24"
    default_subnet: str = "10.100.0.0/16"
    block_size: int = 5                  # 2^5 = 32 addresses per block
    global_subnet: str = "10.200.0.0/24"
    global_block_size: int = 3
    asn: int = bird.DEFAULT_ASN
    etcd_prefix: str = "/coil/"
    parallel: int = 0                    # concurrent CNI ADDs (0: automatic)
    coild_scan_interval: str = "10m"
    kubernetes: bool = False             # kube-apiserver, Node objects, coil-controller
    controller_scan_interval: str = "30s"   # coil-controller's leak scan
    coild_liveness_ttl: str = "5s"          # node-alive/<node> lease: lapses soon after a stop
    controller_node_grace: str = "1m"       # the shortest grace coil-controller accepts

    def validate(self):
        if not 1 <= self.nodes <= 200:
            raise SandboxError(f"--nodes {self.nodes}: between 1 and 200")
        if not 0 <= self.pods <= 1000:
            raise SandboxError(f"--pods {self.pods}: between 0 and 1000")
        if not self.name.replace("-", "").isalnum() or len(self.name) > 20:
            raise SandboxError(f"--name {self.name!r}: letters, digits and dashes, at most 20")
        nets = {}
        for what in ("fabric_subnet", "default_subnet", "global_subnet"):
            try:
                net = ipaddress.ip_network(getattr(self, what))
            except ValueError as exc:
                raise SandboxError(f"{what}: {exc}") from None
            if net.version != 4 or not net.is_private:
                raise SandboxError(f"{what} {net}: must be a private IPv4 network")
            for other, onet in nets.items():
                if net.overlaps(onet):
                    raise SandboxError(f"{what} {net} overlaps {other} {onet}")
            nets[what] = net
        if nets["fabric_subnet"].num_addresses < self.nodes + 12:
            raise SandboxError(f"fabric_subnet {nets['fabric_subnet']} too small for "
                               f"{self.nodes} nodes")


def node_name(i: int) -> str:
    return f"node{i}"
