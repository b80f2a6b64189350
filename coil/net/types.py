"""Shared pure-Python pieces of the two rtnetlink backends.

* the rtnetlink constants (route types, tables, scopes, protocols, link
  flags) that both backends and their callers use, named once here;
* the value types ``Link``, ``Addr`` and ``Route`` (defined once here; the
  Cython extension ``coil.net._netlink`` imports them, so both backends
  return exactly the same classes);
* ``ip_version()``: the IP version (4 or 6) of an address given as text or
  as an ``ipaddress`` object, parsed rather than guessed from its spelling.

Pure Python, no imports beyond the standard library: the Cython extension,
the pyroute2 twin and the namespace helpers of ``coil.net.ns`` import it.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import NamedTuple, Optional

__all__ = [
    "Link", "Addr", "Route", "ip_version", "host_prefixlen", "family_of",
    "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST", "RT_SCOPE_NOWHERE",
    "RTPROT_STATIC", "RT_TABLE_MAIN", "CLONE_NEWNET",
    "RTN_UNICAST", "RTN_BLACKHOLE", "RTN_UNREACHABLE",
    "IFF_UP", "IFA_F_NODAD", "NETLINK_ROUTE", "IFNAMSIZ", "GROUP_MAX",
]

# -- constants --------------------------------------------------------------

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_SCOPE_NOWHERE = 255
RTPROT_STATIC = 4
RT_TABLE_MAIN = 254
RTN_UNICAST = 1         # rtm_type of a route (route_add's route_type)
RTN_BLACKHOLE = 6       # drop silently
RTN_UNREACHABLE = 7     # drop, answer ICMP unreachable (host unreachable)
IFF_UP = 0x1            # ifi_flags: administratively up
IFA_F_NODAD = 0x02      # ifa_flags: no duplicate address detection (IPv6)
NETLINK_ROUTE = 0       # the protocol of an AF_NETLINK socket
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
GROUP_MAX = 0xFFFFFFFF


# -- addresses --------------------------------------------------------------

def ip_version(address) -> int:
    """4 or 6 for an address given as text ("10.0.0.1", "fd00::1") or as an
    ``ipaddress`` address; raises ValueError when it is not an address."""
    version = getattr(address, "version", None)
    if version in (4, 6):
        return version
    if isinstance(address, str):
        return _text_version(address)
    return ipaddress.ip_address(address).version


@functools.lru_cache(maxsize=4096)
def _text_version(address) -> int:
    # a node's pod addresses are asked for again and again (ADD, DEL, CHECK)
    return ipaddress.ip_address(address).version


def host_prefixlen(address) -> int:
    """32 for an IPv4 address, 128 for IPv6 (a host route's prefix length)."""
    return 128 if ip_version(address) == 6 else 32


def family_of(address) -> int:
    """socket.AF_INET or socket.AF_INET6 for an address (text or object)."""
    return socket.AF_INET6 if ip_version(address) == 6 else socket.AF_INET


# -- value types ------------------------------------------------------------
# NamedTuples rather than dataclasses: immutable, hashable, comparable and
# several times cheaper to construct, which matters when the Cython backend
# builds hundreds of them per dump.

class Link(NamedTuple):
    index: int
    name: str
    mtu: int
    mac: str            # "aa:bb:cc:dd:ee:ff"; "" when the link has none
    up: bool            # IFF_UP (administratively up)
    kind: Optional[str]  # IFLA_INFO_KIND ("veth", "dummy", ...) or None
    group: int = 0      # IFLA_GROUP (0: the default group)


class Addr(NamedTuple):
    index: int
    address: str
    prefixlen: int
    family: int         # socket.AF_INET / socket.AF_INET6
    scope: int

    @property
    def version(self) -> int:
        """4 or 6 (from the kernel's address family)."""
        return 6 if self.family == socket.AF_INET6 else 4


class Route(NamedTuple):
    family: int
    dst: str            # "0.0.0.0" / "::" for a default route
    prefixlen: int
    oif: Optional[int]
    gateway: Optional[str]
    table: int
    protocol: int
    scope: int
    type: int = 1       # rtm_type: RTN_UNICAST 1, RTN_BLACKHOLE 6, RTN_UNREACHABLE 7

    @property
    def version(self) -> int:
        """4 or 6 (from the kernel's address family)."""
        return 6 if self.family == socket.AF_INET6 else 4
