"""The etcd client: connection from an EtcdConfig, typed errors.

Every failure reaching etcd becomes ``StoreUnavailable`` naming the
endpoints; rejected credentials become ``StoreAuthError``. Expired auth
tokens are renewed transparently once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from coil.config import EtcdConfig
from coil.errors import InvalidArgument, StoreAuthError, StoreUnavailable


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


class Etcd:
    """Thin, thread-safe wrapper over pyetcd with coil's error types.

    Keys given to methods are relative to the configured prefix.
    """

    def __init__(self, config: EtcdConfig):
        if any(ep.startswith("@") for ep in config.endpoints):
            raise InvalidArgument(
                f"etcd endpoints {config.endpoints[0]} must be resolved from Kubernetes first")
        self.config = config
        self.prefix = config.prefix
        self._lock = threading.Lock()
        self._client = None
        self._endpoint_text = ",".join(config.endpoints)
        from pyetcd import etcdrpc  # heavy: imported only by roles that talk to etcd
        self._rpc = etcdrpc
        self._connect()

    # -- connection ---------------------------------------------------------
    def _connect(self):
        import grpc
        import pyetcd
        cfg = self.config
        creds = None
        endpoints = []
        # reconnect quickly after an etcd restart (gRPC's default backoff grows to 120 s)
        opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                # whole-prefix reads of a large installation exceed gRPC's 4 MiB default
                ("grpc.max_receive_message_length", 256 << 20)]
        for url in cfg.endpoints:
            u = urlsplit(url)
            if u.scheme == "unix":
                # a local etcd's UNIX socket: reachable from every network namespace
                ep = pyetcd.Endpoint("localhost", 0, secure=False, time_retry=0.5, opts=opts)
                ep.channel.close()
                ep.netloc = f"unix:{u.path}"
                ep.channel = grpc.insecure_channel(ep.netloc, options=opts)
                endpoints.append(ep)
                continue
            secure = u.scheme == "https"
            if secure and creds is None:
                if not cfg.tls_ca:
                    raise InvalidArgument(f"etcd endpoint {url} uses https: give --etcd-tls-ca")
                creds = pyetcd.MultiEndpointEtcd3Client.get_secure_creds(
                    cfg.tls_ca, cfg.tls_key, cfg.tls_cert)
            endpoints.append(pyetcd.Endpoint(u.hostname, u.port or 2379, secure=secure,
                                             creds=creds if secure else None, time_retry=0.5,
                                             opts=opts))
        try:
            self._client = pyetcd.MultiEndpointEtcd3Client(
                endpoints=endpoints, timeout=cfg.timeout, user=cfg.username,
                password=cfg.password, failover=len(endpoints) > 1)
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def close(self):
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _translate(self, exc):
        import grpc
        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else str(exc)) or ""
        details = " ".join(details.split())
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED) or \
                "authentication failed" in details or "permission denied" in details or \
                "user name is empty" in details:
            return StoreAuthError(
                f"etcd at {self._endpoint_text} rejected the credentials: {details}",
                hint="check --etcd-username/--etcd-password and the TLS files")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return StoreUnavailable(f"etcd at {self._endpoint_text} did not answer within "
                                    f"{self.config.timeout:g}s",
                                    hint="check that etcd is running and reachable")
        return StoreUnavailable(f"cannot reach etcd at {self._endpoint_text}: {details or code}",
                                hint="check --etcd-endpoints and that etcd is running")

    def _call(self, fn):
        import grpc
        from pyetcd import exceptions as pexc
        for attempt in (0, 1):
            client = self._client
            if client is None:
                raise StoreUnavailable("etcd client is closed")
            try:
                return fn(client)
            except grpc.RpcError as exc:
                details = (exc.details() if hasattr(exc, "details") else "") or ""
                if attempt == 0 and "invalid auth token" in details and self.config.username:
                    with self._lock:
                        self._connect()
                    continue
                raise self._translate(exc) from None
            except (pexc.Etcd3Exception, ValueError) as exc:
                raise StoreUnavailable(f"cannot reach etcd at {self._endpoint_text}: "
                                       f"{exc or exc.__class__.__name__}",
                                       hint="check --etcd-endpoints and that etcd is running") from None

    @staticmethod
    def _auth(client) -> dict:
        # gRPC refuses call credentials on a plain-text channel ("does not have
        # a sufficient security level"); the token travels in the metadata then.
        secure = any(ep.secure for ep in client.endpoints.values())
        return {"credentials": client.call_credentials if secure else None,
                "metadata": client.metadata}

    def _key(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _kv(self, kv) -> KV:
        return KV(kv.key.decode()[len(self.prefix):], kv.value, kv.mod_revision,
                  kv.create_revision, kv.version, kv.lease)

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
        return self._call(lambda c: c.kvstub.Range(req, c.timeout, **self._auth(c)))

    # -- transactions -------------------------------------------------------
    # compare tuples: ("version"|"mod"|"create", key, op, int) and
    # ("prefix-empty", prefix); ops: ("put", key, bytes[, lease]), ("delete", key),
    # ("delete-prefix", prefix), ("get", key)
    def _compare(self, spec):
        rpc = self._rpc
        kind = spec[0]
        if kind == "prefix-empty":
            k = self._key(spec[1])
            return rpc.Compare(key=k, range_end=prefix_end(k), target=rpc.Compare.VERSION,
                               result=rpc.Compare.EQUAL, version=0)
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
        """One guarded transaction. Returns (succeeded, revision, responses)."""
        req = self._rpc.TxnRequest(compare=[self._compare(c) for c in compares],
                                   success=[self._op(o) for o in success],
                                   failure=[self._op(o) for o in failure])
        resp = self._call(lambda c: c.kvstub.Txn(req, c.timeout, **self._auth(c)))
        return resp.succeeded, resp.header.revision, list(resp.responses)

    def put(self, key: str, value: bytes) -> int:
        """Unguarded put; only for tests and tools, never for IPAM state."""
        ok, rev, _ = self.txn([], [("put", key, value)])
        return rev

    # -- leases -------------------------------------------------------------
    def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id. Raises StoreUnavailable."""
        req = self._rpc.LeaseGrantRequest(TTL=int(ttl), ID=0)
        resp = self._call(lambda c: c.leasestub.LeaseGrant(req, c.timeout, **self._auth(c)))
        if resp.error:
            raise StoreUnavailable(f"etcd at {self._endpoint_text} refused a lease: {resp.error}")
        return resp.ID

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease once. Returns the seconds it has left now; 0 or less
        means it has expired (or never existed): its keys are gone. Raises
        StoreUnavailable. Safe to repeat."""
        req = self._rpc.LeaseKeepAliveRequest(ID=lease_id)

        def once(c):
            for resp in c.leasestub.LeaseKeepAlive(iter([req]), c.timeout, **self._auth(c)):
                return resp.TTL
            return 0
        return self._call(once)

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke a lease and delete its keys. False when it did not exist
        (expired already). Raises StoreUnavailable. Safe to repeat."""
        req = self._rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            self._call(lambda c: c.leasestub.LeaseRevoke(req, c.timeout, **self._auth(c)))
        except StoreUnavailable as exc:
            if "lease not found" in str(exc):
                return False
            raise
        return True
