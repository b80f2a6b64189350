"""Everything coil does with network namespaces and rtnetlink, in one place.

* ``coil.net`` (this module): the backend switch. ``open_netlink(netns=None)``
  returns a handle whose methods are documented in ``coil/net/_netlink_py.py``;
  it is the Cython extension ``coil.net._netlink`` when built, else the
  pyroute2 twin ``coil.net._netlink_py`` (``COIL_PURE_PYTHON=1`` forces the
  twin; ``BACKEND`` says which one runs). Both raise
  ``coil.errors.NetlinkError`` keeping the kernel's errno.
* ``coil.net.types``: the constants (RTN_*, RT_TABLE_MAIN, scopes, IFF_UP,
  ...), the value types ``Link``, ``Addr``, ``Route`` that both backends
  return, and ``ip_version`` (an address's version, parsed, never guessed).
* ``coil.net.ns``: the one namespace entry (``in_netns``), the one
  namespace-file opener (``ns_handle`` / ``open_ns_fd``) and ``setns``.
"""

from coil._backend import load
from coil.net.types import (  # noqa: F401  (re-exported)
    GROUP_MAX, IFF_UP, IFNAMSIZ, RT_SCOPE_HOST, RT_SCOPE_LINK, RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE, RT_TABLE_MAIN, RTN_BLACKHOLE, RTN_UNICAST, RTN_UNREACHABLE,
    RTPROT_STATIC, Addr, Link, Route, family_of, host_prefixlen, ip_version)
from coil.net.ns import in_netns, ns_handle  # noqa: F401  (re-exported)


def __getattr__(name):
    # The backend is imported on first use of open_netlink/BACKEND, so that
    # coil.net.types and coil.net.ns stay cheap to import (pyroute2 is slow
    # to import, and the CNI plugin's path imports neither backend).
    if name in ("open_netlink", "BACKEND"):
        global open_netlink, BACKEND
        mod, backend = load("coil.net._netlink", "coil.net._netlink_py")
        open_netlink, BACKEND = mod.open_netlink, backend
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["open_netlink", "BACKEND", "Link", "Addr", "Route",
           "in_netns", "ns_handle", "ip_version", "host_prefixlen", "family_of",
           "RTN_UNICAST", "RTN_BLACKHOLE", "RTN_UNREACHABLE", "RT_TABLE_MAIN",
           "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST", "RT_SCOPE_NOWHERE",
           "RTPROT_STATIC", "IFF_UP", "IFNAMSIZ", "GROUP_MAX"]
