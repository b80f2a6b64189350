"""The deletion queue: coild deletes pod veths in batches, after DEL answered.

Deleting one veth costs the kernel ~20 ms (RCU grace periods in
``unregister_netdevice``), and deletions are serialised by the kernel's
RTNL lock. One RTM_DELLINK by link group deletes a whole group as one batch
(one ``unregister_netdevice_many()``) for about the price of one. So a DEL:

1. retires the pair synchronously (``PodNetwork.retire``): the host end's
   routes to the pod's addresses are deleted, then both ends are put in the
   *retired* link group (``PodNetwork.retired_group``) under their names and
   the pod's end is set down (the host end too when the pod's end is out of
   reach; otherwise the flush closes the host ends of a batch at once) - no
   rename, which costs the kernel a re-registration of the device's sysctl
   tables under RTNL. Nothing routes the pod's addresses any more and the
   pod's other attachments take its traffic;
2. releases the addresses in etcd (the caller, after 1);
3. answers success, and this queue deletes the group later.

A retired end keeps its name until the flush. An ADD that needs the name
again before that - the same attachment, or the same ifname in a namespace
the runtime kept - gets EEXIST, finds the holder in the retired group and
renames it to ``cdel...`` (it stays in the group), then creates its pair
(``PodNetwork.setup``). A live interface of that name is refused as before.

Flush triggers (one RTM_DELLINK for the whole group each time):
- size: ``batch`` links retired since the last flush;
- delay: ``delay`` seconds after the oldest retired link not yet flushed;
- shutdown: ``close()`` (coild's SIGTERM path) flushes what is left;
- start: ``start()`` flushes what an earlier coild left behind.

A crash (SIGKILL) between a DEL's answer and the flush leaves retired links
in the group, with no route and no etcd record. The next coild deletes the
group before it serves anything (``start``), and ``reconcile`` removes coil
host veths that no address record accounts for.
"""

from __future__ import annotations

import logging
import threading
import time

from coil.coild import TEARDOWN_BATCH, TEARDOWN_DELAY
from coil.coild.podnet import HOST_VETH_RE, PodNetwork, link_set_if_present
from coil.errors import NetlinkError

log = logging.getLogger("coild.teardown")


class TeardownQueue:
    """Deletes retired veth pairs of one node namespace in batches.

    ``delete(netns, ifname, host_name, addresses)`` has the signature and
    promise of ``PodNetwork.delete``: when it returns, nothing routes
    ``addresses`` and ``host_name``/``ifname`` are free; the kernel's
    deletion follows within ``delay`` seconds (or at once when ``batch``
    links are waiting). Thread-safe.
    """

    def __init__(self, podnet: PodNetwork, batch: int = TEARDOWN_BATCH,
                 delay: float = TEARDOWN_DELAY, clock=time.monotonic):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        self.podnet = podnet
        self.batch = batch
        self.delay = delay
        self._clock = clock
        self._cond = threading.Condition()
        self._flush_lock = threading.Lock()
        self._pending = 0              # retired since the last flush began
        self._oldest = None            # clock() when the oldest pending was retired
        self._closed = False
        self._thread = None
        self.retired_total = 0
        self.flushes_total = 0

    @property
    def group(self) -> int:
        """The link group this queue deletes: the one ``podnet`` retires
        into (and whose names its ADD takes back)."""
        return self.podnet.retired_group

    # -- the DEL path ---------------------------------------------------------
    def delete(self, netns_path, ifname: str, host_name: str, addresses: list[str]) -> bool:
        """Retire the container's pair now, delete it with the next batch.
        True if something was removed or retired. Raises NetlinkError."""
        outcome = self.podnet.retire(netns_path, ifname, host_name, addresses)
        if outcome == "retired":
            with self._cond:
                self.retired_total += 1
                self._pending += 1
                if self._oldest is None:
                    self._oldest = self._clock()
                # wake the flusher only when its deadline changes or a batch is full
                if self._pending == 1 or self._pending == self.batch:
                    self._cond.notify_all()
        return bool(outcome)

    def pending(self) -> int:
        """Links retired since the last flush began."""
        with self._cond:
            return self._pending

    def wait_flushed(self, flushes: int, timeout: float) -> bool:
        """Wait until ``flushes_total >= flushes``; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.flushes_total >= flushes, timeout)

    # -- flushing -------------------------------------------------------------
    def flush(self) -> bool:
        """Delete every retired link now, in one request. True if the kernel
        deleted any. Raises NetlinkError."""
        with self._flush_lock:
            with self._cond:
                self._pending = 0
                self._oldest = None
            try:
                with self.podnet._host_nl() as h:
                    return h.link_del_group(self.group)
            finally:
                with self._cond:
                    self.flushes_total += 1
                    self._cond.notify_all()

    def _due(self):
        """Seconds until the next flush is due (<= 0: now); None: nothing pending."""
        if self._pending == 0:
            return None
        if self._pending >= self.batch:
            return 0.0
        return self._oldest + self.delay - self._clock()

    def _run(self):
        while True:
            with self._cond:
                while not self._closed:
                    due = self._due()
                    if due is not None and due <= 0:
                        break
                    self._cond.wait(due)
                if self._closed:
                    return
            try:
                self.flush()
            except NetlinkError as exc:
                log.warning("deleting retired veths failed, retrying in 1 s",
                            extra={"error": exc.one_line()})
                with self._cond:
                    self._pending = max(self._pending, 1)
                    self._oldest = self._oldest if self._oldest is not None else self._clock()
                    self._cond.wait_for(lambda: self._closed, 1.0)

    def start(self):
        """Delete what an earlier coild left retired, then flush in the
        background. Raises NetlinkError (coild does not start)."""
        if self.flush():
            log.info("deleted veths retired before this start")
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="teardown", daemon=True)
                self._thread.start()

    def close(self):
        """Stop the background flusher and delete what is still retired.
        Safe to repeat."""
        with self._cond:
            self._closed = True
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        try:
            self.flush()
        except NetlinkError as exc:
            log.warning("deleting retired veths at shutdown failed; the next start will",
                        extra={"error": exc.one_line()})

    # -- start-up reconcile ---------------------------------------------------
    def reconcile(self, keep: set[str]) -> list[str]:
        """Remove coil host veths (``veth`` + 11 hex digits, kind veth,
        holding 169.254.1.1/32 or fe80::1) that no address record accounts
        for: their name is not in ``keep`` (the host-veth names of the
        node's records). A pod whose namespace is gone has no veth left
        (the kernel deletes a veth pair with either end's namespace). The
        strays are retired and deleted with one request. Returns their
        names. Raises NetlinkError."""
        with self.podnet._host_nl() as h:
            gateways = {a.index for a in h.addr_list()
                        if (a.address, a.prefixlen) in (("169.254.1.1", 32), ("fe80::1", 64))}
            strays = [link for link in h.link_list()
                      if link.kind == "veth" and HOST_VETH_RE.fullmatch(link.name)
                      and link.index in gateways and link.name not in keep
                      and link.group != self.group]
            for link in strays:
                link_set_if_present(h, link.index, group=self.group)   # else gone meanwhile
        if strays:
            self.flush()
            log.info("removed veths of addresses no longer held",
                     extra={"veths": sorted(link.name for link in strays)})
        return [link.name for link in strays]
