"""The CNI plugin's work, done inside the warm coild (coild mounts it on
its plugin socket, coil/coild/server.py).

The ``coil`` executable (native launcher, or its pure-Python twin) relays
the environment and stdin over coild's UNIX socket (coil/cni/protocol.py);
this module validates them, runs ADD/DEL/CHECK/GC/STATUS and returns (exit code, stdout bytes).
Errors become CNI error objects here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time

from coil import logutil
from coil.cni import protocol, spec
from coil.cni.spec import CNIError
from coil.coild.podnet import (PodNetError, gateway_for, host_veth_name, host_veth_names,
                               legacy_host_veth_name)
from coil.coild.serial import KeyedLocks
from coil.errors import (AlreadyExists, CoilError, Conflict, InvalidArgument, NetlinkError,
                         NotFound, PoolExhausted, StoreUnavailable)
from coil.store.model import ORIGIN_CNI, now_iso

log = logging.getLogger("coild.cni")

# Each request must be answered within this many seconds of its arrival.
# The runtime (kubelet/containerd) gives a CNI call 120 s; the plugin waits
# at most CONNECT_TIMEOUT to connect plus RELAY_TIMEOUT for the answer
# (coil/cni/protocol.py), so coild gives up first and rolls back. docs/cni.md
REQUEST_TIMEOUT = 100.0


class CNIRequest:
    __slots__ = ("env", "stdin", "netconf", "command", "container_id", "netns", "ifname",
                 "args", "version", "deadline")

    def __init__(self, env: dict, stdin: bytes):
        self.env = env
        self.stdin = stdin
        self.netconf = {}
        self.command = env.get("CNI_COMMAND", "")
        self.container_id = env.get("CNI_CONTAINERID", "")
        self.netns = env.get("CNI_NETNS", "")
        self.ifname = env.get("CNI_IFNAME", "")
        self.args = {}
        self.version = protocol.DEFAULT_CNI_VERSION
        self.deadline = float("inf")


def decode_frame(data: bytes) -> CNIRequest:
    """Split a relayed request into environment and stdin. Raises CNIError."""
    try:
        env, stdin = protocol.decode_request(data)
    except protocol.FrameError as exc:
        details = ("the plugin and coild versions do not match"
                   if not data.startswith(protocol.MAGIC) else str(exc))
        raise CNIError(spec.ERR_DECODE, "malformed request from the coil plugin",
                       details) from None
    return CNIRequest(env, stdin)


# the spec's container ID: alphanumeric first, then alphanumerics, '_', '.', '-'
# (CNI SPEC.md "Parameters", libcni's ValidateContainerID)
_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")


def invalid_ifname(name: str) -> str:
    """Why ``name`` cannot be a Linux interface name ('' when it can):
    1..15 bytes, not '.' or '..', no '/', ':' or whitespace."""
    if not name:
        return "is empty"
    if len(name.encode("utf-8", "surrogatepass")) > 15:
        return "is longer than 15 bytes"
    if name in (".", ".."):
        return "is '.' or '..'"
    if any(c in "/:" or c.isspace() for c in name):
        return "contains '/', ':' or whitespace"
    return ""


def parse_cni_args(text: str) -> dict:
    """``K=V;K2=V2`` -> dict. Raises CNIError (code 4) on a malformed pair."""
    out = {}
    for part in filter(None, text.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(spec.ERR_INVALID_ENV, f"invalid CNI_ARGS pair {part!r}",
                           "expected K=V pairs separated by ';'")
        out[key] = value
    return out


class CNIService:
    """ADD/DEL/CHECK/GC/STATUS on top of the allocator and the pod network.

    The requests of one container run one at a time (``containers``), those
    of different containers in parallel. Each request has a deadline of
    ``request_timeout`` seconds from its arrival (``clock``, monotonic); an
    ADD past it is rolled back and answered with an error. ``drain()``
    waits for the requests in flight.
    """

    request_timeout = REQUEST_TIMEOUT

    def __init__(self, allocator, podnet, pools, metrics=None, teardown=None):
        self.allocator = allocator
        self.podnet = podnet
        self.pools = pools
        self.metrics = metrics
        # DEL's remover: the deletion queue (coil.coild.teardown) retires the
        # pair now and deletes it in a batch later; without one, podnet
        # deletes it at once. Either way nothing routes the addresses when
        # delete() returns, so they are released after it.
        self.teardown = teardown if teardown is not None else podnet
        self.clock = time.monotonic
        self.containers = KeyedLocks()
        # STATUS asks it whether coild serves (raises CoilError when not);
        # coild sets it to its readiness check
        self.ready = None
        self._inflight = 0
        self._idle = threading.Condition()

    def _reached(self, point: str, req: CNIRequest):
        """A no-op pause point; tests monkeypatch it to stop a request here."""

    def drain(self, timeout: float) -> bool:
        """Wait until no request is in flight (at most ``timeout`` seconds).
        True when none is left."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def inflight(self) -> int:
        with self._idle:
            return self._inflight

    # -- entry ----------------------------------------------------------------
    def handle(self, data: bytes, arrived: float | None = None) -> tuple[int, bytes]:
        """Run one relayed request; ``arrived`` is ``clock()`` when its
        connection was accepted (default: now). Returns (exit code, stdout)."""
        with self._idle:
            self._inflight += 1
        try:
            return self._handle(data, self.clock() if arrived is None else arrived)
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def _handle(self, data: bytes, arrived: float) -> tuple[int, bytes]:
        started = time.perf_counter()
        req = None
        try:
            req = decode_frame(data)
            req.deadline = arrived + self.request_timeout
            self._validate(req)
            handler = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                       "GC": self.gc, "STATUS": self.status, "VERSION": self.version_cmd}[req.command]
            if req.command in ("ADD", "DEL", "CHECK"):
                out = self._serialised(handler, req)
            else:
                out = handler(req)
            code, body = 0, (json.dumps(out).encode() if out is not None else b"")
        except CNIError as exc:
            code, body = 1, json.dumps(exc.to_json(req.version if req else protocol.DEFAULT_CNI_VERSION)).encode()
            log.warning("cni request failed", extra={
                "command": req.command if req else "?", "container": req.container_id if req else "",
                "code": exc.code, "error": exc.msg})
        except Exception as exc:  # a bug: still answer with an error object
            log.exception("cni request crashed")
            err = CNIError(spec.ERR_INTERNAL, f"internal error in coild: {exc}")
            code, body = 1, json.dumps(err.to_json(req.version if req else protocol.DEFAULT_CNI_VERSION)).encode()
        if self.metrics is not None and req is not None:
            self.metrics.observe_cni(req.command, code, time.perf_counter() - started)
        if req is not None and code == 0 and req.command in ("ADD", "DEL"):
            log.info("cni %s", req.command.lower(), extra={
                "container": req.container_id, "pod": req.args.get("K8S_POD_NAME", ""),
                "namespace": req.args.get("K8S_POD_NAMESPACE", ""),
                "ms": round((time.perf_counter() - started) * 1000, 2),
                logutil.DEFER: True})      # written by the log writer, in a batch
        return code, body

    def _serialised(self, handler, req: CNIRequest):
        """Run ``handler`` alone for the request's container ID."""
        self._reached("lock:wait", req)
        try:
            with self.containers.hold(req.container_id,
                                      timeout=req.deadline - self.clock()):
                self._reached("lock:held", req)
                return handler(req)
        except TimeoutError:
            raise CNIError(spec.ERR_TRY_AGAIN,
                           f"another request for container {req.container_id} is still "
                           f"running after {self.request_timeout:g} s") from None

    def _check_deadline(self, req: CNIRequest):
        if self.clock() > req.deadline:
            raise CNIError(spec.ERR_TRY_AGAIN,
                           f"{req.command} of container {req.container_id} did not finish "
                           f"within coild's {self.request_timeout:g} s deadline; rolled back",
                           "etcd or the node may be overloaded; the runtime retries")

    def _validate(self, req: CNIRequest):
        if not req.command:
            raise CNIError(spec.ERR_INVALID_ENV, "CNI_COMMAND is not set")
        try:
            conf = json.loads(req.stdin) if req.stdin.strip() else None
        except (ValueError, RecursionError) as exc:
            # the plugin relays stdin unchecked: this is the answer to a
            # document that is not JSON, in the cniVersion it seems to name
            version = protocol.scan_netconf(req.stdin)[1]
            if version:
                req.version = version.decode("utf-8", "replace")
            why = "nested too deeply" if isinstance(exc, RecursionError) else exc
            raise CNIError(spec.ERR_DECODE,
                           f"network configuration on stdin is not valid JSON: {why}") from None
        if req.command == "VERSION" and conf is None:
            return
        if not isinstance(conf, dict):
            raise CNIError(spec.ERR_DECODE, "network configuration on stdin must be a JSON object")
        req.netconf = conf
        version = conf.get("cniVersion")
        if version is None or version == "":
            version = "0.1.0"           # as skel: no cniVersion is the first spec's
        if not isinstance(version, str):
            raise CNIError(spec.ERR_INVALID_NETCONF, f"cniVersion must be a string, "
                                                     f"not {version!r:.40}")
        req.version = version
        if version not in spec.SUPPORTED_VERSIONS:
            raise CNIError(spec.ERR_INCOMPATIBLE_VERSION,
                           f"cniVersion {version!r} is not supported",
                           f"supported: {', '.join(spec.SUPPORTED_VERSIONS)}")
        if req.command not in ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"):
            raise CNIError(spec.ERR_INVALID_ENV, f"unknown CNI_COMMAND {req.command!r}")
        if req.command in ("CHECK",) and spec.version_tuple(version) < (0, 4, 0):
            raise CNIError(spec.ERR_INCOMPATIBLE_VERSION,
                           f"CHECK is not defined for cniVersion {version}")
        if req.command in ("GC", "STATUS") and spec.version_tuple(version) < (1, 1, 0):
            raise CNIError(spec.ERR_INCOMPATIBLE_VERSION,
                           f"{req.command} needs cniVersion 1.1.0 or later")
        if req.command == "DEL":
            self._validate_del(req)
            return
        self._validate_netconf(conf)
        self._validate_env(req)

    @staticmethod
    def _validate_netconf(conf: dict):
        for key, kind in (("name", str), ("type", str)):
            if not isinstance(conf.get(key), kind) or not conf.get(key):
                raise CNIError(spec.ERR_INVALID_NETCONF, f"network configuration lacks {key!r}")
        for key in ("ipv4", "ipv6"):
            if key in conf and not isinstance(conf[key], bool):
                raise CNIError(spec.ERR_INVALID_NETCONF, f"network configuration key {key!r} "
                                                         f"must be true or false")
        if not conf.get("ipv4", True) and not conf.get("ipv6", False):
            raise CNIError(spec.ERR_INVALID_NETCONF, "both ipv4 and ipv6 are disabled")
        if "mtu" in conf and (not isinstance(conf["mtu"], int) or not 576 <= conf["mtu"] <= 65535):
            raise CNIError(spec.ERR_INVALID_NETCONF, f"invalid mtu {conf['mtu']!r}: 576..65535")

    def _validate_del(self, req: CNIRequest):
        """DEL is best-effort: a configuration edited since the ADD, bad
        CNI_ARGS or an ifname no ADD could have used never make it fail
        (the runtime would retry it for ever); it removes what it can."""
        try:
            self._validate_netconf(req.netconf)
        except CNIError as exc:
            log.warning("DEL with an invalid network configuration, going on", extra={
                "container": req.container_id, "error": exc.msg})
        self._validate_env(req)

    def _validate_env(self, req: CNIRequest):
        if req.command in ("ADD", "DEL", "CHECK"):
            if not req.container_id:
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
            if not _CONTAINER_ID.match(req.container_id):
                raise CNIError(spec.ERR_INVALID_ENV,
                               f"invalid CNI_CONTAINERID {req.container_id!r:.80}",
                               "it must start with a letter or digit, followed by letters, "
                               "digits, '_', '.' or '-'")
            if not req.ifname:
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_IFNAME is not set")
            why = invalid_ifname(req.ifname)
            if why and req.command != "DEL":
                raise CNIError(spec.ERR_INVALID_ENV, f"invalid CNI_IFNAME {req.ifname!r:.40}: "
                                                     f"{why}")
            try:
                req.args = parse_cni_args(req.env.get("CNI_ARGS", ""))
            except CNIError:
                if req.command != "DEL":
                    raise
                # DEL is best-effort: it goes on with what the records say
                log.warning("DEL with malformed CNI_ARGS, ignored", extra={
                    "container": req.container_id, "cni_args": req.env.get("CNI_ARGS", "")})
        if req.command in ("ADD", "CHECK"):
            if not req.args.get("K8S_POD_NAME"):
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_ARGS lacks K8S_POD_NAME",
                               "the runtime must name the pod or container")
            # runtimes beyond the kubelet (podman, nerdctl) pass no namespace:
            # the address comes from the default pool, recorded with namespace ""
            req.args.setdefault("K8S_POD_NAMESPACE", "")
            if not req.netns:
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_NETNS is not set")
            if not os.path.exists(req.netns):
                raise CNIError(spec.ERR_INVALID_ENV,
                               f"network namespace {req.netns} does not exist")

    def _versions(self, req) -> list[int]:
        out = []
        if req.netconf.get("ipv4", True):
            out.append(4)
        if req.netconf.get("ipv6", False):
            out.append(6)
        return out

    # -- commands -------------------------------------------------------------
    def version_cmd(self, req):
        return {"cniVersion": req.version, "supportedVersions": list(spec.SUPPORTED_VERSIONS)}

    def add(self, req):
        """CNI ADD of the attachment (CNI_CONTAINERID, CNI_IFNAME) within
        the network ``name``: its own addresses and its own host veth
        (``host_veth_name``), whatever other attachments the container has.
        Repeated for the same attachment, the same result."""
        ns, pod = req.args["K8S_POD_NAMESPACE"], req.args["K8S_POD_NAME"]
        network = req.netconf["name"]
        existing = {a.version: a for a in
                    self.allocator.lookup_attachment(req.container_id, network, req.ifname)
                    if (a.namespace, a.pod) == (ns, pod)}
        host_name = host_veth_name(req.container_id, req.ifname, network)
        versions = self._versions(req)
        if existing and all(v in existing for v in versions):
            # a repeated ADD (the runtime retried, or two raced): when the pod
            # is wired exactly so, answer the same result again (a pair an
            # older coild made carries its pod's older host-end name)
            addrs = [existing[v].address for v in versions]
            for name in dict.fromkeys([host_name] + [n for a in existing.values()
                                                     for n in host_veth_names(a)]):
                info = self.podnet.describe(req.netns, req.ifname, name, addrs)
                if info is not None:
                    return self._result(req, name, info, addrs)
        fresh = []
        addrs = []
        wired = False
        try:
            pool = self._pool(ns)
            for v in versions:
                if v in existing:
                    continue
                fresh.append(self.allocator.allocate(pool, v, ns, pod, req.container_id, {
                    "origin": ORIGIN_CNI, "network": req.netconf["name"],
                    "ifname": req.ifname}))
            addrs = [a.address for a in list(existing.values()) + fresh]
            self._reached("add:allocated", req)
            self._check_deadline(req)
            info = self.podnet.setup(req.netns, req.ifname, host_name, addrs,
                                     mtu=req.netconf.get("mtu"))
            wired = True
            self._reached("add:wired", req)
            self._check_deadline(req)
        except BaseException as exc:
            if wired:              # made here: remove it again
                try:
                    self.podnet.delete(req.netns, req.ifname, host_name, addrs)
                except CoilError:
                    log.exception("removing %s after a failed ADD", host_name)
            for rec in fresh:      # leave nothing of this try behind
                try:
                    self.allocator.release_address(rec)
                except CoilError:
                    log.exception("releasing %s after a failed ADD", rec.address)
            raise self._cni_error(exc) from None
        return self._result(req, host_name, info, addrs)

    @staticmethod
    def _result(req, host_name, info, addrs):
        # not first in the chain: what the plugins before coil made is passed on
        prev = req.netconf.get("prevResult")
        return spec.build_result(req.version, host_name, info["host_mac"], req.ifname,
                                 info["container_mac"], req.netns, addrs,
                                 {a: gateway_for(a) for a in addrs}, mtu=info.get("mtu"),
                                 prev=prev if isinstance(prev, dict) else None)

    def _pool(self, namespace: str) -> str:
        try:
            return self.pools.for_namespace(namespace)
        except NotFound as exc:
            raise CNIError(spec.ERR_NO_POOL, exc.one_line()) from None

    def delete(self, req):
        """CNI DEL of one attachment: removes its host veth and pod
        interface and releases its addresses only; the container's other
        attachments (other networks, other ifnames) and REST addresses
        stay. A configuration without a usable ``name`` (DEL is
        best-effort) matches the container's attachment of that ifname in
        any network."""
        network = req.netconf.get("name")
        if not isinstance(network, str) or not network:
            network = None
        try:
            # a slot whose write had an unknown outcome is read back first;
            # when it cannot be, "try again": a DEL answered now would leave
            # a record that may have committed behind for good
            addrs = [a for a in self.allocator.resolve(req.container_id)
                     if a.of_attachment(network, req.ifname)]
        except BaseException as exc:
            raise self._cni_error(exc) from None
        # an ifname no ADD could have used: only the host end (by its routes)
        netns = req.netns or None if not invalid_ifname(req.ifname) else None
        # the host end: the records' attachment name, or the pod's older name
        # (made by an older coild); only one that routes these addresses
        names = list(dict.fromkeys(n for a in addrs for n in host_veth_names(a)))
        try:
            if addrs:
                self.teardown.delete(netns, req.ifname, names, [a.address for a in addrs])
            elif netns:
                self.teardown.delete(req.netns, req.ifname, "", [])
            for rec in addrs:
                self.allocator.release_address(rec)
        except BaseException as exc:
            raise self._cni_error(exc) from None
        return None

    def check(self, req):
        """CNI CHECK: the prevResult (required) must name what this
        container holds - read from etcd, not the cache - and the pod must
        be wired as ADD left it (podnet.check). A missing reservation is
        104, never 3: 3 would tell the runtime that no DEL is needed."""
        ns, pod = req.args["K8S_POD_NAMESPACE"], req.args["K8S_POD_NAME"]
        prev = req.netconf.get("prevResult")
        if not isinstance(prev, dict):
            raise CNIError(spec.ERR_INVALID_NETCONF, "CHECK needs prevResult",
                           "the runtime passes the ADD result it cached")
        ifaces = [i for i in prev.get("interfaces") or [] if isinstance(i, dict)]
        container = next((i for i in ifaces if i.get("name") == req.ifname
                          and i.get("sandbox")), None)
        if container is None:
            raise CNIError(spec.ERR_CHECK_FAILED,
                           f"prevResult has no interface {req.ifname} in a sandbox")
        if container.get("sandbox") != req.netns:
            raise CNIError(spec.ERR_CHECK_FAILED,
                           f"prevResult puts {req.ifname} in {container.get('sandbox')}, "
                           f"not in CNI_NETNS {req.netns}")
        index = ifaces.index(container)          # "interface" of ips: 0-based
        got = []
        for ip in prev.get("ips") or []:
            if not isinstance(ip, dict) or not ip.get("address"):
                continue
            if ip.get("interface") is not None and ip.get("interface") != index:
                continue              # another plugin's interface
            try:
                got.append(str(ipaddress.ip_interface(ip["address"]).ip))
            except ValueError:
                raise CNIError(spec.ERR_INVALID_NETCONF,
                               f"prevResult has an invalid address {ip['address']!r:.60}") from None
        if not got:
            raise CNIError(spec.ERR_CHECK_FAILED,
                           f"prevResult names no address on {req.ifname}")
        network = req.netconf["name"]
        # the attachment's host end; a pair made by an older coild has its
        # pod's older name, which prevResult then names
        host_ifaces = {i.get("name"): i for i in ifaces if not i.get("sandbox")}
        host_name = host_veth_name(req.container_id, req.ifname, network)
        if host_name not in host_ifaces:
            legacy = legacy_host_veth_name(ns, pod)
            host_name = legacy if legacy in host_ifaces else host_name
        host = host_ifaces.get(host_name)
        try:
            self.allocator.resolve(req.container_id)     # unknown outcomes first
            held = self._reservations(req.container_id, ns, pod, got, network, req.ifname)
            self.podnet.check(req.netns, req.ifname, host_name, sorted(got),
                              mtu=req.netconf.get("mtu"),
                              host_mac=(host or {}).get("mac") or "",
                              container_mac=container.get("mac") or "")
        except PodNetError as exc:
            raise CNIError(spec.ERR_CHECK_FAILED, exc.one_line()) from None
        except BaseException as exc:
            raise self._cni_error(exc) from None
        families = sorted({ipaddress.ip_address(a).version for a in held})
        if families != self._versions(req):
            raise CNIError(spec.ERR_CHECK_FAILED,
                           f"prevResult has IPv{families} addresses, the configuration asks "
                           f"for IPv{self._versions(req)}")
        return None

    def _reservations(self, container_id, ns, pod, addresses, network, ifname) -> list:
        """The addresses of ``addresses`` that etcd records for this
        attachment (a read per address). Raises CNIError 104 for one that
        is not reserved for it."""
        store = self.pools.store
        out = []
        for address in addresses:
            try:
                addr, _pool, block = store._locate(address)
            except NotFound:
                raise CNIError(spec.ERR_CHECK_FAILED,
                               f"{address} is in no pool: it is not reserved") from None
            rec = store.get_address(str(block), int(addr) - int(block.network_address))
            if rec is None or rec.container_id != container_id or \
                    (rec.namespace, rec.pod) != (ns, pod) or not rec.of_attachment(network, ifname):
                raise CNIError(spec.ERR_CHECK_FAILED,
                               f"{address} is not reserved for container {container_id} "
                               f"{ifname} of network {network} in etcd",
                               "DEL and ADD the pod again")
            out.append(address)
        return sorted(out)

    def gc(self, req):
        """Free the attachments this node made through CNI ADD for this
        network that the runtime no longer lists. A record is freed only
        when it was made by CNI ADD (not the REST API), names this network
        ``name``, is not in the valid list (by container ID and ifname), was
        created before this GC request started, and no ADD/DEL/CHECK of its
        container is in flight. Errors do not stop the walk: each is logged
        and counted, and the answer is an error naming how many failed."""
        started = now_iso()
        keep, keep_all = self._valid_attachments(req.netconf)
        network = req.netconf["name"]
        freed, failed, first_error = 0, 0, None
        for rec in self.allocator.records():
            if rec.origin != ORIGIN_CNI or rec.network != network:
                continue
            if rec.container_id in keep_all or (rec.container_id, rec.ifname) in keep:
                continue
            if not rec.created_at or rec.created_at >= started:
                continue
            try:
                # the container's request lock, not waited for: a container
                # with an ADD/DEL/CHECK in flight is left alone
                self._reached("lock:wait", req)
                with self.containers.hold(rec.container_id, timeout=0):
                    if rec not in self.allocator.lookup(rec.container_id):
                        continue          # released meanwhile
                    error = self._gc_free(rec, network)
            except TimeoutError:
                log.info("gc: request in flight, attachment kept", extra={
                    "container": rec.container_id, "address": rec.address})
                continue
            if error is None:
                freed += 1
            else:
                failed += 1
                first_error = first_error or error
        if self.metrics is not None:
            self.metrics.gc_freed.inc(freed)
            self.metrics.gc_errors.inc(failed)
        if failed:
            err = self._cni_error(first_error)
            raise CNIError(err.code, f"GC freed {freed} attachment(s), {failed} failed: {err.msg}")
        return None

    def _gc_free(self, rec, network: str):
        """Remove one stale attachment. Returns the exception, or None."""
        try:
            self.podnet.delete(None, "", host_veth_names(rec), [rec.address])
            self.allocator.release_address(rec)
        except Exception as exc:      # noqa: BLE001 - GC goes on with the others
            text = exc.one_line() if isinstance(exc, CoilError) else repr(exc)
            log.error("gc: freeing an attachment failed", extra={
                "container": rec.container_id, "address": rec.address, "error": text})
            return exc
        log.info("gc: freed stale attachment", extra={
            "container": rec.container_id, "ifname": rec.ifname, "address": rec.address,
            "network": network})
        return None

    @staticmethod
    def _valid_attachments(conf) -> tuple[set, set]:
        """(container ID, ifname) pairs, and container IDs listed without an
        ifname, from ``cni.dev/valid-attachments`` and ``cni.dev/attachments``
        (both accepted). Missing or null means none. Raises CNIError (7)
        when a list is not a list."""
        keep, keep_all = set(), set()
        for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
            value = conf.get(key)
            if value is None:
                continue
            if not isinstance(value, list):
                raise CNIError(spec.ERR_INVALID_NETCONF, f"{key} must be a list of "
                                                         f"{{containerID, ifname}} objects")
            for entry in value:
                if not isinstance(entry, dict) or not isinstance(entry.get("containerID"), str):
                    raise CNIError(spec.ERR_INVALID_NETCONF,
                                   f"{key} has an entry without a containerID: {entry!r:.80}")
                ifname = entry.get("ifname")
                if isinstance(ifname, str) and ifname:
                    keep.add((entry["containerID"], ifname))
                else:               # no ifname: every attachment of the container stays
                    keep_all.add(entry["containerID"])
        return keep, keep_all

    def status(self, req):
        """CNI 1.1 STATUS: 50 when coild cannot serve an ADD (not ready,
        etcd unreachable), 51 when no pool could give an ADD an address of
        every family the configuration asks for (no pool at all, or every
        pool exhausted: no free address in this node's blocks and no free
        block). Read from etcd, not the cache; no pool name is required."""
        try:
            if self.ready is not None:
                self.ready()
            pools = self.pools.store.list_pools()
            versions = self._versions(req)
            if not pools:
                raise CNIError(spec.ERR_LIMITED, "no address pool exists",
                               "create one with 'coilctl pool create NAME SUBNET SIZE'")
            for pool in pools:
                if all(self.allocator.has_room(pool.name, v)
                       or self.pools.store.has_free_block(pool, v) for v in versions):
                    return None
            want = " and ".join(f"IPv{v}" for v in versions)
            raise CNIError(spec.ERR_LIMITED,
                           f"no pool has a free {want} address for this node: all "
                           f"{len(pools)} pool(s) exhausted",
                           "add a subnet with 'coilctl pool add-subnet' or free addresses")
        except CNIError:
            raise
        except CoilError as exc:
            raise CNIError(spec.ERR_NOT_AVAILABLE, exc.one_line(),
                           "coild cannot serve: etcd unreachable or coild not ready") from None

    # -- errors ---------------------------------------------------------------
    @staticmethod
    def _cni_error(exc) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        if isinstance(exc, StoreUnavailable):
            return CNIError(spec.ERR_TRY_AGAIN, exc.one_line(), "etcd is unreachable from coild")
        if isinstance(exc, Conflict):       # a lost retry race: the runtime retries
            return CNIError(spec.ERR_TRY_AGAIN, exc.one_line())
        if isinstance(exc, PoolExhausted):
            return CNIError(spec.ERR_POOL_EXHAUSTED, exc.one_line())
        if isinstance(exc, NotFound):
            return CNIError(spec.ERR_NO_POOL, exc.one_line())
        if isinstance(exc, (InvalidArgument, AlreadyExists)):
            return CNIError(spec.ERR_INVALID_NETCONF, exc.one_line())
        if isinstance(exc, NetlinkError):
            return CNIError(spec.ERR_NETWORK, exc.one_line())
        if isinstance(exc, CoilError):
            return CNIError(spec.ERR_INTERNAL, exc.one_line())
        log.exception("unexpected error", exc_info=exc)
        return CNIError(spec.ERR_INTERNAL, f"internal error in coild: {exc!r}")
