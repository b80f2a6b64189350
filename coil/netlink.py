"""rtnetlink for coild: the Cython extension, or the pyroute2 fallback.

Both backends expose ``open_netlink(netns=None)`` returning an object with
the methods documented in ``coil/_netlink_py.py`` and raise
``coil.errors.NetlinkError`` (keeping the errno) on failure.
"""

from coil._backend import load

_mod, BACKEND = load("coil._netlink", "coil._netlink_py")
open_netlink = _mod.open_netlink
Link = _mod.Link
Addr = _mod.Addr
Route = _mod.Route
from coil._nsutil import RTN_BLACKHOLE, RTN_UNICAST, RTN_UNREACHABLE  # noqa: E402

__all__ = ["open_netlink", "Link", "Addr", "Route", "BACKEND",
           "RTN_UNICAST", "RTN_BLACKHOLE", "RTN_UNREACHABLE"]
