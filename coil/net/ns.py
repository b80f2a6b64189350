"""Network namespaces: the one place coil enters one or opens its file.

* ``open_ns_fd(netns)``: a namespace given as a path (``/run/netns/NAME``,
  ``/proc/PID/ns/net``) or an open fd -> ``(fd, owned)``; ``ns_handle``
  is the same as a context manager that closes what it opened;
* ``setns(fd)``: setns(2) with CLONE_NEWNET on the calling thread, through
  ctypes (Python 3.11 has no ``os.setns``); returns 0 or the errno;
* ``NS_LOCK`` and ``in_netns(netns)``: run a block of code on the calling
  thread inside another network namespace and always come back, even on
  error; ``enter_netns(netns)`` moves a thread for good.

``setns`` with ``CLONE_NEWNET`` changes only the calling thread, and
sockets keep the namespace they were created in, which is what
``open_netlink(netns=...)`` relies on. The Cython backend calls setns(2)
directly (no GIL round trip) but holds the same ``NS_LOCK`` and opens the
namespace with ``open_ns_fd``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
import threading

from coil.errors import NetlinkError
from coil.net.types import CLONE_NEWNET

__all__ = ["NS_LOCK", "in_netns", "enter_netns", "ns_handle", "open_ns_fd", "setns", "ns_label",
           "target_label", "THREAD_NETNS"]

#: The calling thread's own network namespace (what in_netns comes back to).
THREAD_NETNS = "/proc/thread-self/ns/net"

# -- network namespaces -----------------------------------------------------

#: Held while a thread is switched into another network namespace.
#: Shared by both backends.
NS_LOCK = threading.RLock()

_libc = None


def setns(fd: int, nstype: int = CLONE_NEWNET) -> int:
    """setns(2) on the calling thread; returns 0 or the errno (never raises).

    Prefer ``in_netns``, which also comes back; a bare ``setns`` is for a
    thread that moves for good (``coil.sandbox.kube.NetnsThread``).
    """
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
def ns_handle(netns, *, missing_ok: bool = False):
    """``open_ns_fd`` as a context manager: yields the fd and closes it on
    the way out when it was opened here (a path); an fd given is left open.
    Raises NetlinkError naming the namespace (ENOENT: it does not exist);
    with ``missing_ok`` a namespace that cannot be opened (deleted
    meanwhile) yields None instead, errors of the block still propagate."""
    try:
        fd, owned = open_ns_fd(netns)
    except NetlinkError:
        if not missing_ok:
            raise
        yield None
        return
    try:
        yield fd
    finally:
        if owned:
            os.close(fd)


def enter_netns(netns) -> None:
    """Move the calling thread into ``netns`` (a path or an fd) for good.

    For a worker thread that lives in another namespace (the sandbox's
    apiserver client); code that must come back uses ``in_netns``. Raises
    NetlinkError naming the namespace (ENOENT: it does not exist; EPERM:
    no CAP_SYS_ADMIN). Safe to repeat.
    """
    with ns_handle(netns) as fd:
        err = setns(fd)
    if err:
        raise NetlinkError(f"entering network namespace {ns_label(netns)}", err)


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
    with ns_handle(netns) as target, NS_LOCK, ns_handle(THREAD_NETNS) as home:
        err = setns(target)
        if err:
            raise NetlinkError(f"entering network namespace {ns_label(netns)}", err)
        try:
            yield
        finally:
            err = setns(home)
            if err:  # pragma: no cover - cannot happen with a valid fd
                raise NetlinkError(
                    "returning to the original network namespace", err,
                    hint="this thread is left in another namespace; restart the process")
