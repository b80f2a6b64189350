"""The etcd client: failover across every configured member, typed errors.

Every call runs under one time budget (``--etcd-timeout``, for the whole
call, not per member) and tries the members in turn, starting with the one
that answered last:

- a member that cannot be reached (connection refused, no such socket,
  channel not ready) or that proves it did not take the request (``no
  leader`` - every request carries etcd's ``hasleader`` requirement, so a
  member that lost quorum refuses at once instead of being treated as
  healthy - ``too many requests``, ``invalid auth token``) is skipped and
  the next member is tried at once;
- reads are idempotent: any failure moves on to the next member;
- a transaction that may have reached etcd (``DEADLINE_EXCEEDED``, a reset
  in the middle of the call, ``leader changed``, ``request timed out``) is
  never re-sent: ``OutcomeUnknown`` is raised and the caller reads the keys
  back to learn whether it committed;
- when every member failed, the call waits a little and tries again until
  the budget is spent, then raises ``StoreUnavailable`` naming each
  member's last error.

Rejected credentials become ``StoreAuthError``. An expired or revoked auth
token is renewed by building a new client (channels + token); the old one is
closed as soon as no call uses it any more.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from coil.config import EtcdConfig
from coil.errors import (CoilError, InvalidArgument, OutcomeUnknown, StoreAuthError, StoreUnavailable)

log = logging.getLogger("coil.etcd")

# gRPC channel options: reconnect quickly after an etcd restart (gRPC's default
# backoff grows to 120 s); whole-prefix reads of a large installation exceed
# gRPC's 4 MiB default.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1000),
                   ("grpc.max_receive_message_length", 256 << 20))
# etcd refuses a request carrying this with "etcdserver: no leader", before it
# proposes anything, when the member has no leader (rpctypes.MetadataRequireLeaderKey)
REQUIRE_LEADER = ("hasleader", "true")
# the longest pause between two rounds over all members
MAX_ROUND_PAUSE = 0.5

# Errors that prove the request was not taken by etcd: safe to send elsewhere.
NOT_DELIVERED = ("failed to connect to all addresses", "connection refused",
                 "etcdserver: no leader", "etcdserver: not capable",
                 "etcdserver: too many requests", "raft proposal dropped")
# The token is no longer valid; etcd checks it before proposing (or rejects
# the apply with "old revision"): renew it, then the request may be re-sent.
TOKEN_EXPIRED = ("invalid auth token", "revision of auth store is old")
BAD_CREDENTIALS = ("authentication failed", "permission denied", "user name is empty",
                   "user name not found", "authentication is not enabled")


class _TokenExpired(CoilError):
    """Internal: the client's auth token must be renewed before a retry."""

    def __init__(self, message: str = "etcd auth token expired"):
        super().__init__(message)


def _is_ipv6(host: str) -> bool:
    """True for an IPv6 literal (which a gRPC target writes in brackets)."""
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False            # a name or an IPv4 address


def _brief(exc) -> str:
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
    details = " ".join(details.split())
    # gRPC's "failed to connect to all addresses; last error: UNKNOWN: ipv4:...: Failed
    # to connect to remote host: Connection refused" -> the part after the address
    if "last error:" in details:
        details = details.rsplit(": ", 1)[-1]
    code = exc.code() if hasattr(exc, "code") else None
    return details or (code.name if code is not None else exc.__class__.__name__)


@dataclass(frozen=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    version: int
    lease: int = 0


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\0"


class _Member:
    """One etcd member: its gRPC channel, stubs and last known connectivity."""

    def __init__(self, url: str, target: str, creds):
        import grpc
        from pyetcd import etcdrpc
        self.url = url
        if creds is not None:
            self.channel = grpc.secure_channel(target, creds, options=list(CHANNEL_OPTIONS))
        else:
            self.channel = grpc.insecure_channel(target, options=list(CHANNEL_OPTIONS))
        self.kv = etcdrpc.KVStub(self.channel)
        self.lease = etcdrpc.LeaseStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)
        self.maintenance = etcdrpc.MaintenanceStub(self.channel)
        self._status_req = etcdrpc.StatusRequest()
        # True after the member answered, False after it failed: a hint only
        # (a call's own error is what counts). gRPC's connectivity watch is
        # not used: closing a watched channel races its polling thread.
        self.ok = False
        self.last_error = ""            # why the last probe failed, for messages

    def wait_ready(self, timeout: float, metadata) -> str | None:
        """None when the member answered last time or now answers the
        maintenance Status call with a leader, else why not (it cannot be
        reached, has no leader, or did not answer within ``timeout``). The
        probe writes nothing, and needs no auth."""
        import grpc
        if self.ok:
            return None
        try:
            status = self.maintenance.Status(self._status_req, timeout, metadata=metadata)
        except grpc.RpcError as exc:
            self.last_error = _brief(exc)
            return self.last_error
        if not status.leader:
            self.last_error = "no leader"
            return self.last_error
        self.ok = True
        return None

    def close(self):
        self.channel.close()


class Client:
    """Channels to every member and one auth token: the unit that token
    renewal replaces. Closed once retired and no call uses it any more."""

    def __init__(self, members: list[_Member]):
        self.members = members
        self.token: str | None = None
        self.users = 0
        self.retired = False
        self.closed = False

    @property
    def metadata(self) -> tuple:
        if self.token is None:
            return (REQUIRE_LEADER,)
        return (REQUIRE_LEADER, ("token", self.token))

    @property
    def channel(self):
        """The channel of the first member that is connected (for streams in tests)."""
        for m in self.members:
            if m.wait_ready(1.0, self.metadata) is None:
                return m.channel
        return self.members[0].channel

    def close(self):
        if not self.closed:
            self.closed = True
            for m in self.members:
                m.close()


class Etcd:
    """Thread-safe etcd access with failover and coil's error types.

    Keys given to methods are relative to the configured prefix. Every
    public call may raise ``StoreUnavailable`` (no member answered within
    the budget), ``StoreAuthError`` and, for transactions, ``OutcomeUnknown``
    (see ``txn``). ``counters`` counts ``calls``, ``retries`` (requests sent
    after a call's first), ``member_errors`` (a member skipped or failed
    during a call), ``failovers`` (a call answered by another member than
    the previous call), ``outcome_unknown``, ``renewals`` (auth tokens) and
    ``clients_closed``.
    """

    def __init__(self, config: EtcdConfig):
        if any(ep.startswith("@") for ep in config.endpoints):
            raise InvalidArgument(
                f"etcd endpoints {config.endpoints[0]} must be resolved from Kubernetes first")
        if not config.endpoints:
            raise InvalidArgument("no etcd endpoint given", hint="set --etcd-endpoints")
        if bool(config.username) != bool(config.password):
            raise InvalidArgument("give both --etcd-username and --etcd-password, or neither")
        self.config = config
        self.prefix = config.prefix
        self.timeout = config.timeout
        self._lock = threading.Lock()          # the current client and its users
        self._renew_lock = threading.Lock()    # one authentication at a time
        self._endpoint_text = ",".join(config.endpoints)
        self._preferred = 0                     # index of the member that answered last
        self.counters = collections.Counter()
        # gRPC's C core logs TLS and connection failures on stderr; coil reports
        # them itself, on one line (GRPC_VERBOSITY=debug still turns them on)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from pyetcd import etcdrpc  # heavy: imported only by roles that talk to etcd
        self._rpc = etcdrpc
        self._targets = self._parse_endpoints(config)
        self._creds = self._credentials(config)
        self._client: Client | None = self._new_client()

    # -- connection ---------------------------------------------------------
    @staticmethod
    def _parse_endpoints(cfg) -> list[tuple[str, str, bool]]:
        out = []
        for url in cfg.endpoints:
            u = urlsplit(url)
            if u.scheme == "unix":
                # a local etcd's UNIX socket: reachable from every network namespace
                out.append((url, f"unix:{u.path}", False))
                continue
            if u.scheme not in ("http", "https") or not u.hostname:
                raise InvalidArgument(f"invalid etcd endpoint {url!r}: expected "
                                      "http://HOST:PORT, https://HOST:PORT or unix://PATH")
            host = f"[{u.hostname}]" if _is_ipv6(u.hostname) else u.hostname
            out.append((url, f"{host}:{u.port or 2379}", u.scheme == "https"))
        return out

    @staticmethod
    def _credentials(cfg):
        if not any(url.startswith("https:") for url in cfg.endpoints):
            return None
        if not cfg.tls_ca:
            raise InvalidArgument(f"etcd endpoint {cfg.endpoints[0]} uses https: give --etcd-tls-ca")
        import grpc

        def read(path, what):
            if path is None:
                return None
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as exc:
                raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
        return grpc.ssl_channel_credentials(read(cfg.tls_ca, "--etcd-tls-ca"),
                                            read(cfg.tls_key, "--etcd-tls-key"),
                                            read(cfg.tls_cert, "--etcd-tls-cert"))

    def _new_client(self) -> Client:
        return Client([_Member(url, target, self._creds if secure else None)
                       for url, target, secure in self._targets])

    def close(self):
        """Close the client: its channels close when the calls in flight have
        ended. Calls made afterwards raise StoreUnavailable. Safe to repeat."""
        with self._lock:
            client, self._client = self._client, None
            if client is not None:
                client.retired = True
                if client.users == 0:
                    self._close_client(client)

    def _close_client(self, client: Client):
        client.close()
        self.counters["clients_closed"] += 1

    def _acquire(self) -> Client:
        with self._lock:
            client = self._client
            if client is None:
                raise StoreUnavailable("etcd client is closed")
            client.users += 1
            return client

    def _release(self, client: Client):
        with self._lock:
            client.users -= 1
            if client.retired and client.users == 0 and not client.closed:
                self._close_client(client)

    def _renew(self, used: Client, deadline: float) -> Client:
        """Replace ``used`` by a new client with a fresh token (unless another
        thread did already) and return the current client, acquired. The
        replaced client is closed when its last call ends. ``used`` stays
        acquired by the caller, who releases it."""
        with self._renew_lock:                  # one renewal at a time
            with self._lock:
                current = self._client
            if current is used:
                fresh = self._new_client()
                try:
                    self._authenticate(fresh, deadline)
                except BaseException:
                    fresh.close()
                    raise
                with self._lock:
                    if self._client is None:    # closed meanwhile
                        fresh.close()
                        raise StoreUnavailable("etcd client is closed")
                    used.retired = True
                    if used.users == 0:
                        self._close_client(used)
                    self._client = fresh
                self.counters["renewals"] += 1
                log.info("etcd auth token renewed", extra={"endpoints": self._endpoint_text})
        return self._acquire()

    def _authenticate(self, client: Client, deadline: float):
        req = self._rpc.AuthenticateRequest(name=self.config.username,
                                            password=self.config.password)
        resp = self._attempt(client, lambda m: m.auth.Authenticate, req, deadline, write=False,
                             authenticating=True)
        client.token = resp.token

    def _ensure_token(self, client: Client, deadline: float):
        if client.token is None and self.config.username:
            with self._renew_lock:
                if client.token is None:
                    self._authenticate(client, deadline)

    # -- the failover loop --------------------------------------------------
    def _classify(self, exc) -> str:
        """'token', 'auth', 'not-delivered', 'maybe' or 'fatal'."""
        import grpc
        code = exc.code() if hasattr(exc, "code") else None
        details = ((exc.details() if hasattr(exc, "details") else "") or "").lower()
        if any(t in details for t in TOKEN_EXPIRED):
            return "token"
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or \
                any(t in details for t in BAD_CREDENTIALS):
            return "auth"
        if any(t in details for t in NOT_DELIVERED):
            return "not-delivered"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                    grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED):
            return "maybe"
        return "fatal"

    def _call(self, method, req, *, write: bool, budget: float | None = None):
        """Send ``req`` with ``method(member)`` (a stub method getter) under the
        call's time budget, failing over between members. See the module
        docstring for what is retried where."""
        deadline = time.monotonic() + (self.timeout if budget is None else budget)
        self.counters["calls"] += 1
        client = self._acquire()
        try:
            self._ensure_token(client, deadline)
            while True:
                try:
                    return self._attempt(client, method, req, deadline, write=write)
                except _TokenExpired:
                    if not self.config.username:
                        raise StoreAuthError(
                            f"etcd at {self._endpoint_text} requires authentication",
                            hint="give --etcd-username and --etcd-password") from None
                    fresh = self._renew(client, deadline)
                    self._release(client)
                    client = fresh
        finally:
            self._release(client)

    def _attempt(self, client: Client, method, req, deadline: float, *, write: bool,
                 authenticating: bool = False):
        import grpc
        members = client.members
        n = len(members)
        errors: dict[str, str] = {}
        pause = 0.05
        tries = 0
        expired = 0
        while True:
            start = self._preferred % n
            for k in range(n):
                i = (start + k) % n
                m = members[i]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # a member that hangs must not eat the whole budget: each
                # member of a round gets its share of what is left
                share = remaining / (n - k)
                why = m.wait_ready(share, client.metadata)
                if why is not None:
                    errors[m.url] = why
                    self.counters["member_errors"] += 1
                    continue
                if tries:
                    self.counters["retries"] += 1
                tries += 1
                timeout = max(deadline - time.monotonic(), 0.001) if write else share
                try:
                    resp = method(m)(req, timeout, metadata=client.metadata)
                except ValueError:                       # the channel was closed under us
                    raise StoreUnavailable("etcd client is closed") from None
                except grpc.RpcError as exc:
                    m.ok = False
                    kind = self._classify(exc)
                    errors[m.url] = _brief(exc)
                    self.counters["member_errors"] += 1
                    if kind == "token" and not authenticating:
                        expired += 1
                        if expired >= n:          # every member rejects this token
                            raise _TokenExpired() from None
                        continue
                    if kind in ("auth", "token"):
                        raise StoreAuthError(
                            f"etcd at {m.url} rejected the credentials: {_brief(exc)}",
                            hint="check --etcd-username/--etcd-password and the TLS files") from None
                    if kind == "fatal":
                        raise StoreUnavailable(f"etcd at {m.url} refused the request: "
                                               f"{_brief(exc)}") from None
                    if write and kind == "maybe":
                        self.counters["outcome_unknown"] += 1
                        raise OutcomeUnknown(
                            f"etcd at {m.url} may or may not have committed a transaction: "
                            f"{_brief(exc)}",
                            hint="read the keys back to learn the outcome") from None
                    log.debug("etcd member failed", extra={"member": m.url,
                                                           "error": errors[m.url]})
                    continue
                m.ok = True
                if i != self._preferred:
                    prev = self._preferred
                    self._preferred = i
                    self.counters["failovers"] += 1
                    log.info("etcd failover", extra={"from": members[prev % n].url,
                                                     "to": m.url})
                return resp
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if expired:
                # some members said the token is invalid, the rest are unreachable
                raise _TokenExpired()
            time.sleep(min(pause, remaining))
            pause = min(pause * 2, MAX_ROUND_PAUSE)
        budget = f"{self.timeout:g}s"
        reasons = "; ".join(f"{url}: {why}" for url, why in errors.items()) or "no time left"
        hint = "check --etcd-endpoints and that etcd is running"
        if self._creds is not None:
            hint = "check --etcd-endpoints, the --etcd-tls-* files and that etcd is running"
        raise StoreUnavailable(f"no etcd member answered within {budget} ({reasons})",
                               hint=hint)

    @property
    def member_in_use(self) -> str:
        """The URL of the member the next call starts with (the last to answer)."""
        return self._targets[self._preferred % len(self._targets)][0]

    def member_status(self, index: int, timeout: float = 2.0):
        """The maintenance Status of member ``index`` (no failover): its
        member id, leader id and raft term. Raises StoreUnavailable."""
        import grpc
        client = self._acquire()
        try:
            m = client.members[index]
            return m.maintenance.Status(self._rpc.StatusRequest(), timeout,
                                        metadata=client.metadata)
        except grpc.RpcError as exc:
            raise StoreUnavailable(f"etcd at {client.members[index].url}: {_brief(exc)}") from None
        finally:
            self._release(client)

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _kv(self, kv) -> KV:
        return KV(kv.key.decode()[len(self.prefix):], kv.value, kv.mod_revision,
                  kv.create_revision, kv.version, kv.lease)

    def decode_kv(self, kv) -> KV:
        """A raw ``mvccpb.KeyValue`` (e.g. from a txn's range response) as a
        KV, its key relative to the prefix."""
        return self._kv(kv)

    # -- reads --------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        req = self._rpc.RangeRequest(key=self._key(key))
        resp = self._range(req)
        return self._kv(resp.kvs[0]) if resp.kvs else None

    def get_prefix(self, prefix: str, keys_only: bool = False) -> tuple[list[KV], int]:
        """All keys under ``prefix``; returns (kvs, header revision)."""
        k = self._key(prefix)
        req = self._rpc.RangeRequest(key=k, range_end=prefix_end(k), keys_only=keys_only)
        resp = self._range(req)
        return [self._kv(kv) for kv in resp.kvs], resp.header.revision

    def iter_prefix_pages(self, prefix: str, page_size: int = 5000, keys_only: bool = False,
                          start_after: str | None = None):
        """Yield ``(kvs, revision)`` pages of the keys under ``prefix``, in key
        order, all read at the revision of the first page (one consistent
        snapshot). ``start_after``: begin after that key. Each page is one
        range request of at most ``page_size`` keys, so no response grows with
        the installation."""
        k = self._key(prefix)
        end = prefix_end(k)
        start = self._key(start_after) + b"\0" if start_after is not None else k
        revision = 0
        while True:
            req = self._rpc.RangeRequest(key=start, range_end=end, limit=page_size,
                                         revision=revision, keys_only=keys_only)
            resp = self._range(req)
            if not revision:
                revision = resp.header.revision
            yield [self._kv(kv) for kv in resp.kvs], revision
            if not resp.more or not resp.kvs:
                return
            start = resp.kvs[-1].key + b"\0"

    def get_prefix_paged(self, prefix: str, page_size: int = 5000,
                         keys_only: bool = False) -> tuple[list[KV], int]:
        """Like ``get_prefix`` for any number of keys: paged, one snapshot."""
        out: list[KV] = []
        revision = 0
        for kvs, revision in self.iter_prefix_pages(prefix, page_size, keys_only):
            out.extend(kvs)
        return out, revision

    def count_prefix(self, prefix: str) -> int:
        k = self._key(prefix)
        req = self._rpc.RangeRequest(key=k, range_end=prefix_end(k), count_only=True)
        return self._range(req).count

    def _range(self, req):
        """One Range request (idempotent: failed over freely)."""
        return self._call(lambda m: m.kv.Range, req, write=False)

    def ping(self, budget: float | None = None) -> None:
        """Raise StoreUnavailable unless some member answers a linearizable
        read (so it has a leader and a quorum) within ``budget`` seconds."""
        k = self._key("pool/")
        req = self._rpc.RangeRequest(key=k, range_end=prefix_end(k), count_only=True)
        self._call(lambda m: m.kv.Range, req, write=False, budget=budget)

    # -- transactions -------------------------------------------------------
    # compare tuples: ("version"|"mod"|"create", key, op, int) and
    # ("prefix-empty", prefix), ("prefix-mod-below", prefix, revision);
    # ops: ("put", key, bytes[, lease]), ("delete", key),
    # ("delete-prefix", prefix), ("get", key)
    def _compare(self, spec):
        rpc = self._rpc
        kind = spec[0]
        if kind == "prefix-empty":
            k = self._key(spec[1])
            return rpc.Compare(key=k, range_end=prefix_end(k), target=rpc.Compare.VERSION,
                               result=rpc.Compare.EQUAL, version=0)
        if kind == "prefix-mod-below":
            # every key under the prefix was last written before revision spec[2]
            k = self._key(spec[1])
            return rpc.Compare(key=k, range_end=prefix_end(k), target=rpc.Compare.MOD,
                               result=rpc.Compare.LESS, mod_revision=spec[2])
        _, key, op, value = spec
        result = {"==": rpc.Compare.EQUAL, "!=": rpc.Compare.NOT_EQUAL,
                  "<": rpc.Compare.LESS, ">": rpc.Compare.GREATER}[op]
        c = rpc.Compare(key=self._key(key), result=result)
        if kind == "version":
            c.target, c.version = rpc.Compare.VERSION, value
        elif kind == "mod":
            c.target, c.mod_revision = rpc.Compare.MOD, value
        elif kind == "create":
            c.target, c.create_revision = rpc.Compare.CREATE, value
        elif kind == "value":
            c.target, c.value = rpc.Compare.VALUE, value
        else:
            raise ValueError(kind)
        return c

    def _op(self, spec):
        rpc = self._rpc
        kind = spec[0]
        if kind == "put":     # ("put", key, value[, lease id])
            return rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._key(spec[1]), value=spec[2], lease=spec[3] if len(spec) > 3 else 0))
        if kind == "touch":   # ("touch", key): rewrite the key as it is (new mod revision)
            return rpc.RequestOp(request_put=rpc.PutRequest(
                key=self._key(spec[1]), ignore_value=True, ignore_lease=True))
        if kind == "delete":
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._key(spec[1])))
        if kind == "delete-prefix":
            k = self._key(spec[1])
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(
                key=k, range_end=prefix_end(k)))
        if kind == "get":
            return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._key(spec[1])))
        raise ValueError(kind)

    def txn(self, compares, success, failure=()) -> tuple[bool, int, list]:
        """One guarded transaction. Returns (succeeded, revision, responses).

        Sent to one member; re-sent to another only when the first proves it
        did not take it (unreachable, no leader, expired token). Raises
        ``OutcomeUnknown`` when etcd may have committed it (deadline exceeded,
        connection lost mid-call, leader changed): the caller reads the keys
        back to decide, and must not re-send it blindly. A transaction cut off
        by the budget may still commit on the server shortly afterwards.
        Raises ``StoreUnavailable`` when no member took it within the budget,
        ``StoreAuthError`` when the credentials are refused."""
        req = self._rpc.TxnRequest(compare=[self._compare(c) for c in compares],
                                   success=[self._op(o) for o in success],
                                   failure=[self._op(o) for o in failure])
        resp = self._call(lambda m: m.kv.Txn, req, write=True)
        return resp.succeeded, resp.header.revision, list(resp.responses)

    def put(self, key: str, value: bytes) -> int:
        """Unguarded put; only for tests and tools, never for IPAM state."""
        ok, rev, _ = self.txn([], [("put", key, value)])
        return rev

    # -- leases -------------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id. Raises StoreUnavailable.
        (Sent like a read: a grant whose answer was lost leaves an unused
        lease that simply expires.)"""
        req = self._rpc.LeaseGrantRequest(TTL=int(ttl), ID=0)
        resp = self._call(lambda m: m.lease.LeaseGrant, req, write=False)
        if resp.error:
            raise StoreUnavailable(f"etcd at {self._endpoint_text} refused a lease: {resp.error}")
        return resp.ID

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease once. Returns the seconds it has left now; 0 or less
        means it has expired (or never existed): its keys are gone. Raises
        StoreUnavailable. Safe to repeat."""
        req = self._rpc.LeaseKeepAliveRequest(ID=lease_id)

        def once(m):
            def call(r, timeout, metadata):
                # a stream of one request: the first answer is the renewal's
                return next(iter(m.lease.LeaseKeepAlive(iter([r]), timeout, metadata=metadata)),
                            None)
            return call
        resp = self._call(once, req, write=False)
        return resp.TTL if resp is not None else 0

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease and delete its keys. False when it did not exist
        (expired already). Raises StoreUnavailable. Safe to repeat."""
        req = self._rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call(lambda m: m.lease.LeaseRevoke, req, write=False)
        except StoreUnavailable as exc:
            if "lease not found" in str(exc):
                return False
            raise
        return True
