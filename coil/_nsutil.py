"""Shared pure-Python pieces of the two rtnetlink backends.

* the value types ``Link``, ``Addr`` and ``Route`` (defined once here; the
  Cython extension ``coil._netlink`` imports them, so both backends return
  exactly the same classes);
* the rtnetlink constants both modules re-export;
* ``NS_LOCK`` and ``in_netns()``: run a block of code on the calling thread
  inside another network namespace and always come back, even on error.

Python 3.11 has no ``os.setns``; ``setns(2)`` is called through ctypes here.
``setns`` with ``CLONE_NEWNET`` changes only the calling thread, and
sockets keep the namespace they were created in, which is what
``open_netlink(netns=...)`` relies on.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import threading
from typing import NamedTuple, Optional

from coil.errors import NetlinkError

__all__ = [
    "Link", "Addr", "Route", "NS_LOCK", "in_netns", "open_ns_fd", "ns_label",
    "RT_SCOPE_UNIVERSE", "RT_SCOPE_LINK", "RT_SCOPE_HOST", "RT_SCOPE_NOWHERE",
    "RTPROT_STATIC", "RT_TABLE_MAIN", "CLONE_NEWNET",
    "RTN_UNICAST", "RTN_BLACKHOLE", "RTN_UNREACHABLE",
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
CLONE_NEWNET = 0x40000000
IFNAMSIZ = 16
GROUP_MAX = 0xFFFFFFFF


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


# -- network namespaces -----------------------------------------------------

#: Held while a thread is switched into another network namespace.
#: Shared by both backends.
NS_LOCK = threading.RLock()

_libc = None


def _setns(fd: int, nstype: int = CLONE_NEWNET) -> int:
    """setns(2); returns 0 or the errno."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
        _libc.setns.restype = ctypes.c_int
    if _libc.setns(fd, nstype) != 0:
        return ctypes.get_errno() or _errno.EINVAL
    return 0


def ns_label(netns) -> str:
    """How a netns argument is named in error messages."""
    if isinstance(netns, int):
        return f"fd {netns}"
    return os.fsdecode(netns)


def target_label(netns) -> str:
    """How the target of a link move is named in errors (never raises)."""
    if isinstance(netns, (str, bytes, os.PathLike)) or (
            isinstance(netns, int) and not isinstance(netns, bool)):
        try:
            return ns_label(netns)
        except (TypeError, ValueError):
            pass
    return repr(netns)


def open_ns_fd(netns):
    """Return ``(fd, owned)`` for a netns given as a path or an open fd.

    A path is opened read-only (the caller must close it when ``owned``);
    an int is used as it is. Raises NetlinkError naming the path.
    """
    if isinstance(netns, bool) or netns is None:
        raise NetlinkError(f"opening network namespace {netns!r}", _errno.EINVAL)
    if isinstance(netns, int):
        if netns < 0:
            raise NetlinkError(f"opening network namespace fd {netns}", _errno.EBADF)
        return netns, False
    try:
        return os.open(netns, os.O_RDONLY | os.O_CLOEXEC), True
    except OSError as exc:
        raise NetlinkError(f"opening network namespace {ns_label(netns)}",
                           exc.errno or _errno.EINVAL) from None
    except (TypeError, ValueError):
        raise NetlinkError(f"opening network namespace {netns!r}",
                           _errno.EINVAL) from None


@contextlib.contextmanager
def in_netns(netns):
    """Run the block on the calling thread inside ``netns``.

    ``netns`` is None (stay where we are), a path such as
    ``/run/netns/NAME`` or an open fd of a network namespace. The previous
    namespace of the thread is restored on the way out, also when the block
    raises. ``NS_LOCK`` is held meanwhile.
    """
    if netns is None:
        yield
        return
    target, owned = open_ns_fd(netns)
    try:
        with NS_LOCK:
            try:
                home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise NetlinkError("saving the current network namespace",
                                   exc.errno or _errno.EINVAL) from None
            try:
                err = _setns(target)
                if err:
                    raise NetlinkError(
                        f"entering network namespace {ns_label(netns)}", err)
                try:
                    yield
                finally:
                    err = _setns(home)
                    if err:  # pragma: no cover - cannot happen with a valid fd
                        raise NetlinkError(
                            "returning to the original network namespace", err,
                            hint="this thread is left in another namespace; "
                                 "restart the process")
            finally:
                os.close(home)
    finally:
        if owned:
            os.close(target)
