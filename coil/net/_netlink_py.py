"""rtnetlink for coild, pure-Python fallback built on pyroute2.

Same API as the Cython extension ``coil.net._netlink``; ``coil.net``
chooses between them. Every method raises ``coil.errors.NetlinkError``
(with the kernel's errno) on failure.

``open_netlink(netns=None)`` returns a :class:`Netlink` whose socket lives
in ``netns``: None (the calling thread's current namespace), a path such as
``/run/netns/NAME``, or an open fd of a network namespace. The socket is
created by switching the calling thread into the namespace with setns(2),
creating it and switching back (``coil.net.ns.in_netns``); it is handed to
pyroute2 with ``use_socket`` so that pyroute2 never forks a helper process
nor creates another socket behind our back.

Methods
-------
``link_get(name)``, ``link_get_index(index)`` -> Link | None
``link_list()`` -> list[Link]
``veth_add(name, peer_name, peer_netns=None, mtu=None)`` -> index of name
``link_del(name)`` -> bool, ``link_del_group(group)`` -> bool (every link
of that IFLA_GROUP in one request, one kernel batch),
``link_set(index, up=None, mtu=None, netns=None, name=None, group=None)``
(one request; ``name`` renames, ``group`` sets IFLA_GROUP; ``netns``: move
the link to that namespace, path or fd, not together with another change)
``addr_add(index, address, prefixlen, scope=0, nodad=False)``
``addr_list(index=None, family=0)`` -> list[Addr]
``addr_del(index, address, prefixlen)``
``route_add(dst, prefixlen, *, oif=None, gateway=None, table=254,
protocol=4, scope=0, replace=False, route_type=1)`` (``route_type``: the
rtm_type, RTN_UNICAST 1, RTN_BLACKHOLE 6, RTN_UNREACHABLE 7; the last two
need no ``oif``)
``route_del(dst, prefixlen, *, table=254, oif=None, protocol=None)`` -> bool
``route_list(family=0, table=None, protocol=None, route_type=None)`` -> list[Route]

A pyroute2 ``IPRoute`` runs its asyncio loop on the thread that created
it; use a :class:`Netlink` of this backend from the thread that opened it
(pyroute2 raises otherwise). The Cython backend has no such restriction.
"""

from __future__ import annotations

import errno as _errno
import os
import socket
import threading

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted
from pyroute2.netlink.exceptions import NetlinkError as _PyrNetlinkError

from coil.errors import NetlinkError
from coil.net.ns import in_netns, ns_label, open_ns_fd, target_label
from coil.net.types import (Addr, Link, Route,
                            IFA_F_NODAD, IFF_UP, IFNAMSIZ, NETLINK_ROUTE,
                            RT_SCOPE_HOST, RT_SCOPE_LINK, RT_SCOPE_NOWHERE,
                            RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, RTPROT_STATIC, RTN_UNICAST)

__all__ = ["open_netlink", "Netlink", "Link", "Addr", "Route",
           "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST",
           "RTPROT_STATIC", "RT_TABLE_MAIN"]

_DUMP_RETRIES = 10


def _errno_of(exc: BaseException) -> int:
    code = getattr(exc, "code", None)
    if isinstance(code, int) and code > 0:
        return code
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code > 0:
        return code
    return _errno.EIO


def _family_of(address: str, context: str):
    """Return (family, max prefix) for an address string or raise EINVAL."""
    if not isinstance(address, str):
        raise NetlinkError(context, _errno.EINVAL)
    for family, maxlen in ((socket.AF_INET, 32), (socket.AF_INET6, 128)):
        try:
            socket.inet_pton(family, address)
        except (OSError, ValueError):
            continue
        return family, maxlen
    raise NetlinkError(context, _errno.EINVAL)


def _check_prefix(prefixlen, maxlen: int, context: str) -> None:
    if not isinstance(prefixlen, int) or not 0 <= prefixlen <= maxlen:
        raise NetlinkError(context, _errno.EINVAL)


def _check_ifname(name, context: str) -> None:
    if (not isinstance(name, str) or not name
            or len(name.encode()) >= IFNAMSIZ):
        raise NetlinkError(context, _errno.EINVAL)


def _group_ok(group) -> bool:
    return (isinstance(group, int) and not isinstance(group, bool)
            and 0 < group <= 0xFFFFFFFF)


def _ifname_ok(name) -> bool:
    return isinstance(name, str) and 0 < len(name.encode()) < IFNAMSIZ


def _link(msg) -> Link:
    kind = None
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    if linkinfo is not None:
        kind = linkinfo.get_attr("IFLA_INFO_KIND")
    mac = msg.get_attr("IFLA_ADDRESS") or ""
    return Link(msg["index"], msg.get_attr("IFLA_IFNAME") or "",
                msg.get_attr("IFLA_MTU") or 0, mac,
                bool(msg["flags"] & IFF_UP), kind, msg.get_attr("IFLA_GROUP") or 0)


def _addr(msg) -> Addr:
    address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") or ""
    return Addr(msg["index"], address, msg["prefixlen"], msg["family"],
                msg["scope"])


def _route(msg) -> Route:
    family = msg["family"]
    dst = msg.get_attr("RTA_DST")
    if dst is None:
        dst = "::" if family == socket.AF_INET6 else "0.0.0.0"
    table = msg.get_attr("RTA_TABLE")
    if table is None:
        table = msg["table"]
    return Route(family, dst, msg["dst_len"], msg.get_attr("RTA_OIF"),
                 msg.get_attr("RTA_GATEWAY"), table, msg["proto"],
                 msg["scope"], msg["type"])


def _socket_in(netns) -> socket.socket:
    """A NETLINK_ROUTE socket created inside ``netns`` (see in_netns)."""
    with in_netns(netns):
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                 NETLINK_ROUTE)
        except OSError as exc:
            where = "" if netns is None else f" in network namespace {ns_label(netns)}"
            raise NetlinkError(f"opening a netlink socket{where}",
                               exc.errno or _errno.EIO) from None
    return sock


class Netlink:
    """An rtnetlink socket bound to one network namespace (pyroute2)."""

    RT_SCOPE_UNIVERSE = RT_SCOPE_UNIVERSE
    RT_SCOPE_LINK = RT_SCOPE_LINK
    RT_SCOPE_HOST = RT_SCOPE_HOST
    RTPROT_STATIC = RTPROT_STATIC

    def __init__(self, netns=None):
        self._ipr = None
        sock = _socket_in(netns)
        try:
            self._ipr = IPRoute(use_socket=sock)
        except Exception as exc:
            sock.close()
            raise NetlinkError("opening a pyroute2 IPRoute", _errno_of(exc)) from None
        self._sock = sock
        self._lock = threading.Lock()
        self._owner = threading.get_ident()

    # -- lifetime -----------------------------------------------------------

    def close(self) -> None:
        ipr, self._ipr = self._ipr, None
        if ipr is not None:
            try:
                ipr.close()
            finally:
                self._sock.close()

    @property
    def closed(self) -> bool:
        return self._ipr is None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _call(self, context, method, *args, **kwargs):
        """Run an IPRoute method; pyroute2 errors become NetlinkError."""
        ipr = self._ipr
        if ipr is None:
            raise NetlinkError(context, _errno.EBADF)
        if threading.get_ident() != self._owner:
            raise RuntimeError(
                "a pyroute2-backed netlink handle must be used from the "
                "thread that opened it (open one per thread)")
        with self._lock:
            try:
                return getattr(ipr, method)(*args, **kwargs)
            except NetlinkDumpInterrupted:
                raise  # retried by _dump
            except _PyrNetlinkError as exc:
                raise NetlinkError(context, _errno_of(exc)) from None
            except OSError as exc:
                raise NetlinkError(context, _errno_of(exc)) from None

    def _dump(self, context, method, *args, **kwargs):
        for _ in range(_DUMP_RETRIES):
            try:
                return list(self._call(context, method, *args, **kwargs))
            except NetlinkDumpInterrupted:
                continue
        raise NetlinkError(context, _errno.EINTR)

    # -- links --------------------------------------------------------------

    def link_get(self, name: str):
        if not _ifname_ok(name):
            return None
        try:
            msgs = self._call(f"getting link {name}", "link", "get", ifname=name)
        except NetlinkError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise
        return _link(msgs[0]) if msgs else None

    def link_get_index(self, index: int):
        if not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            return None
        try:
            msgs = self._call(f"getting link index {index}", "link", "get",
                              index=index)
        except NetlinkError as exc:
            if exc.errno == _errno.ENODEV:
                return None
            raise
        return _link(msgs[0]) if msgs else None

    def link_list(self):
        return [_link(m) for m in self._dump("listing links", "link", "dump")]

    def veth_add(self, name: str, peer_name: str, peer_netns=None, mtu=None) -> int:
        context = f"creating veth {name}/{peer_name}"
        _check_ifname(name, context)
        _check_ifname(peer_name, context)
        # one TX/RX queue each, as the Cython backend (no RCU wait under RTNL)
        peer = {"ifname": peer_name, "num_tx_queues": 1, "num_rx_queues": 1}
        spec = {"ifname": name, "kind": "veth", "peer": peer, "num_tx_queues": 1,
                "num_rx_queues": 1}
        if mtu is not None:
            spec["mtu"] = mtu
            peer["mtu"] = mtu
        nsfd, owned = (None, False)
        if peer_netns is not None:
            nsfd, owned = open_ns_fd(peer_netns)
            peer["net_ns_fd"] = nsfd
        try:
            self._call(context, "link", "add", **spec)
        finally:
            if owned:
                os.close(nsfd)
        link = self.link_get(name)
        if link is None:  # deleted by someone else in between
            raise NetlinkError(context, _errno.ENODEV)
        return link.index

    def link_del(self, name: str) -> bool:
        if not _ifname_ok(name):
            return False
        try:
            self._call(f"deleting link {name}", "link", "del", ifname=name)
        except NetlinkError as exc:
            if exc.errno == _errno.ENODEV:
                return False
            raise
        return True

    def link_set(self, index: int, up=None, mtu=None, netns=None, name=None,
                 group=None) -> None:
        """Set the link up/down, its MTU, its name and/or its group, or move
        it to ``netns``; all given changes go in one RTM_SETLINK.

        ``name`` renames the link (the kernel applies the rename before the
        up/down change of the same request; kernels that refuse to rename a
        link that is up answer EBUSY). ``group`` (1..2**32-1) puts the link
        in that link group (IFLA_GROUP), see ``link_del_group``.

        ``netns`` (a path such as ``/run/netns/NAME`` or an open fd of a
        network namespace) moves the link there with IFLA_NET_NS_FD; a
        path is opened O_RDONLY|O_CLOEXEC and closed again, an fd is left
        open. Errors name the link and the target ("moving link 7 to
        /run/netns/x: ..."); a missing path raises ENOENT before any
        request is sent. ``netns`` together with any other change raises
        EINVAL: the index means another link (or none) after the move, so
        set those with a handle opened in the target namespace. A veth
        peer is better created in its namespace directly (``veth_add(...,
        peer_netns=...)``): moving one afterwards costs far more kernel time.
        """
        if netns is not None:
            if name is not None or group is not None:
                raise NetlinkError(f"moving link {index} to {target_label(netns)}",
                                   _errno.EINVAL,
                                   hint="rename or regroup with a handle opened in the "
                                        "target namespace after the move")
            self._link_move(index, up, mtu, netns)
            return
        context = f"setting link index {index}"
        if not isinstance(index, int) or index <= 0 or index > 0x7FFFFFFF:
            raise NetlinkError(context, _errno.ENODEV)
        if mtu is not None and (not isinstance(mtu, int) or mtu <= 0 or mtu > 0xFFFFFFFF):
            raise NetlinkError(context, _errno.EINVAL)
        spec = {"index": index}
        if up is not None:
            spec["flags"] = IFF_UP if up else 0
            spec["change"] = IFF_UP
        if mtu is not None:
            spec["mtu"] = mtu
        if name is not None:
            context = f"renaming link index {index} to {name}"
            _check_ifname(name, context)
            spec["ifname"] = name
        if group is not None:
            if not _group_ok(group):
                raise NetlinkError(f"setting the group of link index {index} to {group!r}",
                                   _errno.EINVAL)
            spec["IFLA_GROUP"] = group
        self._call(context, "link", "set", **spec)

    def link_del_group(self, group) -> bool:
        """Delete every link of link group ``group`` with one RTM_DELLINK
        (ifi_index 0 + IFLA_GROUP, as ``ip link del group N``): one kernel
        batch, and a veth takes its peer with it. True when links were
        deleted, False when the group was empty; group 0 raises EINVAL."""
        context = f"deleting link group {group!r}"
        if not _group_ok(group):
            raise NetlinkError(context, _errno.EINVAL)
        try:
            self._call(context, "link", "del", index=0, IFLA_GROUP=group)
        except NetlinkError as exc:
            if exc.errno == _errno.ENODEV:
                return False
            raise
        return True

    def _link_move(self, index, up, mtu, netns) -> None:
        context = f"moving link {index} to {target_label(netns)}"
        if not isinstance(index, int) or isinstance(index, bool) \
                or index <= 0 or index > 0x7FFFFFFF:
            raise NetlinkError(context, _errno.ENODEV)
        if up is not None or mtu is not None:
            raise NetlinkError(context, _errno.EINVAL,
                               hint="set up/mtu with a handle opened in the "
                                    "target namespace after the move")
        if isinstance(netns, int) and not isinstance(netns, bool) \
                and netns > 0x7FFFFFFF:
            raise NetlinkError(context, _errno.EBADF)
        try:
            nsfd, owned = open_ns_fd(netns)
        except NetlinkError as exc:
            raise NetlinkError(context, exc.errno) from None
        try:
            self._call(context, "link", "set", index=index, net_ns_fd=nsfd)
        finally:
            if owned:
                os.close(nsfd)

    # -- addresses ----------------------------------------------------------

    def addr_add(self, index: int, address: str, prefixlen: int, scope: int = 0,
                 nodad: bool = False) -> None:
        context = f"adding address {address}/{prefixlen} to link index {index}"
        family, maxlen = _family_of(address, context)
        _check_prefix(prefixlen, maxlen, context)
        spec = {"index": index, "address": address, "prefixlen": prefixlen,
                "family": family, "scope": scope}
        if family == socket.AF_INET:
            spec["local"] = address
        if nodad and family == socket.AF_INET6:
            spec["flags"] = IFA_F_NODAD
        self._call(context, "addr", "add", **spec)

    def addr_list(self, index=None, family: int = 0):
        out = []
        for msg in self._dump("listing addresses", "addr", "dump",
                              family=family):
            if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            if index is not None and msg["index"] != index:
                continue
            out.append(_addr(msg))
        return out

    def addr_del(self, index: int, address: str, prefixlen: int) -> None:
        context = f"deleting address {address}/{prefixlen} from link index {index}"
        family, maxlen = _family_of(address, context)
        _check_prefix(prefixlen, maxlen, context)
        spec = {"index": index, "address": address, "prefixlen": prefixlen,
                "family": family}
        if family == socket.AF_INET:
            spec["local"] = address
        self._call(context, "addr", "del", **spec)

    # -- routes -------------------------------------------------------------

    def route_add(self, dst: str, prefixlen: int, *, oif=None, gateway=None,
                  table: int = RT_TABLE_MAIN, protocol: int = RTPROT_STATIC,
                  scope: int = RT_SCOPE_UNIVERSE, replace: bool = False,
                  route_type: int = RTN_UNICAST, priority=None) -> None:
        verb = "replacing" if replace else "adding"
        context = f"{verb} route {dst}/{prefixlen} to table {table}"
        family, maxlen = _family_of(dst, context)
        _check_prefix(prefixlen, maxlen, context)
        if not isinstance(route_type, int) or not 1 <= route_type <= 11:
            raise NetlinkError(context, _errno.EINVAL)
        spec = {"family": family, "dst_len": prefixlen, "table": table,
                "proto": protocol, "scope": scope, "type": route_type}
        if prefixlen:
            spec["dst"] = dst
        if oif is not None:
            spec["oif"] = oif
        if gateway is not None:
            if _family_of(gateway, context)[0] != family:
                raise NetlinkError(context, _errno.EINVAL)
            spec["gateway"] = gateway
        if priority is not None:
            if not isinstance(priority, int) or not 0 <= priority <= 0xFFFFFFFF:
                raise NetlinkError(context, _errno.EINVAL)
            spec["priority"] = priority
        self._call(context, "route", "replace" if replace else "add", **spec)

    def route_del(self, dst: str, prefixlen: int, *, table: int = RT_TABLE_MAIN,
                  oif=None, protocol=None) -> bool:
        context = f"deleting route {dst}/{prefixlen} from table {table}"
        family, maxlen = _family_of(dst, context)
        _check_prefix(prefixlen, maxlen, context)
        spec = {"family": family, "dst_len": prefixlen, "table": table,
                "scope": RT_SCOPE_NOWHERE, "proto": protocol or 0, "type": 0}
        if prefixlen:
            spec["dst"] = dst
        if oif is not None:
            spec["oif"] = oif
        try:
            self._call(context, "route", "del", **spec)
        except NetlinkError as exc:
            if exc.errno == _errno.ESRCH:
                return False
            raise
        return True

    def route_list(self, family: int = 0, table=None, protocol=None, route_type=None):
        out = []
        for msg in self._dump("listing routes", "route", "dump", family=family):
            if msg["family"] not in (socket.AF_INET, socket.AF_INET6):
                continue
            route = _route(msg)
            if table is not None and route.table != table:
                continue
            if protocol is not None and route.protocol != protocol:
                continue
            if route_type is not None and route.type != route_type:
                continue
            out.append(route)
        return out


def open_netlink(netns=None) -> Netlink:
    """An rtnetlink handle inside ``netns`` (None, a path or an fd)."""
    return Netlink(netns)
