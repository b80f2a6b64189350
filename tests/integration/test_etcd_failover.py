"""etcd failover against a real 3-member cluster on loopback ports.

Members are stopped (by PID) one at a time, the leader and the member in use
among them, and brought back. coilctl, the store and coild must keep working
while a minority is down; a transaction is re-sent to another member only when
the first provably did not take it, else ``OutcomeUnknown``; coild's /readyz
says whether some member with a quorum answers. No wall-clock assertions:
outcomes and counts only (latencies are printed for the report).
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest

from coil.config import EtcdConfig
from coil.errors import OutcomeUnknown, StoreUnavailable
from coil.store import IPAMStore
from coil.store.etcd import Etcd
from harness import CNI, Coild, Netns, coil_conflist
from helpers import EtcdCluster, hypercoil, started_in_tmpdir, wait_for

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs Debian's etcd")


@pytest.fixture
def etcd_cluster():
    """Three etcd members on free loopback ports (and UNIX sockets); every
    member is stopped by PID at teardown."""
    with started_in_tmpdir("coil-etcd3-", lambda tmp: EtcdCluster(tmp, size=3),
                           close="close") as cluster:
        yield cluster


def open_etcd(cluster, prefix, timeout=5.0, endpoints=None) -> Etcd:
    return Etcd(EtcdConfig(endpoints=tuple(endpoints or cluster.endpoints), prefix=prefix,
                           timeout=timeout))


class Victims:
    """Which member to stop next, until every member and a leader of the
    moment have been stopped: the member in use first (when known), then the
    leader, then the rest."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.done: set[int] = set()
        self.kinds: list[str] = []

    def _leader(self):
        leader = self.cluster.leader()          # an index: 0 is a leader too
        return None if leader is None else (leader,)

    def more(self) -> bool:
        return len(self.done) < len(self.cluster) or not self._leader_stopped()

    def _leader_stopped(self) -> bool:
        return any(k.startswith("leader") for k in self.kinds)

    def next(self, in_use: int | None = None) -> int:
        leader = wait_for(self._leader, what="an etcd leader")[0]
        if in_use is not None and in_use not in self.done:
            victim = in_use
        elif not self._leader_stopped():
            victim = leader
        else:
            victim = min(i for i in range(len(self.cluster)) if i not in self.done)
        self.kinds.append("leader" if victim == leader else "follower")
        if victim == in_use:
            self.kinds[-1] += " in use"
        self.done.add(victim)
        return victim


def stopped_state(pid: int) -> bool:
    """The process has stopped (SIGSTOP takes effect after kill() returns)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


# -- the store itself ------------------------------------------------------------------

def test_reads_and_writes_fail_over_to_a_live_member(etcd_cluster):
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    etcd = open_etcd(etcd_cluster, prefix)
    try:
        etcd.put("k", b"0")
        victims = Victims(etcd_cluster)
        round_ = 0
        while victims.more():
            in_use = etcd_cluster.endpoints.index(etcd.member_in_use)
            victim = victims.next(in_use)
            etcd_cluster.stop_member(victim)
            before = dict(etcd.counters)
            for k in range(20):
                etcd.put("k", f"{round_}-{k}".encode())
                assert etcd.get("k").value == f"{round_}-{k}".encode()
            # the stopped member is never the one answering
            assert etcd.member_in_use != etcd_cluster.endpoint(victim)
            if victim == in_use:
                assert etcd.counters["failovers"] == before.get("failovers", 0) + 1
            etcd_cluster.restart_member(victim)
            round_ += 1
        assert victims.kinds[0].endswith("in use")
        assert any(k.startswith("leader") for k in victims.kinds)
        assert etcd.counters["outcome_unknown"] == 0
        print(f"\nstore counters: {dict(etcd.counters)}")
    finally:
        etcd.close()


def test_first_endpoint_down_costs_nothing_but_a_failover(etcd_cluster):
    """A client whose first endpoint is down goes to the next at once and
    remembers it: one failover, then every call starts at the live member."""
    etcd_cluster.stop_member(0)
    etcd = open_etcd(etcd_cluster, f"/fo-{uuid.uuid4().hex[:8]}/")
    try:
        for k in range(10):
            etcd.put("k", str(k).encode())
        assert etcd.counters["failovers"] == 1
        assert etcd.counters["member_errors"] == 1       # member 0, once
        assert etcd.counters["outcome_unknown"] == 0
        assert etcd.member_in_use == etcd_cluster.endpoint(1)
    finally:
        etcd.close()


def test_txn_to_a_hung_member_is_outcome_unknown_reads_fail_over(etcd_cluster):
    """A member that took the connection but does not answer (SIGSTOP): a
    transaction sent to it may have been delivered, so it is OutcomeUnknown
    and not re-sent; a read moves on to another member within the budget."""
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    etcd = open_etcd(etcd_cluster, prefix, timeout=3.0)
    proc = None
    try:
        etcd.put("k", b"before")
        in_use = etcd_cluster.endpoints.index(etcd.member_in_use)
        proc = etcd_cluster.procs[in_use]
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: stopped_state(proc.pid), what="the member to be stopped")
        with pytest.raises(OutcomeUnknown) as info:
            etcd.txn([], [("put", "k", b"after")])
        assert "read the keys back" in info.value.one_line()
        assert etcd.counters["outcome_unknown"] == 1
        assert etcd.counters["retries"] == 0                # sent once, never re-sent
        # reads are idempotent: the next member answers
        assert etcd.get("k").value == b"before"
        assert etcd.member_in_use != etcd_cluster.endpoint(in_use)
    finally:
        if proc is not None:
            os.kill(proc.pid, signal.SIGCONT)
        etcd.close()
    # the hung member received the txn but had not applied it when it was
    # stopped; it may apply it now: either outcome is legal, which is the point
    check = open_etcd(etcd_cluster, prefix)
    try:
        assert check.get("k").value in (b"before", b"after")
    finally:
        check.close()


def test_member_without_quorum_is_not_used_and_nothing_is_written(etcd_cluster):
    """With two of three members stopped the last one loses its leader: it
    refuses at once ("no leader", the request carries etcd's hasleader
    requirement), the call ends as StoreUnavailable - not OutcomeUnknown -
    and nothing was written."""
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    etcd = open_etcd(etcd_cluster, prefix, timeout=2.0)
    try:
        etcd.put("k", b"v1")
        etcd_cluster.stop_member(1)
        etcd_cluster.stop_member(2)
        # until its election timeout the last member may still believe in a
        # leader and take a proposal (whose outcome is then unknown: it can
        # commit once the others return); wait until it knows it has none
        wait_for(lambda: etcd_cluster.status().get(0, {}).get("leader") == 0,
                 what="member 0 to lose its leader")
        with pytest.raises(StoreUnavailable) as info:
            etcd.txn([], [("put", "k", b"v2")])
        assert not isinstance(info.value, OutcomeUnknown)
        assert "no leader" in info.value.one_line(), info.value.one_line()
        with pytest.raises(StoreUnavailable):
            etcd.get("k")
        assert etcd.counters["outcome_unknown"] == 0
        etcd_cluster.restart_member(1)
        assert etcd.get("k").value == b"v1"                # v2 was never written
    finally:
        etcd.close()


def test_controller_store_work_with_each_member_stopped(etcd_cluster):
    """What coil-controller does with etcd - paged scans of every address and
    block, address lookups, freeing a gone node's blocks - works with the
    member in use, then the leader, stopped."""
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    etcd = open_etcd(etcd_cluster, prefix)
    store = IPAMStore(etcd)
    try:
        store.create_pool("default", "10.72.0.0/20", 4)
        victims = Victims(etcd_cluster)
        round_ = 0
        while victims.more():
            victim = victims.next(etcd_cluster.endpoints.index(etcd.member_in_use))
            etcd_cluster.stop_member(victim)
            node = f"gone-{round_}"
            blocks = [store.acquire_block("default", node) for _ in range(3)]
            for k, block in enumerate(blocks):
                assert store.assign_address(block, 1, "default", f"p{k}", f"{node}-{k}")
            addrs, _ = store.all_addresses_paged(page_size=2)        # several pages
            assert {a.container_id for a in addrs} == {f"{node}-{k}" for k in range(3)}
            assert {b.cidr for b in store.all_blocks()} == {b.cidr for b in blocks}
            assert store.address_info(addrs[0].address)["node"] == node
            for block in store.node_blocks(node):                    # the Node is gone
                assert store.free_block(block)
            assert store.node_blocks(node) == [] and store.all_addresses_paged()[0] == []
            etcd_cluster.restart_member(victim)
            round_ += 1
        assert any(k.startswith("leader") for k in victims.kinds)
        assert etcd.counters["outcome_unknown"] == 0
    finally:
        store.close()


def make_certs(d: str) -> dict:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client one."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=d)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.crt", "-days", "2", "-subj", "/CN=coil-test-ca")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"),
                      ("client", "extendedKeyUsage=clientAuth")):
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(ext + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN=coil-test-{name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    p = lambda n: os.path.join(d, n)  # noqa: E731
    return {"ca": p("ca.crt"), "cert": p("server.crt"), "key": p("server.key"),
            "client_cert": p("client.crt"), "client_key": p("client.key")}


def test_tls_members_fail_over_too(tmp_path):
    """https members with client certificates: the same failover (member in
    use stopped, then the leader), and coilctl with --etcd-tls-* works."""
    certs = make_certs(str(tmp_path))
    cluster = EtcdCluster(str(tmp_path / "etcd"), size=3, tls=certs)
    os.makedirs(cluster.base_dir)
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    try:
        cluster.start()
        etcd = Etcd(EtcdConfig(endpoints=tuple(cluster.endpoints), prefix=prefix, timeout=5.0,
                               tls_ca=certs["ca"], tls_cert=certs["client_cert"],
                               tls_key=certs["client_key"]))
        try:
            victims = Victims(cluster)
            k = 0
            while victims.more():
                victim = victims.next(cluster.endpoints.index(etcd.member_in_use))
                cluster.stop_member(victim)
                for _ in range(5):
                    etcd.put("k", str(k).encode())
                    assert etcd.get("k").value == str(k).encode()
                    k += 1
                r = hypercoil("coilctl", "--etcd-endpoints", ",".join(cluster.endpoints),
                              "--etcd-prefix", prefix, "--etcd-tls-ca", certs["ca"],
                              "--etcd-tls-cert", certs["client_cert"],
                              "--etcd-tls-key", certs["client_key"], "-o", "json", "pool", "list")
                assert r.returncode == 0, r.stderr
                cluster.restart_member(victim)
            assert etcd.counters["failovers"] >= 1 and etcd.counters["outcome_unknown"] == 0
        finally:
            etcd.close()
        # without a client certificate the members refuse: one clear line
        r = hypercoil("coilctl", "--etcd-endpoints", ",".join(cluster.endpoints),
                      "--etcd-prefix", prefix, "--etcd-tls-ca", certs["ca"],
                      "--etcd-timeout", "2s", "pool", "list")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "--etcd-tls-" in r.stderr
    finally:
        cluster.close()


# -- coilctl ---------------------------------------------------------------------------

def test_coilctl_works_with_each_member_stopped(etcd_cluster):
    """20/20 `pool list` and 5/5 `pool create` with each member stopped in
    turn, the leader included. The stopped member is always the first
    endpoint given (the case that failed 7 times in 20 when the client
    stuck to one randomly picked endpoint); the others are shuffled."""
    from concurrent.futures import ThreadPoolExecutor
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    victims, runs, created = Victims(etcd_cluster), 0, []
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))

    def coilctl(victim, *args):
        others = [ep for i, ep in enumerate(etcd_cluster.endpoints) if i != victim]
        rng.shuffle(others)
        eps = [etcd_cluster.endpoint(victim)] + others
        return hypercoil("coilctl", "--etcd-endpoints", ",".join(eps), "--etcd-prefix", prefix,
                         "-o", "json", *args)

    with ThreadPoolExecutor(3) as pool:
        while victims.more():
            victim = victims.next()
            etcd_cluster.stop_member(victim)
            names = [f"p{len(created) + k}" for k in range(5)]
            creates = [pool.submit(coilctl, victim, "pool", "create", name,
                                   f"10.{100 + len(created) + k}.0.0/24", "4")
                       for k, name in enumerate(names)]
            lists = [pool.submit(coilctl, victim, "pool", "list") for _ in range(20)]
            failures = []
            for what, futures in (("create", creates), ("list", lists)):
                for f in futures:
                    r = f.result()
                    runs += 1
                    if r.returncode != 0:
                        failures.append((what, r.stderr.strip()))
                    elif what == "list":
                        assert isinstance(json.loads(r.stdout), list)
            assert failures == [], f"member {victim} ({victims.kinds[-1]}) stopped: {failures}"
            created += names
            etcd_cluster.restart_member(victim)
    assert any(k.startswith("leader") for k in victims.kinds)
    # every pool created is there, once
    etcd = open_etcd(etcd_cluster, prefix)
    try:
        assert sorted(p.name for p in IPAMStore(etcd).list_pools()) == sorted(created)
    finally:
        etcd.close()
    print(f"\n{runs} coilctl runs, members stopped in turn: {victims.kinds}")


# -- coild -----------------------------------------------------------------------------

class Node:
    """One node namespace with a coild whose --etcd-endpoints lists every
    member (their UNIX sockets: reachable from inside the namespace)."""

    def __init__(self, cluster, prefix, workdir):
        self.node = Netns("node")
        self.pods: dict[str, Netns] = {}
        self.coild = Coild(self.node, workdir, ",".join(cluster.unix_endpoints), prefix)
        self.workdir = workdir
        self.cni = None

    def start(self):
        from coil import launcher_path
        self.coild.start()
        launcher = launcher_path()
        assert launcher, "the native launcher is not built (make core)"
        self.cni = CNI(self.node, self.workdir, coil_conflist(self.coild.socket), launcher)
        return self

    def metrics(self) -> dict:
        status, text = self.coild.rest("GET", "/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line.startswith("coild_") and " " in line:
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def member_in_use(self, cluster) -> int:
        for name, value in self.metrics().items():
            if name.startswith("coild_etcd_member_in_use{") and value == 1:
                url = name.split('endpoint="', 1)[1].split('"', 1)[0]
                return cluster.unix_endpoints.index(url)
        raise AssertionError("coild reports no etcd member in use")

    def close(self):
        self.coild.stop()
        for p in self.pods.values():
            p.delete()
        self.node.delete()


@pytest.fixture
def node(etcd_cluster, tmp_path):
    prefix = f"/fo-{uuid.uuid4().hex[:8]}/"
    n = Node(etcd_cluster, prefix, str(tmp_path))
    n.prefix = prefix
    n.etcd = open_etcd(etcd_cluster, prefix)
    n.store = IPAMStore(n.etcd)
    try:
        yield n
    finally:
        n.close()
        n.etcd.close()


class AddStream(threading.Thread):
    """ADDs one new pod after another through the native launcher, as a
    runtime would: a failed ADD is followed by DEL and another ADD, at most
    ``tries`` times (the bounded retry window)."""

    def __init__(self, node, tries=4):
        super().__init__(daemon=True)
        self.node, self.tries = node, tries
        self.stop_event = threading.Event()
        self.done = 0
        self.results: dict[str, str] = {}          # container id -> pod IP
        self.retried: list[tuple[str, object]] = []
        self.failed: list[tuple[str, object]] = []
        self.latencies: list[float] = []
        self.error = None

    def run(self):
        try:
            k = 0
            while not self.stop_event.is_set():
                cid = f"s{k:04d}"
                pod = Netns("pod")
                self.node.pods[cid] = pod
                for attempt in range(self.tries):
                    t0 = time.monotonic()
                    rc, out = self.node.cni.call("add", pod, cid, "default", cid)
                    self.latencies.append(time.monotonic() - t0)
                    if rc == 0:
                        self.results[cid] = str(ipaddress.ip_interface(
                            out["ips"][0]["address"]).ip)
                        break
                    self.retried.append((cid, out))
                    self.node.cni.call("del", pod, cid, "default", cid)
                else:
                    self.failed.append((cid, out))
                self.done += 1
                k += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_done(self, n):
        target = self.done + n
        wait_for(lambda: self.done >= target or not self.is_alive(), timeout=120,
                 what=f"{n} more ADDs")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_add_stream_survives_each_member_stopped_in_turn(etcd_cluster, node, sig):
    """A stream of ADDs while each member - the one coild uses and the leader
    among them - is stopped and brought back: no ADD fails once its bounded
    retries are done, etcd holds exactly the live pods' addresses (no
    duplicate, no leak), and nothing after a DEL of all."""
    node.store.create_pool("default", "10.70.0.0/22", 3)        # blocks of 8: several taken
    node.start()
    stream = AddStream(node)
    stream.start()
    victims = Victims(etcd_cluster)
    try:
        stream.wait_done(5)
        while victims.more():
            victim = victims.next(node.member_in_use(etcd_cluster))
            etcd_cluster.stop_member(victim, sig)
            stream.wait_done(8)
            assert node.member_in_use(etcd_cluster) != victim
            etcd_cluster.restart_member(victim)
            stream.wait_done(5)
    finally:
        stream.stop_event.set()
        stream.join(180)
    assert stream.error is None, stream.error
    kinds = victims.kinds
    assert kinds[0].endswith("in use") and any(k.startswith("leader") for k in kinds), kinds
    assert stream.failed == [], stream.failed
    metrics = node.metrics()
    print(f"\n{stream.done} ADDs while stopping {kinds}; first tries failed: "
          f"{len(stream.retried)}; max ADD latency {max(stream.latencies):.3f}s; "
          f"median {sorted(stream.latencies)[len(stream.latencies) // 2]:.3f}s")
    print("coild etcd counters:", {k: v for k, v in metrics.items() if "etcd" in k})
    for cid, out in stream.retried:
        print(f"  first try of {cid} failed: {(out or {}).get('msg')}")

    # etcd holds the live pods' addresses, each once, each with its container
    addrs, _ = node.store.all_addresses()
    by_ip = {}
    for a in addrs:
        assert a.address not in by_ip, f"{a.address} held twice"
        by_ip[a.address] = a.container_id
    live = {ip: cid for cid, ip in stream.results.items()}
    assert len(live) == len(stream.results) == stream.done       # no address given twice
    # a transaction with an unknown outcome (the store's OutcomeUnknown) is
    # read back by coild: committed or not, no record is left behind
    assert by_ip == live, (stream.retried, {ip: c for ip, c in by_ip.items() if ip not in live})

    # DEL of everything leaves nothing
    for cid, pod in node.pods.items():
        rc, out = node.cni.call("del", pod, cid, "default", cid)
        assert rc == 0, out
    assert node.store.etcd.count_prefix("ip/") == 0


def test_readyz_follows_etcd_quorum(etcd_cluster, node):
    """/readyz: 200 with a minority down; 503 with a JSON reason when no
    member answers; still 503 with one member back (it has no quorum, so it
    cannot answer for real); 200 again once a quorum is back. /healthz stays
    200 throughout (process liveness)."""
    node.store.create_pool("default", "10.71.0.0/24", 3)
    node.start()
    assert node.coild.rest("GET", "/readyz") == (200, {"status": 200})
    etcd_cluster.stop_member(0)
    assert node.coild.rest("GET", "/readyz") == (200, {"status": 200})
    etcd_cluster.stop_member(1)
    etcd_cluster.stop_member(2)
    status, body = node.coild.rest("GET", "/readyz")
    assert status == 503
    assert body["reason"] == "etcd-unreachable" and body["status"] == 503
    assert "no etcd member answered" in body["error"]
    assert node.coild.rest("GET", "/healthz") == (200, {"status": 200})
    etcd_cluster.start_member(2, state="existing")
    wait_for(lambda: etcd_cluster.alive(2) and os.path.exists(
        etcd_cluster.data_dir(2) + ".sock:0"), what="member 2 listening")
    status, body = node.coild.rest("GET", "/readyz")
    assert status == 503 and body["reason"] == "etcd-unreachable", body
    etcd_cluster.start_member(0, state="existing")
    etcd_cluster.wait_healthy([0, 2])
    assert wait_for(lambda: node.coild.rest("GET", "/readyz")[0] == 200, timeout=30,
                    what="/readyz 200 after a quorum is back")
    # and it serves again
    pod = Netns("pod")
    node.pods["r1"] = pod
    rc, out = node.cni.call("add", pod, "r1", "default", "r1")
    assert rc == 0, out
