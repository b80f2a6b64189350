"""The leak scan: addresses held in etcd versus the addresses of Pods.

It is a join over two sets, linear in the number of addresses and Pods:

- **leaked**: an address held in etcd that no Pod has (``status.podIPs``)
  and that was assigned longer ago than the expiration, unless the Pod the
  record names exists and has no address yet (Pending, IP not posted).
  A secondary CNI attachment's address (ifname other than eth0, e.g.
  Multus's net1) is in no ``status.podIPs``: it is judged by its Pod
  instead, and never leaked while the Pod the record names exists.
  Reported; freed only when asked (``--release-leaked``) and only after two
  scans at least ``min_gap`` apart both found the very same record (same
  mod revision) leaked, each with a transaction guarded by that revision,
  so a record that changed meanwhile is kept. Records the release never
  touches ("exempt"): made through coild's REST API (unless the record says
  ``release_if_leaked``), of unknown origin (written by an older coild), or
  with an unreadable ``created_at``.
- **unknown**: an address of a running or pending Pod, inside one of coil's
  pools, that etcd does not hold. Reported as an error (it may be handed
  out twice).

Pods with ``hostNetwork`` are ignored (their address is the node's). Pods
that finished (Succeeded/Failed) still count as holding their address while
the Pod object exists, so nothing they might use is freed; they are not
checked for "unknown" (their address was legitimately freed when the
runtime tore down their sandbox).

A failed or partial Pod list aborts the scan: it never counts as "no Pods".
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import time
from dataclasses import dataclass, field

from coil.controller.watcher import collect_pages, iter_pages
from coil.store.model import ORIGIN_CNI

log = logging.getLogger("coil-controller.scan")

_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"     # coil's own created_at format (27 characters)
TERMINATED = ("Succeeded", "Failed")
#: the interface of a Pod's cluster network (the runtime's CNI_IFNAME); the
#: addresses of other attachments (Multus) are not in ``status.podIPs``
PRIMARY_IFNAME = "eth0"
MAX_DETAIL_LOGS = 200               # per kind and scan; the counts are always logged


def iso_cutoff(now: float, expiration: float) -> str:
    return datetime.datetime.fromtimestamp(now - expiration, datetime.timezone.utc).strftime(_ISO)


def parse_time(text: str) -> float | None:
    """Seconds since the epoch of an RFC 3339 time, or None."""
    if not text or not isinstance(text, str):
        return None
    try:
        dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00")
                                             if text.endswith(("Z", "z")) else text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.timestamp()


@dataclass(frozen=True)
class PodAddress:
    namespace: str
    name: str
    ip: str
    node: str = ""


@dataclass
class PodIPs:
    """What the Pod list tells the join."""
    held: set = field(default_factory=set)          # every IP a Pod object reports
    active: list = field(default_factory=list)      # PodAddress of running/pending Pods
    pods: int = 0
    names: set = field(default_factory=set)         # (namespace, name) of every Pod
    waiting: set = field(default_factory=set)       # (namespace, name) of Pods without an IP yet


def pod_ips_from_items(items, into: PodIPs | None = None) -> PodIPs:
    """Collect Pod addresses from raw Pod dicts (as the API returns them)."""
    out = into or PodIPs()
    for pod in items:
        out.pods += 1
        meta = pod.get("metadata") or {}
        out.names.add((meta.get("namespace", ""), meta.get("name", "")))
        spec = pod.get("spec") or {}
        if spec.get("hostNetwork"):
            continue
        status = pod.get("status") or {}
        ips = [e.get("ip") for e in (status.get("podIPs") or []) if isinstance(e, dict)]
        if not ips and status.get("podIP"):
            ips = [status["podIP"]]
        if not ips:
            if status.get("phase") not in TERMINATED:
                out.waiting.add((meta.get("namespace", ""), meta.get("name", "")))
            continue
        active = status.get("phase") not in TERMINATED
        for raw in ips:
            try:
                ip = str(ipaddress.ip_address(str(raw)))
            except ValueError:
                log.warning("pod reports an invalid IP", extra={
                    "namespace": meta.get("namespace"), "pod": meta.get("name"), "ip": raw})
                continue
            out.held.add(ip)
            if active:
                out.active.append(PodAddress(meta.get("namespace", ""), meta.get("name", ""), ip,
                                             spec.get("nodeName", "") or ""))
    return out


def list_pod_ips(core, page_size: int = 500) -> PodIPs:
    """Every Pod in the cluster, paginated. Raises on any API failure."""
    out = PodIPs()
    collect_pages(iter_pages(core.list_pod_for_all_namespaces, page_size),
                  lambda items: pod_ips_from_items(items, out))
    return out


@dataclass(frozen=True)
class Leak:
    address: object          # store Address
    age: float | None        # seconds; None when created_at is missing or malformed


def find_leaks(addresses, held_ips, now: float, expiration: float,
               waiting_pods=frozenset(), live_pods=frozenset()) -> list[Leak]:
    """Addresses not in ``held_ips`` and assigned more than ``expiration``
    seconds before ``now``, except those whose record names a Pod in
    ``waiting_pods`` ((namespace, name) of Pods without an IP yet), and
    those of a secondary CNI attachment (an ifname other than eth0:
    Multus's net1, whose address is in no ``status.podIPs``) whose record
    names a Pod in ``live_pods`` ((namespace, name) of every Pod). One
    pass, one set lookup per address."""
    cutoff = iso_cutoff(now, expiration)
    cutoff_ts = now - expiration
    leaks = []
    for a in addresses:
        if a.address in held_ips:
            continue
        if waiting_pods and (a.namespace, a.pod) in waiting_pods:
            continue
        if live_pods and a.origin == ORIGIN_CNI and a.ifname != PRIMARY_IFNAME and \
                (a.namespace, a.pod) in live_pods:
            continue
        c = a.created_at
        if len(c) == 27 and c[26] == "Z" and c[10] == "T":
            # coil's own fixed-width UTC format: compare as strings (fast path)
            if c < cutoff:
                ts = parse_time(c)
                leaks.append(Leak(a, now - ts if ts is not None else None))
            continue
        ts = parse_time(c)
        if ts is None:
            leaks.append(Leak(a, None))
        elif ts < cutoff_ts:
            leaks.append(Leak(a, now - ts))
    return leaks


def find_unknown(active, etcd_ips, networks) -> list[PodAddress]:
    """Active Pod addresses inside coil's pools that etcd does not hold."""
    out = []
    by_version = {4: [n for n in networks if n.version == 4],
                  6: [n for n in networks if n.version == 6]}
    for pa in active:
        if pa.ip in etcd_ips:
            continue
        ip = ipaddress.ip_address(pa.ip)
        if any(ip in n for n in by_version[ip.version]):
            out.append(pa)
    return out


@dataclass
class ScanResult:
    addresses: int
    pods: int
    leaks: list
    unknown: list
    released: int
    seconds: float
    in_use_by_pool: dict
    suspects: int = 0        # leaks seen by this scan only, waiting for the second look
    exempt: int = 0          # leaks the release never touches


def releasable(a) -> bool:
    """May the leak release free this record at all? CNI records yes; REST
    records only when their owner opted in; records of unknown origin never."""
    from coil.store.model import ORIGIN_CNI, ORIGIN_REST
    return a.origin == ORIGIN_CNI or (a.origin == ORIGIN_REST and a.release_if_leaked)


class LeakScanner:
    """One ``scan()`` = read etcd, list Pods, join, report (and free).

    Keeps the leaks of the previous scans (``suspects``): a leak is freed
    only when an earlier scan, at least ``min_gap`` seconds (of ``clock``)
    before, found the same record leaked."""

    def __init__(self, store, core, *, expiration: float = 86400.0, release: bool = False,
                 metrics=None, clock=time.time, page_size: int = 500, min_gap: float = 600.0):
        self.store = store
        self.core = core
        self.expiration = expiration
        self.release = release
        self.metrics = metrics
        self.clock = clock
        self.page_size = page_size
        self.min_gap = min_gap
        # (block, offset) -> (record mod revision, clock time of the first look)
        self.suspects: dict[tuple[str, int], tuple[int, float]] = {}

    def scan(self) -> ScanResult:
        t0 = time.monotonic()
        # etcd first, then Pods: an address assigned after this read is not
        # looked at, and a Pod that got an address before it is in the list.
        pools = self.store.list_pools()
        blocks = self.store.all_blocks()
        addresses, _rev = self.store.all_addresses_paged()
        pool_of_block = {b.cidr: b.pool for b in blocks}
        in_use: dict[str, int] = {}
        for a in addresses:
            pool = pool_of_block.get(a.block, "")
            in_use[pool] = in_use.get(pool, 0) + 1
        if self.metrics is not None:
            # capacity needs etcd only: kept fresh even when the Pod list fails
            self.metrics.set_capacity(pools, blocks, in_use)
        pods = list_pod_ips(self.core, self.page_size)      # raises: scan aborted
        now = self.clock()
        leaks = find_leaks(addresses, pods.held, now, self.expiration, pods.waiting, pods.names)
        etcd_ips = {a.address for a in addresses}
        networks = [n for p in pools for n in p.subnets]
        unknown = find_unknown(pods.active, etcd_ips, networks)
        if unknown:
            # a Pod may have got its address after our etcd read: look again
            unknown = self._still_unknown(unknown)
        due, exempt = self._second_looks(leaks, now)
        released = self._release(due) if self.release else 0
        seconds = time.monotonic() - t0
        result = ScanResult(len(addresses), pods.pods, leaks, unknown, released, seconds, in_use,
                            len(leaks) - len(due) - exempt, exempt)
        self._report(result, blocks)
        return result

    def _still_unknown(self, candidates, recheck_limit: int = 200):
        from coil.errors import NotFound
        if len(candidates) > recheck_limit:
            fresh, _ = self.store.all_addresses_paged()
            fresh_ips = {a.address for a in fresh}
            return [u for u in candidates if u.ip not in fresh_ips]
        out = []
        for u in candidates:
            try:
                self.store.address_info(u.ip)
            except NotFound:
                out.append(u)
        return out

    def _second_looks(self, leaks, now: float) -> tuple[list, int]:
        """Remember this scan's leaks; return (the leaks an earlier scan, at
        least ``min_gap`` before, saw with the same revision; the number of
        exempt leaks)."""
        seen: dict[tuple[str, int], tuple[int, float]] = {}
        due, exempt = [], 0
        for leak in leaks:
            a = leak.address
            if leak.age is None or not releasable(a):
                exempt += 1
                continue
            key = (a.block, a.offset)
            prev = self.suspects.get(key)
            if prev is not None and prev[0] == a.revision:
                seen[key] = prev
                if now - prev[1] >= self.min_gap:
                    due.append(leak)
            else:
                seen[key] = (a.revision, now)
        self.suspects = seen
        return due, exempt

    def _release(self, leaks) -> int:
        released = 0
        for leak in leaks:
            a = leak.address
            if leak.age is None:
                continue            # unknown age: reported, never freed automatically
            if self.store.release_address(a.block, a.offset, a.revision):
                released += 1
                self.suspects.pop((a.block, a.offset), None)
                log.warning("released leaked address", extra={
                    "address": a.address, "namespace": a.namespace, "pod": a.pod,
                    "container_id": a.container_id, "created_at": a.created_at})
            else:
                log.info("leaked address changed meanwhile; kept", extra={"address": a.address})
        return released

    def _report(self, r: ScanResult, blocks):
        for leak in r.leaks[:MAX_DETAIL_LOGS]:
            a = leak.address
            log.warning("leaked address: held in etcd but used by no Pod", extra={
                "address": a.address, "block": a.block, "namespace": a.namespace,
                "pod": a.pod, "container_id": a.container_id, "created_at": a.created_at,
                "origin": a.origin or "unknown", "age_s": round(leak.age) if leak.age is not None else None})
        for u in r.unknown[:MAX_DETAIL_LOGS]:
            log.error("pod address unknown to etcd", extra={
                "address": u.ip, "namespace": u.namespace, "pod": u.name, "node": u.node})
        log.info("leak scan done", extra={
            "addresses": r.addresses, "pods": r.pods, "leaked": len(r.leaks),
            "unknown": len(r.unknown), "released": r.released, "suspects": r.suspects,
            "exempt": r.exempt,
            "seconds": round(r.seconds, 3), "release_leaked": self.release})
        m = self.metrics
        if m is not None:
            m.scan_seconds.observe(r.seconds)
            m.scans.labels("ok").inc()
            m.last_scan.set(time.time())
            m.leaked.set(len(r.leaks))
            m.leaks_found.inc(len(r.leaks))
            m.leaks_released.inc(r.released)
            m.unknown.set(len(r.unknown))
            m.leaks_suspected.set(r.suspects)
            m.leaks_exempt.set(r.exempt)
            m.set_blocks(blocks)
            m.set_addresses(r.in_use_by_pool)
