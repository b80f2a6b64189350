"""The CNI plugin's work, done inside the warm coild.

The ``coil`` executable (native launcher, or its pure-Python twin) relays
the environment and stdin over coild's UNIX socket; this module validates
them, runs ADD/DEL/CHECK/GC/STATUS and returns (exit code, stdout bytes).
Errors become CNI error objects here and nowhere else.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from contextlib import contextmanager

from coil.cni import spec
from coil.cni.spec import CNIError
from coil.coild.podnet import PodNetError, gateway_for, host_veth_name
from coil.errors import (AlreadyExists, CoilError, InvalidArgument, NetlinkError, NotFound,
                         PoolExhausted, StoreUnavailable)
from coil.store.model import ORIGIN_CNI, now_iso

log = logging.getLogger("coild.cni")

ENV_KEYS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
MAGIC = b"COIL1\n"

# Fault injection for the crash tests: coild pauses this many seconds in the
# middle of an ADD (address recorded, veth made, result not sent yet).
_FAULT_PAUSE = float(os.environ.get("COIL_FAULT_ADD_PAUSE", "0") or 0)


class CNIRequest:
    __slots__ = ("env", "stdin", "netconf", "command", "container_id", "netns", "ifname",
                 "args", "version")

    def __init__(self, env: dict, stdin: bytes):
        self.env = env
        self.stdin = stdin
        self.netconf = {}
        self.command = env.get("CNI_COMMAND", "")
        self.container_id = env.get("CNI_CONTAINERID", "")
        self.netns = env.get("CNI_NETNS", "")
        self.ifname = env.get("CNI_IFNAME", "")
        self.args = {}
        self.version = "1.1.0"


def decode_frame(data: bytes) -> CNIRequest:
    """Split a relayed request into environment and stdin. Raises CNIError."""
    if not data.startswith(MAGIC):
        raise CNIError(spec.ERR_DECODE, "malformed request from the coil plugin",
                       "the plugin and coild versions do not match")
    body = data[len(MAGIC):]
    env = {}
    pos = 0
    while True:
        end = body.find(b"\0", pos)
        if end < 0:
            raise CNIError(spec.ERR_DECODE, "malformed request from the coil plugin",
                           "environment not terminated")
        item = body[pos:end]
        pos = end + 1
        if not item:
            break
        key, sep, value = item.partition(b"=")
        if sep and key.decode("ascii", "replace") in ENV_KEYS:
            env[key.decode()] = value.decode("utf-8", "replace")
    return CNIRequest(env, body[pos:])


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
    """ADD/DEL/CHECK/GC/STATUS on top of the allocator and the pod network."""

    def __init__(self, allocator, podnet, pools, metrics=None):
        self.allocator = allocator
        self.podnet = podnet
        self.pools = pools
        self.metrics = metrics
        # containers with an ADD/DEL/CHECK in flight (count), and those GC is freeing
        self._busy_cond = threading.Condition()
        self._in_flight: dict[str, int] = {}
        self._gc_claimed: set[str] = set()

    # -- requests in flight, per container ------------------------------------------
    @contextmanager
    def _attachment_request(self, container_id: str):
        """Marks an ADD/DEL/CHECK of the container as in flight (GC leaves it
        alone); waits while GC is freeing that container."""
        with self._busy_cond:
            while container_id in self._gc_claimed:
                self._busy_cond.wait()
            self._in_flight[container_id] = self._in_flight.get(container_id, 0) + 1
        try:
            yield
        finally:
            with self._busy_cond:
                n = self._in_flight.pop(container_id) - 1
                if n:
                    self._in_flight[container_id] = n

    def _gc_claim(self, container_id: str) -> bool:
        """GC takes the container unless a request of it is in flight."""
        with self._busy_cond:
            if container_id in self._in_flight or container_id in self._gc_claimed:
                return False
            self._gc_claimed.add(container_id)
            return True

    def _gc_release(self, container_id: str):
        with self._busy_cond:
            self._gc_claimed.discard(container_id)
            self._busy_cond.notify_all()

    # -- entry ----------------------------------------------------------------
    def handle(self, data: bytes) -> tuple[int, bytes]:
        started = time.perf_counter()
        req = None
        try:
            req = decode_frame(data)
            self._validate(req)
            handler = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                       "GC": self.gc, "STATUS": self.status, "VERSION": self.version_cmd}[req.command]
            if req.command in ("ADD", "DEL", "CHECK"):
                with self._attachment_request(req.container_id):
                    out = handler(req)
            else:
                out = handler(req)
            code, body = 0, (json.dumps(out).encode() if out is not None else b"")
        except CNIError as exc:
            code, body = 1, json.dumps(exc.to_json(req.version if req else "1.1.0")).encode()
            log.warning("cni request failed", extra={
                "command": req.command if req else "?", "container": req.container_id if req else "",
                "code": exc.code, "error": exc.msg})
        except Exception as exc:  # a bug: still answer with an error object
            log.exception("cni request crashed")
            err = CNIError(spec.ERR_INTERNAL, f"internal error in coild: {exc}")
            code, body = 1, json.dumps(err.to_json(req.version if req else "1.1.0")).encode()
        if self.metrics is not None and req is not None:
            self.metrics.observe_cni(req.command, code, time.perf_counter() - started)
        if req is not None and code == 0 and req.command in ("ADD", "DEL"):
            log.info("cni %s", req.command.lower(), extra={
                "container": req.container_id, "pod": req.args.get("K8S_POD_NAME", ""),
                "namespace": req.args.get("K8S_POD_NAMESPACE", ""),
                "ms": round((time.perf_counter() - started) * 1000, 2)})
        return code, body

    def _validate(self, req: CNIRequest):
        if not req.command:
            raise CNIError(spec.ERR_INVALID_ENV, "CNI_COMMAND is not set")
        try:
            conf = json.loads(req.stdin) if req.stdin.strip() else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CNIError(spec.ERR_DECODE, f"network configuration on stdin is not valid JSON: {exc}")
        if req.command == "VERSION" and conf is None:
            return
        if not isinstance(conf, dict):
            raise CNIError(spec.ERR_DECODE, "network configuration on stdin must be a JSON object")
        req.netconf = conf
        version = conf.get("cniVersion")
        if not isinstance(version, str) or not version:
            raise CNIError(spec.ERR_INVALID_NETCONF, "network configuration has no cniVersion")
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
        if req.command in ("ADD", "DEL", "CHECK"):
            if not req.container_id:
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_CONTAINERID is not set")
            if not req.ifname:
                raise CNIError(spec.ERR_INVALID_ENV, "CNI_IFNAME is not set")
            if len(req.ifname) > 15 or "/" in req.ifname or req.ifname in (".", ".."):
                raise CNIError(spec.ERR_INVALID_ENV, f"invalid CNI_IFNAME {req.ifname!r}")
            req.args = parse_cni_args(req.env.get("CNI_ARGS", ""))
        if req.command in ("ADD", "CHECK"):
            for key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME"):
                if not req.args.get(key):
                    raise CNIError(spec.ERR_INVALID_ENV, f"CNI_ARGS lacks {key}",
                                   "coil serves Kubernetes pods: the runtime must pass "
                                   "K8S_POD_NAMESPACE and K8S_POD_NAME")
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
        ns, pod = req.args["K8S_POD_NAMESPACE"], req.args["K8S_POD_NAME"]
        existing = {4 if ":" not in a.address else 6: a for a in
                    self.allocator.lookup_pod(ns, pod, req.container_id)}
        fresh = []
        try:
            pool = self._pool(ns)
            for v in self._versions(req):
                if v in existing:
                    continue
                fresh.append(self.allocator.allocate(pool, v, ns, pod, req.container_id, {
                    "origin": ORIGIN_CNI, "network": req.netconf["name"],
                    "ifname": req.ifname}))
            addrs = [a.address for a in list(existing.values()) + fresh]
            host_name = host_veth_name(ns, pod)
            info = self.podnet.setup(req.netns, req.ifname, host_name, addrs,
                                     mtu=req.netconf.get("mtu"))
            if _FAULT_PAUSE:
                time.sleep(_FAULT_PAUSE)
        except BaseException as exc:
            for rec in fresh:      # leave nothing of this try behind
                try:
                    self.allocator.release_address(rec)
                except CoilError:
                    log.exception("releasing %s after a failed ADD", rec.address)
            raise self._cni_error(exc) from None
        return spec.build_result(req.version, host_name, info["host_mac"], req.ifname,
                                 info["container_mac"], req.netns, addrs,
                                 {a: gateway_for(a) for a in addrs})

    def _pool(self, namespace: str) -> str:
        try:
            return self.pools.for_namespace(namespace)
        except NotFound as exc:
            raise CNIError(spec.ERR_NO_POOL, exc.one_line()) from None

    def delete(self, req):
        addrs = self.allocator.lookup(req.container_id)
        ns = req.args.get("K8S_POD_NAMESPACE") or (addrs[0].namespace if addrs else "")
        pod = req.args.get("K8S_POD_NAME") or (addrs[0].pod if addrs else "")
        try:
            if ns and pod:
                self.podnet.delete(req.netns or None, req.ifname, host_veth_name(ns, pod),
                                   [a.address for a in addrs])
            elif req.netns:
                self.podnet.delete(req.netns, req.ifname, "", [])
            for rec in addrs:
                self.allocator.release_address(rec)
        except BaseException as exc:
            raise self._cni_error(exc) from None
        return None

    def check(self, req):
        ns, pod = req.args["K8S_POD_NAMESPACE"], req.args["K8S_POD_NAME"]
        addrs = self.allocator.lookup_pod(ns, pod, req.container_id)
        if not addrs:
            raise CNIError(spec.ERR_UNKNOWN_CONTAINER,
                           f"container {req.container_id} holds no address on this node")
        want = sorted(a.address for a in addrs)
        prev = req.netconf.get("prevResult")
        if isinstance(prev, dict):
            got = sorted(str(ipaddress.ip_interface(i.get("address", "")).ip)
                         for i in prev.get("ips", []) if isinstance(i, dict) and i.get("address"))
            if got and got != want:
                raise CNIError(spec.ERR_CHECK_FAILED,
                               f"prevResult addresses {got} differ from the held {want}")
        try:
            self.podnet.check(req.netns, req.ifname, host_veth_name(ns, pod), want)
        except PodNetError as exc:
            raise CNIError(spec.ERR_CHECK_FAILED, exc.one_line()) from None
        except BaseException as exc:
            raise self._cni_error(exc) from None
        return None

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
            if not self._gc_claim(rec.container_id):
                log.info("gc: request in flight, attachment kept", extra={
                    "container": rec.container_id, "address": rec.address})
                continue
            try:
                self.podnet.delete(None, "", host_veth_name(rec.namespace, rec.pod), [rec.address])
                self.allocator.release_address(rec)
                freed += 1
                log.info("gc: freed stale attachment", extra={
                    "container": rec.container_id, "ifname": rec.ifname,
                    "address": rec.address, "network": network})
            except Exception as exc:      # noqa: BLE001 - go on with the others
                failed += 1
                first_error = first_error or exc
                text = exc.one_line() if isinstance(exc, CoilError) else repr(exc)
                log.error("gc: freeing an attachment failed", extra={
                    "container": rec.container_id, "address": rec.address, "error": text})
            finally:
                self._gc_release(rec.container_id)
        if self.metrics is not None:
            self.metrics.gc_freed.inc(freed)
            self.metrics.gc_errors.inc(failed)
        if failed:
            err = self._cni_error(first_error)
            raise CNIError(err.code, f"GC freed {freed} attachment(s), {failed} failed: {err.msg}")
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
        try:
            self.pools.refresh()          # a real etcd round trip, not the cache
            self.pools.for_namespace("default")
        except NotFound as exc:
            raise CNIError(spec.ERR_NOT_AVAILABLE, exc.one_line()) from None
        except StoreUnavailable as exc:
            raise CNIError(spec.ERR_NOT_AVAILABLE, exc.one_line()) from None
        return None

    # -- errors ---------------------------------------------------------------
    @staticmethod
    def _cni_error(exc) -> CNIError:
        if isinstance(exc, CNIError):
            return exc
        if isinstance(exc, StoreUnavailable):
            return CNIError(spec.ERR_TRY_AGAIN, exc.one_line(), "etcd is unreachable from coild")
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
