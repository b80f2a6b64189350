"""Table 119 (by default) reconciled to the node's address blocks.

Each block the node holds is published as ``<block> dev lo proto 30`` in the
export table, so that an unmodified routing daemon (BIRD's kernel protocol)
can learn and advertise it. Only routes of our own protocol id are ever
removed: anything else in the table belongs to somebody else.
"""

from __future__ import annotations

import ipaddress
import logging
import threading

from coil import netlink
from coil.errors import NetlinkError

log = logging.getLogger("coild.routes")


class RouteExporter:
    """Keeps ``table`` equal to the desired set of block routes.

    ``add``/``remove`` are idempotent; ``sync(blocks)`` reconciles the whole
    table and is safe to repeat. Raises NetlinkError with context.
    """

    def __init__(self, table: int = 119, protocol: int = 30, netns=None):
        self.table = table
        self.protocol = protocol
        self.netns = netns
        self._lock = threading.Lock()
        with self._nl() as nl:
            lo = nl.link_get("lo")
            if lo is None:
                raise NetlinkError("looking up device lo", 19)
            self._lo = lo.index
            if not lo.up:
                nl.link_set(lo.index, up=True)

    def _nl(self):
        # a handle per operation: the pyroute2 fallback's handles are bound to one thread
        return netlink.open_netlink(self.netns)

    def add(self, cidr: str):
        net = ipaddress.ip_network(cidr)
        with self._lock, self._nl() as nl:
            nl.route_add(str(net.network_address), net.prefixlen, oif=self._lo,
                               table=self.table, protocol=self.protocol, replace=True)

    def remove(self, cidr: str):
        net = ipaddress.ip_network(cidr)
        with self._lock, self._nl() as nl:
            nl.route_del(str(net.network_address), net.prefixlen, table=self.table,
                               protocol=self.protocol)

    def current(self) -> set[str]:
        with self._lock, self._nl() as nl:
            routes = nl.route_list(0, table=self.table, protocol=self.protocol)
        return {str(ipaddress.ip_network(f"{r.dst}/{r.prefixlen}")) for r in routes}

    def sync(self, cidrs) -> tuple[set, set]:
        """Make the table hold exactly ``cidrs`` (of our protocol).
        Returns (added, removed)."""
        desired = {str(ipaddress.ip_network(c)) for c in cidrs}
        have = self.current()
        for cidr in sorted(desired - have):
            self.add(cidr)
        for cidr in sorted(have - desired):
            self.remove(cidr)
        if desired != have:
            log.info("table synced", extra={"table": self.table, "added": sorted(desired - have),
                                            "removed": sorted(have - desired)})
        return desired - have, have - desired
