"""coild's liveness record: ``node-alive/<node>`` under an etcd lease.

coil-controller frees a node's blocks only when the Node object has been
gone for its grace period *and* this record is absent, so a node whose coild
still runs keeps everything, also after ``kubectl delete node``.
"""

from __future__ import annotations

import logging
import threading

from coil.errors import CoilError
from coil.store import liveness
from coil.store.model import now_iso

log = logging.getLogger("coild.liveness")

MIN_TTL = 3.0          # etcd rounds shorter leases up to its own minimum (~2 s)
MAX_TTL = 3600.0


class LivenessKeeper:
    """Holds the node's liveness record: a lease of ``ttl`` seconds renewed
    every ``ttl / 3``; when the lease has expired (etcd unreachable for
    longer than the TTL), a new lease and record are made.

    The lease is deliberately *not* revoked when coild stops: the node's pods
    keep running without coild, so the record lapses only after the TTL.
    """

    def __init__(self, etcd, node: str, ttl: float = 30.0,
                 stop_event: threading.Event | None = None):
        self.etcd = etcd
        self.node = node
        self.ttl = int(round(ttl))
        self.stop_event = stop_event or threading.Event()
        self.lease_id = 0
        self.healthy = False           # the last renewal (or creation) succeeded
        self.errors = 0                # failed renewals since start
        self.recreated = 0             # leases made again after they expired
        self.rewritten = 0             # records written again under our live lease

    def ensure(self):
        """Make a lease and (re)write the record under it. Raises
        StoreUnavailable, Conflict. Safe to repeat."""
        lease = self.etcd.lease_grant(self.ttl)
        liveness.claim(self.etcd, self.node, lease, now_iso())
        self.lease_id = lease
        self.healthy = True
        log.info("liveness record written", extra={"node": self.node, "ttl_s": self.ttl,
                                                   "lease": f"{lease:x}"})

    def renew(self):
        """One round: renew the lease, or make it again when it expired.
        Raises StoreUnavailable, Conflict."""
        if not self.lease_id:
            self.ensure()
            return
        left = self.etcd.lease_keepalive(self.lease_id)
        if left <= 0:
            log.warning("liveness lease had expired; writing the record again",
                        extra={"node": self.node, "lease": f"{self.lease_id:x}"})
            self.lease_id = 0
            self.recreated += 1
            self.ensure()
            self.healthy = True
            return
        # a live lease alone proves nothing: the record may have been
        # written under another lease (a second coild of this node name that
        # started and stopped: its lease lapses) or deleted. Then it would
        # vanish while this coild runs, and coil-controller could free the
        # blocks of a live node: write it again under our lease.
        kv = liveness.read(self.etcd, self.node)
        if kv is None or kv.lease != self.lease_id:
            log.warning("liveness record missing or under another lease; writing it again",
                        extra={"node": self.node, "lease": f"{self.lease_id:x}",
                               "found_lease": f"{kv.lease:x}" if kv is not None else None})
            liveness.claim(self.etcd, self.node, self.lease_id, now_iso())
            self.rewritten += 1
        self.healthy = True

    def run(self):
        """Renew every ``ttl / 3`` until ``stop_event`` is set."""
        while not self.stop_event.wait(self.ttl / 3):
            try:
                self.renew()
            except CoilError as exc:
                self.healthy = False
                self.errors += 1
                log.warning("renewing the liveness record failed; will retry",
                            extra={"node": self.node, "error": exc.one_line(),
                                   "retry_s": round(self.ttl / 3, 2)})
