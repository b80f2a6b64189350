"""The network of one pod: veth pair, addresses, routes (add, check, delete).

Wiring (IPv4; IPv6 alike with fe80::1):
  host end  vethXXXXXXXXXXX: 169.254.1.1/32, route <pod-ip>/32 dev <host end> scope link
  pod end   CNI_IFNAME:      <pod-ip>/32, route 169.254.1.1/32 dev <ifname> scope link,
                             default via 169.254.1.1
The pair is created with its peer directly inside the pod's namespace (one
netlink request, ~3 ms) instead of creating it there and moving one end out
(~24 ms).

Deleting a veth costs the kernel ~20 ms of RCU grace periods, whoever asks;
deleting many in one request costs about the same as deleting one. So DEL
does not delete: ``retire`` takes the pair out of service at once (routes
gone, the pod's end down, which takes the host end's carrier) and puts both
ends in a link group that ``coil.coild.teardown`` deletes in batches.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import random
import re

from coil.errors import CoilError, NetlinkError, PodNetError
from coil.net import (RT_SCOPE_LINK, RT_TABLE_MAIN, RTPROT_STATIC, host_prefixlen, ip_version,
                      ns_handle, open_netlink)

GATEWAY4 = "169.254.1.1"
GATEWAY6 = "fe80::1"
#: base metric of the pod-side routes of a pod's later attachment
#: (IPv6's default metric is 1024: above it, the first attachment wins)
ATTACHMENT_METRIC = 1024
#: the host ends coil makes: "veth" + 11 hex digits (see host_veth_name)
HOST_VETH_RE = re.compile(r"veth[0-9a-f]{11}")
#: what a retired veth end is renamed to when its name is wanted again
#: before the deletion queue flushed it: "cdel" + 11 random hex digits
RETIRED_PREFIX = "cdel"
#: the link group of retired veth ends ("coil" in ASCII); both ends of a
#: retired pair carry it (the pod end in the pod's namespace)
RETIRED_GROUP = 0x636F696C


def host_veth_name(container_id: str, ifname: str, network: str) -> str:
    """Stable host-side name of one attachment: 'veth' + 11 hex digits of
    SHA-1("<container ID>/<ifname>/<network name>"). Two attachments of one
    container (two networks, or eth0 and net1) get two names; a retried ADD
    of the same attachment finds its own."""
    digest = hashlib.sha1(f"{container_id}/{ifname}/{network}".encode()).hexdigest()
    return "veth" + digest[:11]


def legacy_host_veth_name(namespace: str, pod: str) -> str:
    """The name coild gave the host end before attachments were keyed
    (one per pod): 'veth' + 11 hex digits of SHA-1("<namespace>.<pod>")."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    return "veth" + digest[:11]


def host_veth_names(rec) -> tuple[str, ...]:
    """Where the host end of address record ``rec``'s attachment may be:
    its attachment's name, then the pre-attachment name of its pod (a pair
    made by an older coild). Callers use the first that exists and routes
    the record's address, so the older name is never taken from another
    attachment."""
    return (host_veth_name(rec.container_id, rec.ifname, rec.network),
            legacy_host_veth_name(rec.namespace, rec.pod))


def _names(host_name) -> tuple[str, ...]:
    """A host-end name or a sequence of candidate names -> candidates."""
    if isinstance(host_name, str):
        return (host_name,) if host_name else ()
    return tuple(n for n in host_name if n)


def _route_add_beside(nl, dst, dst_len, oif, gateway, scope):
    """Add a pod-side route. When another attachment of the pod (Multus:
    eth0 and net1) has that route already (EEXIST: same destination and
    metric), this one is added beside it with a metric of its own
    (ATTACHMENT_METRIC + the interface's index): the first attachment's
    route keeps the traffic, this one takes over once that is gone."""
    try:
        nl.route_add(dst, dst_len, oif=oif, gateway=gateway, scope=scope,
                     protocol=RTPROT_STATIC)
    except NetlinkError as exc:
        if exc.errno != errno.EEXIST:
            raise
        nl.route_add(dst, dst_len, oif=oif, gateway=gateway, scope=scope,
                     protocol=RTPROT_STATIC, priority=ATTACHMENT_METRIC + oif)


def retired_name() -> str:
    """A fresh name for a retired veth end whose name is wanted again (not
    a host-veth name)."""
    return f"{RETIRED_PREFIX}{random.getrandbits(44):011x}"


def link_set_if_present(nl, index: int, **changes) -> bool:
    """``nl.link_set(index, **changes)``; False when the link is gone
    (ENODEV: deleted meanwhile, e.g. with its namespace). Raises other
    NetlinkErrors."""
    try:
        nl.link_set(index, **changes)
        return True
    except NetlinkError as exc:
        if exc.errno != errno.ENODEV:
            raise
        return False


def gateway_for(address) -> str:
    """The pod's gateway for an address of its version (text or object)."""
    return GATEWAY6 if ip_version(address) == 6 else GATEWAY4



def _check_link(link, what: str, mac: str, mtu: int | None):
    """CHECK of one end of the pair: present, a veth, up, and with the MAC
    (prevResult's, when given) and MTU (when configured) ADD gave it.
    Returns the link; raises PodNetError naming ``what`` and the first
    difference."""
    if link is None:
        raise PodNetError(f"{what} is missing")
    if link.kind != "veth":
        raise PodNetError(f"{what} is a {link.kind or 'device'} of another type, "
                          f"not the veth ADD made")
    if not link.up:
        raise PodNetError(f"{what} is down")
    if mac and link.mac.lower() != mac.lower():
        raise PodNetError(f"{what} has MAC {link.mac}, prevResult says {mac}")
    if mtu and link.mtu != mtu:
        raise PodNetError(f"{what} has MTU {link.mtu}, not {mtu}")
    return link

class PodNetwork:
    """Sets up, checks and removes pod wiring from the node's namespace.

    ``host_netns`` is where the host ends live (None: coild's own).
    """

    def __init__(self, host_netns=None, retired_group: int = RETIRED_GROUP):
        self.host_netns = host_netns
        self.retired_group = retired_group

    def _host_nl(self):
        # one handle per operation: cheap (~20 us) and safe across threads,
        # which the pyroute2 fallback's handles are not
        return open_netlink(self.host_netns)

    def setup(self, netns_path: str, ifname: str, host_name: str, addresses: list[str],
              mtu: int | None = None) -> dict:
        """Create the pair and wire it. On any failure everything made here is
        removed before the error is raised. A host end of the same name left
        by an earlier try is replaced. Returns {host_mac, container_mac}."""
        with ns_handle(netns_path) as fd, open_netlink(fd) as pod_nl, self._host_nl() as h:
            # create first; only a name that is taken (EEXIST) costs a look:
            # every request here waits for the node's RTNL lock
            for attempt in (1, 2, 3):
                try:
                    host_index = h.veth_add(host_name, ifname, peer_netns=fd, mtu=mtu)
                    break
                except NetlinkError as exc:
                    if exc.errno != errno.EEXIST or attempt == 3:
                        raise
                    self._free_names(h, pod_nl, host_name, ifname, netns_path)
            try:
                return self._wire(h, pod_nl, host_index, ifname, addresses)
            except BaseException:
                h.link_del(host_name)
                raise

    def _free_names(self, h, pod_nl, host_name, ifname, netns_path):
        """After EEXIST from creating the pair: free ``ifname`` in the pod's
        namespace when a retired pair holds it (a DEL of this namespace's
        earlier attachment, not flushed yet: renamed away, the queue still
        deletes it), and ``host_name`` in the node's namespace (retired:
        renamed away; a leftover of an earlier try of this attachment:
        deleted). Raises NetlinkError(EEXIST) when the container has a live
        interface ``ifname``."""
        pod_link = pod_nl.link_get(ifname)
        if pod_link is not None:
            if pod_link.group != self.retired_group:
                raise NetlinkError(f"creating interface {ifname} in {netns_path}",
                                   errno.EEXIST,
                                   hint="the container already has this interface") from None
            self._rename_away(pod_nl, pod_link.index)
        host = h.link_get(host_name)
        if host is not None:
            if host.group == self.retired_group:
                self._rename_away(h, host.index)
            else:
                h.link_del(host_name)     # leftover of an earlier try

    @staticmethod
    def _wire(h, pod_nl, host_index, ifname, addresses) -> dict:
        h.link_set(host_index, up=True)
        pod_link = pod_nl.link_get(ifname)
        if pod_link is None:
            raise NetlinkError(f"finding {ifname} in the pod namespace", errno.ENODEV)
        versions = {ip_version(a) for a in addresses}
        if 4 in versions:
            h.addr_add(host_index, GATEWAY4, 32, scope=RT_SCOPE_LINK)
        if 6 in versions:
            h.addr_add(host_index, GATEWAY6, 64, scope=RT_SCOPE_LINK, nodad=True)
        pod_nl.link_set(pod_link.index, up=True)
        for addr in addresses:
            plen = host_prefixlen(addr)
            gw = gateway_for(addr)
            h.route_add(addr, plen, oif=host_index, scope=RT_SCOPE_LINK, protocol=RTPROT_STATIC,
                        replace=True)
            pod_nl.addr_add(pod_link.index, addr, plen, nodad=(plen == 128))
            default = "::" if plen == 128 else "0.0.0.0"
            for dst, dst_len, via, scope in ((gw, plen, None, RT_SCOPE_LINK),
                                             (default, 0, gw, 0)):
                _route_add_beside(pod_nl, dst, dst_len, pod_link.index, via, scope)
        host_link = h.link_get_index(host_index)
        return {"host_mac": host_link.mac if host_link else "", "container_mac": pod_link.mac,
                "container_index": pod_link.index, "mtu": pod_link.mtu}

    def delete(self, netns_path: str | None, ifname: str, host_name,
               addresses: list[str]) -> bool:
        """Remove the pair. The host end (``host_name``: a name, or candidate
        names tried in order) is removed only when it is this attachment's
        (it routes one of ``addresses``) or, failing that, through the
        container's own interface. Safe to repeat; True if something was
        removed."""
        removed = False
        if netns_path and os.path.exists(netns_path):
            with ns_handle(netns_path, missing_ok=True) as fd:
                if fd is not None:                # else deleted meanwhile
                    with open_netlink(fd) as pod_nl:
                        removed = pod_nl.link_del(ifname)
        if not removed and addresses:
            with self._host_nl() as h:
                host = self._host_end(h, host_name, addresses)
                if host is not None:
                    removed = h.link_del(host.name)
        return removed

    def _host_end(self, h, host_name, addresses: list[str]):
        """The first link of ``host_name`` (a name or candidates) that exists
        and routes one of ``addresses``; None."""
        if not addresses:
            return None
        for name in _names(host_name):
            link = h.link_get(name)
            if link is not None and self._routes_to(h, link.index, addresses):
                return link
        return None

    def retire(self, netns_path: str | None, ifname: str, host_name,
               addresses: list[str]) -> str:
        """Take the container's veth pair out of service without paying for
        its deletion; the caller deletes link group ``retired_group`` later.

        Only when the host end ``host_name`` (a name, or candidate names
        tried in order) is this attachment's (it routes one of
        ``addresses``), in this order:
        1. its routes to ``addresses`` are deleted (each RTM_DELROUTE names
           the host end as the output interface, so it deletes only a route
           through it; that one existed is what makes the host end this
           attachment's - no dump of the routing table): nothing routes the
           addresses once this returns, so the caller may release them;
        2. the host end is put in link group ``retired_group``, keeping its
           name: from here on a crash still ends in its deletion (coild
           deletes the group when it starts); an ADD that wants the name
           before that renames it away (``setup``);
        3. the pod's ``ifname`` (if its namespace is still there) is set
           down, which flushes its routes and takes the host end's carrier
           (nothing passes the pair any more either way), and put in that
           group too: an ADD of the same ifname in the same namespace
           recognises it as retired;
        4. only when the pod's end was not set down here (its namespace or
           the link is gone, or an earlier DEL retired it) is the host end
           set down. Otherwise it stays administratively up until the
           flush, which closes the whole batch with one RCU grace period:
           a link down is one ``synchronize_net()`` under RTNL, and two per
           DEL held every other pod's netlink requests behind them.
        No rename: renaming a device makes the kernel re-register its
        sysctl tables under RTNL, twice per DEL.
        When the host end is not found (or is not this container's), the
        pod's ``ifname`` is deleted at once as before (the pair goes with it),
        unless it is retired already (a repeated DEL).
        A crash between 1 and 2 leaves a host end without routes: the DEL was
        not answered, and its retry finds no route through it and deletes the
        pod's ``ifname`` (the pair with it). A crash between 2 and 3 leaves
        the pair up but routing nothing, its address still recorded (the
        DEL was not answered); the next coild deletes the group at start.

        Returns "retired" (the pair waits in ``retired_group``), "deleted" (removed
        now) or "" (nothing was there). Safe to repeat; a link that vanishes
        meanwhile (its namespace was deleted) counts as gone. Raises
        NetlinkError."""
        with self._host_nl() as h:
            host = None
            for name in _names(host_name) if addresses else ():
                link = h.link_get(name)
                if link is None:
                    continue
                routed = False
                for addr in addresses:
                    try:
                        routed |= h.route_del(addr, host_prefixlen(addr), oif=link.index,
                                              table=RT_TABLE_MAIN)
                    except NetlinkError as exc:
                        if exc.errno not in (errno.ENODEV, errno.ESRCH):
                            raise
                if routed:                   # this attachment's: its routes went through it
                    host = link
                    break
            if host is not None and not link_set_if_present(h, host.index,
                                                            group=self.retired_group):
                host = None                  # gone meanwhile
        pod_done = False
        try:
            pod_done = self._retire_pod_side(netns_path, ifname, delete=host is None)
        finally:
            if host is not None and not pod_done:   # the pod's end is not known to be down
                with self._host_nl() as h:
                    link_set_if_present(h, host.index, up=False)
        if host is not None:
            return "retired"
        return "deleted" if pod_done else ""

    @staticmethod
    def _rename_away(nl, index: int) -> bool:
        """Rename retired link ``index`` to a fresh ``cdel...`` name (its
        group stays, so the queue still deletes it), freeing its name for a
        new pair. False when it is gone (flushed meanwhile)."""
        for _ in range(4):
            try:
                nl.link_set(index, name=retired_name())
                return True
            except NetlinkError as exc:
                if exc.errno == errno.ENODEV:
                    return False
                if exc.errno == errno.EBUSY:
                    # kernels that cannot rename a link that is up: down first
                    if not link_set_if_present(nl, index, up=False):
                        return False
                    continue
                if exc.errno != errno.EEXIST:   # name taken: draw another
                    raise
        raise NetlinkError(f"renaming retired link index {index}", errno.EEXIST)

    def _retire_pod_side(self, netns_path, ifname, delete: bool) -> bool:
        if not (netns_path and ifname and os.path.exists(netns_path)):
            return False
        with ns_handle(netns_path, missing_ok=True) as fd:
            if fd is None:
                return False                      # deleted meanwhile
            with open_netlink(fd) as pod_nl:
                link = pod_nl.link_get(ifname)
                if link is None or link.group == self.retired_group:
                    return False                  # gone, or retired by an earlier DEL
                if delete:
                    return pod_nl.link_del(ifname)
                # down: the kernel flushes its routes, so another
                # attachment's (net1's) take the pod's traffic at once
                return link_set_if_present(pod_nl, link.index, group=self.retired_group, up=False)

    @staticmethod
    def _routes_to(h, index: int, addresses: list[str]) -> bool:
        wanted = {ipaddress.ip_address(a) for a in addresses}
        for r in h.route_list(0, table=RT_TABLE_MAIN):
            if r.oif == index and r.prefixlen in (32, 128) and ipaddress.ip_address(r.dst) in wanted:
                return True
        return False

    def check(self, netns_path: str, ifname: str, host_name: str, addresses: list[str],
              mtu: int | None = None, host_mac: str = "", container_mac: str = ""):
        """Raise PodNetError naming the first thing that is missing or
        different: both ends veths and up, the gateway addresses on the host end,
        routes on both sides, the pod's addresses; ``mtu`` (both ends) and
        the MACs when given. Routes and addresses others added are fine."""
        with self._host_nl() as h:
            host = _check_link(h.link_get(host_name), f"host interface {host_name}",
                               host_mac, mtu)
            host_addrs = {(ipaddress.ip_address(a.address), a.prefixlen)
                          for a in h.addr_list(host.index)}
            versions = {ip_version(a) for a in addresses}
            for gw, plen, version in ((GATEWAY4, 32, 4), (GATEWAY6, 64, 6)):
                if version in versions and \
                        (ipaddress.ip_address(gw), plen) not in host_addrs:
                    raise PodNetError(f"gateway address {gw}/{plen} is missing on {host_name}")
            host_routes = {(ipaddress.ip_address(r.dst), r.prefixlen)
                           for r in h.route_list(0, table=RT_TABLE_MAIN) if r.oif == host.index}
        for addr in addresses:
            if (ipaddress.ip_address(addr), host_prefixlen(addr)) not in host_routes:
                raise PodNetError(f"route {addr}/{host_prefixlen(addr)} dev {host_name} is missing")
        if not os.path.exists(netns_path):
            raise PodNetError(f"network namespace {netns_path} does not exist")
        with open_netlink(netns_path) as pod_nl:
            link = _check_link(pod_nl.link_get(ifname), f"interface {ifname} in {netns_path}",
                               container_mac, mtu)
            have = {(ipaddress.ip_address(a.address), a.prefixlen)
                    for a in pod_nl.addr_list(link.index)}
            routes = pod_nl.route_list(0, table=RT_TABLE_MAIN)
            for addr in addresses:
                plen = host_prefixlen(addr)
                if (ipaddress.ip_address(addr), plen) not in have:
                    raise PodNetError(f"address {addr}/{plen} is missing on {ifname}")
                gw = ipaddress.ip_address(gateway_for(addr))
                if not any(r.oif == link.index and r.prefixlen == plen and
                           ipaddress.ip_address(r.dst) == gw for r in routes):
                    raise PodNetError(f"route {gw}/{plen} dev {ifname} is missing")
                if not any(r.prefixlen == 0 and r.gateway and
                           ipaddress.ip_address(r.gateway) == gw for r in routes):
                    raise PodNetError(f"default route via {gw} is missing in {netns_path}")

    def describe(self, netns_path: str, ifname: str, host_name: str,
                 addresses: list[str]) -> dict | None:
        """The wiring of a pod that is set up exactly as ``setup()`` makes
        it, as ``setup()`` returns it; None when anything differs or is
        missing. Changes nothing (a repeated ADD answers from it)."""
        try:
            self.check(netns_path, ifname, host_name, addresses)
            with self._host_nl() as h:
                host = h.link_get(host_name)
            with open_netlink(netns_path) as pod_nl:
                link = pod_nl.link_get(ifname)
        except CoilError:
            return None
        if host is None or link is None:
            return None
        return {"host_mac": host.mac, "container_mac": link.mac,
                "container_index": link.index, "mtu": link.mtu}
