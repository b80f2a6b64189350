"""etcd auth token renewal against a real etcd with authentication enabled.

The token is invalidated deterministically: ``etcdctl auth disable`` then
``auth enable`` drops every token etcd issued. The next call gets "invalid
auth token"; the client must then be replaced by one with a fresh token and
the old one closed (its gRPC channels refuse calls afterwards), exactly once
however many threads hit the expired token at the same time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import uuid

import grpc
import pytest

from coil.config import EtcdConfig
from coil.store import etcd as etcd_mod
from coil.store.etcd import Etcd
from helpers import auth_etcd_in_tmpdir

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs Debian's etcd")


def etcdctl(server, *args):
    r = subprocess.run(["etcdctl", "--endpoints", server.endpoint, *args], capture_output=True,
                       text=True, env=dict(os.environ, ETCDCTL_API="3"), timeout=30)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def auth_etcd():
    with auth_etcd_in_tmpdir() as server:
        yield server


def invalidate_tokens(server):
    """Every token etcd has issued becomes invalid."""
    etcdctl(server, "--user", "root:rootpw", "auth", "disable")
    etcdctl(server, "auth", "enable")


@pytest.fixture
def closes(monkeypatch):
    """Every Client.close() call, in order (the real close still runs)."""
    calls = []
    real = etcd_mod.Client.close

    def counting(self):
        calls.append(self)
        real(self)
    monkeypatch.setattr(etcd_mod.Client, "close", counting)
    return calls


def open_etcd(server) -> Etcd:
    return Etcd(EtcdConfig(endpoints=(server.endpoint,), prefix=f"/tok-{uuid.uuid4().hex[:8]}/",
                           timeout=5.0, username="root", password="rootpw"))


def channel_closed(client) -> bool:
    """The client's gRPC channel refuses new calls (grpc raises ValueError)."""
    from pyetcd import etcdrpc
    try:
        etcdrpc.KVStub(client.members[0].channel).Range(etcdrpc.RangeRequest(key=b"x"),
                                                        timeout=1)
    except ValueError:
        return True
    except grpc.RpcError:
        return False
    return False


def test_expired_token_replaces_the_client_and_closes_the_old_one(auth_etcd, closes):
    etcd = open_etcd(auth_etcd)
    try:
        etcd.put("k", b"v1")
        old = etcd._client
        assert old.token and etcd.counters["renewals"] == 0
        invalidate_tokens(auth_etcd)
        assert etcd.get("k").value == b"v1"             # renewed transparently
        new = etcd._client
        assert new is not old and new.token != old.token
        assert etcd.counters["renewals"] == 1
        assert closes == [old] and old.closed and channel_closed(old)
        assert not new.closed and not channel_closed(new)
        # a write is re-sent after renewal: etcd checks the token before proposing
        invalidate_tokens(auth_etcd)
        etcd.put("k", b"v2")
        assert etcd.get("k").value == b"v2"
        assert etcd.counters["renewals"] == 2 and closes == [old, new]
        assert etcd.counters["outcome_unknown"] == 0
    finally:
        etcd.close()
    assert len(closes) == 3 and closes[-1] is not old and closes[-1] is not new
    assert etcd.counters["clients_closed"] == 3


def test_concurrent_calls_renew_once(auth_etcd, closes):
    """Many threads meet the expired token together: one renewal, one
    client closed - after the last call using it ended - and every call
    succeeds."""
    etcd = open_etcd(auth_etcd)
    errors, results = [], []
    try:
        etcd.put("k", b"v")
        old = etcd._client
        invalidate_tokens(auth_etcd)
        gate = threading.Barrier(16)

        def worker():
            try:
                gate.wait()
                for _ in range(5):
                    results.append(etcd.get("k").value)
            except Exception as exc:  # noqa: BLE001 - collected and asserted
                errors.append(exc)
        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert results == [b"v"] * 80
        assert etcd.counters["renewals"] == 1
        assert closes == [old] and channel_closed(old)
        assert etcd._client.users == 0 and not etcd._client.closed
    finally:
        etcd.close()
    assert etcd.counters["clients_closed"] == 2


def test_close_waits_for_calls_in_flight_then_refuses(auth_etcd):
    from coil.errors import StoreUnavailable
    etcd = open_etcd(auth_etcd)
    etcd.put("k", b"v")
    client = etcd._client
    etcd.close()
    assert client.closed and channel_closed(client)
    with pytest.raises(StoreUnavailable, match="closed"):
        etcd.get("k")
    etcd.close()                                          # twice is harmless
    assert etcd.counters["clients_closed"] == 1
