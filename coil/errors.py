"""The one exception root of coil and its typed children.

Pure Python on purpose: the Cython extensions and their pure-Python twins
import these classes, so both backends raise exactly the same types.
Errors are translated only at the edges: CNI error codes in the plugin
service, HTTP status codes in the REST layer, and exit codes in one place,
the role boundary of ``coil/hypercoil.py`` (``exit_code`` below).
"""

from __future__ import annotations


class CoilError(Exception):
    """Root of every error coil raises on purpose.

    ``hint`` tells the user what to do about it (may be empty).
    """

    hint = ""
    #: the process exit code when this error ends a role (coil/hypercoil.py)
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__

    def one_line(self) -> str:
        """The message and the hint on one line, for stderr and logs."""
        text = self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split())


class InvalidArgument(CoilError):
    """A value given by the user or a caller is malformed or out of range."""


class UsageError(InvalidArgument):
    """The command line itself is wrong (unknown option, missing argument)."""

    exit_code = 2


class NotFound(CoilError):
    """A named pool, subnet, node, block or address does not exist."""


class AlreadyExists(CoilError):
    """Something that must be unique exists already."""


class Conflict(CoilError):
    """A guarded write lost a race more often than the retry bound allows,
    or the state changed under the caller."""


class BlockLost(Conflict):
    """The block is no longer held by the caller (freed or re-acquired)."""


class PoolExhausted(CoilError):
    """No free address or block is left in a pool."""

    def __init__(self, pool: str, message: str | None = None):
        super().__init__(message or f"address pool {pool!r} is exhausted",
                         hint="add a subnet with 'coilctl pool add-subnet'")
        self.pool = pool


class V1StoreDetected(CoilError):
    """The etcd prefix holds a Coil v1 store: nothing but ``coilctl migrate v1``
    may read or write it."""


class StoreUnavailable(CoilError):
    """etcd cannot be reached or refused the request."""


class OutcomeUnknown(StoreUnavailable):
    """A transaction was sent but its outcome is not known (a timeout or a
    leader change after the request left): etcd may or may not have
    committed it. The caller must read the keys back before deciding;
    never treat it as failed or retry it blindly."""


class StoreAuthError(StoreUnavailable):
    """etcd rejected the credentials or the TLS material."""


class BitmapError(CoilError):
    """Misuse of an address bitmap (index out of range, bad serialisation)."""


class NetlinkError(CoilError):
    """A netlink request failed; keeps the kernel's errno.

    The message carries the context, e.g.
    ``adding route 10.0.0.5/32 to table 119: File exists``.
    """

    def __init__(self, context: str, errno: int = 0, *, hint: str | None = None):
        import os
        reason = os.strerror(errno) if errno else "failed"
        super().__init__(f"{context}: {reason}", hint=hint)
        self.errno = errno
        self.context = context


class KubernetesError(CoilError):
    """The Kubernetes API server could not be reached or refused a request."""


class PodNetError(CoilError):
    """The pod's network is missing or differs from what it should be."""


class SmokeTestFailed(CoilError):
    """``coilctl smoke`` ran, and the pod network failed it: a ping between
    the two nodes failed, a pod got no address in time, or an address is
    outside every coil pool. Exit code 3, like ``ipam check``'s problems."""

    exit_code = 3


class ProblemsFound(CoilError):
    """``coilctl ipam check`` ran, and its report lists problems (leaked or
    duplicate addresses, blocks of missing nodes, ...). Exit code 3, like
    ``smoke``'s failed test."""

    exit_code = 3


class Interrupted(CoilError):
    """Ctrl-C or SIGTERM ended a command after it cleaned up; exit 130 as
    for any interrupted role."""

    exit_code = 130
