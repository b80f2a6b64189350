"""Table 119 (by default) reconciled to the node's address blocks.

Each block the node holds is published as ``<block> dev lo proto 30`` in the
export table, so that an unmodified routing daemon (BIRD's kernel protocol)
can learn and advertise it. Only routes of our own protocol id are ever
removed: anything else in the table belongs to somebody else.

Each block also gets ``unreachable <block> proto 30`` in the main table: a
packet for an address of a local block that no pod holds is dropped with an
ICMP "host unreachable" instead of following the default route (which may
send it back and forth between the node and its router until the TTL runs
out). The pods' own /32 (/128) routes are more specific and win. Only
unreachable routes of our protocol in the main table are reconciled.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading

from coil.errors import NetlinkError
from coil.net import RT_TABLE_MAIN, RTN_UNREACHABLE, family_of, open_netlink

log = logging.getLogger("coild.routes")


class RouteExporter:
    """Keeps ``table`` equal to the desired set of block routes.

    ``add``/``remove`` are idempotent; ``sync(blocks)`` reconciles the whole
    table and is safe to repeat. Raises NetlinkError with context.
    """

    def __init__(self, table: int = 119, protocol: int = 30, netns=None,
                 unreachable: bool = True):
        self.table = table
        self.protocol = protocol
        self.netns = netns
        self.unreachable = unreachable
        self._lock = threading.Lock()
        with self._nl() as nl:
            lo = nl.link_get("lo")
            if lo is None:
                raise NetlinkError("looking up device lo", errno.ENODEV)
            self._lo = lo.index
            if not lo.up:
                nl.link_set(lo.index, up=True)

    def _nl(self):
        # a handle per operation: the pyroute2 fallback's handles are bound to one thread
        return open_netlink(self.netns)

    def add(self, cidr: str):
        net = ipaddress.ip_network(cidr)
        with self._lock, self._nl() as nl:
            nl.route_add(str(net.network_address), net.prefixlen, oif=self._lo,
                         table=self.table, protocol=self.protocol, replace=True)
            if self.unreachable:
                nl.route_add(str(net.network_address), net.prefixlen, table=RT_TABLE_MAIN,
                             protocol=self.protocol, replace=True,
                             route_type=RTN_UNREACHABLE)

    def remove(self, cidr: str):
        net = ipaddress.ip_network(cidr)
        with self._lock, self._nl() as nl:
            nl.route_del(str(net.network_address), net.prefixlen, table=self.table,
                         protocol=self.protocol)
            self._del_unreachable(nl, net)

    def _del_unreachable(self, nl, net):
        # only if it is ours: an unreachable route of our protocol in main
        for r in nl.route_list(family_of(net.network_address),
                               table=RT_TABLE_MAIN,
                               protocol=self.protocol, route_type=RTN_UNREACHABLE):
            if r.dst == str(net.network_address) and r.prefixlen == net.prefixlen:
                nl.route_del(r.dst, r.prefixlen, table=RT_TABLE_MAIN, protocol=self.protocol)

    def current_unreachable(self) -> set[str]:
        """The unreachable routes of our protocol in the main table."""
        with self._lock, self._nl() as nl:
            routes = nl.route_list(0, table=RT_TABLE_MAIN, protocol=self.protocol,
                                   route_type=RTN_UNREACHABLE)
        return {str(ipaddress.ip_network(f"{r.dst}/{r.prefixlen}")) for r in routes}

    def current(self) -> set[str]:
        with self._lock, self._nl() as nl:
            routes = nl.route_list(0, table=self.table, protocol=self.protocol)
        return {str(ipaddress.ip_network(f"{r.dst}/{r.prefixlen}")) for r in routes}

    def sync(self, cidrs) -> tuple[set, set]:
        """Make the table hold exactly ``cidrs`` (of our protocol), and the
        main table exactly their unreachable routes (of our protocol).
        Returns (added, removed) of the export table."""
        desired = {str(ipaddress.ip_network(c)) for c in cidrs}
        have = self.current()
        unreachable = self.current_unreachable()
        for cidr in sorted(desired - have):
            self.add(cidr)
        if self.unreachable:
            for cidr in sorted(desired - unreachable - (desired - have)):
                self.add(cidr)          # table route there, unreachable route missing
        for cidr in sorted(have - desired):
            self.remove(cidr)
        with self._lock, self._nl() as nl:
            for cidr in sorted(unreachable - desired - (have - desired)):
                self._del_unreachable(nl, ipaddress.ip_network(cidr))
        if desired != have:
            log.info("table synced", extra={"table": self.table, "added": sorted(desired - have),
                                            "removed": sorted(have - desired)})
        return desired - have, have - desired
