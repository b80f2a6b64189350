"""coil-controller against a real kube-apiserver (1.20) and a real etcd.

The controller authenticates with a token of its own ServiceAccount, bound
only by the RBAC objects in deploy/rbac.yaml (tokens are minted with the
TokenRequest API). Node deletions free blocks in etcd; the watch survives an
API server restart and a 410 Gone; the leak scan over 100,000 planted
addresses finds exactly the planted leaks; faults never free anything.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from helpers import REPO, EtcdServer, FakeClock, free_port, wait_for
from leakdata import create_pods, delete_pods, iso, plant_addresses, pod_manifest

pytestmark = [pytest.mark.etcd]

DEPLOY = os.path.join(REPO, "deploy")


# -- fixtures and helpers ------------------------------------------------------------
def load_deploy(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return [d for d in yaml.safe_load_all(f) if d]


@pytest.fixture(scope="module")
def rbac(kube_apiserver):
    """deploy/rbac.yaml applied; tokens of both service accounts."""
    kube_apiserver.apply(load_deploy("rbac.yaml"))
    return {"controller": kube_apiserver.service_account_token("kube-system", "coil-controller"),
            "coild": kube_apiserver.service_account_token("kube-system", "coild")}


@pytest.fixture
def admin(kube_apiserver):
    return kube_apiserver.core()


@pytest.fixture
def controller_core(kube_apiserver, rbac):
    return kube_apiserver.core(rbac["controller"])


@pytest.fixture
def namespace(admin):
    name = f"coiltest-{uuid.uuid4().hex[:8]}"
    admin.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        delete_pods(admin, name)


def unique(prefix="n"):
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def create_node(core, name, taints=None):
    body = {"metadata": {"name": name}}
    if taints:
        body["spec"] = {"taints": taints}
    return core.create_node(body)


def status_of(fn, *args, **kwargs) -> int:
    """HTTP status of an API call (200 when it succeeds)."""
    from kubernetes.client.exceptions import ApiException
    try:
        fn(*args, **kwargs)
        return 200
    except ApiException as exc:
        return exc.status


def block_nodes(store):
    return sorted({b.node for b in store.all_blocks()})


def take_blocks(store, node, n=1, addresses=2):
    blocks = []
    for _ in range(n):
        b = store.acquire_block("default", node)
        for off in range(addresses):
            assert store.assign_address(b, off, "ns", f"pod-{node}-{off}", f"c-{off}")
        blocks.append(b)
    return blocks


class ControllerProcess:
    """``python -m coil coil-controller`` as a subprocess; stopped by PID."""

    def __init__(self, tmp_path, kubeconfig, etcd_config, *args, port=None):
        self.port = port or free_port()
        self.log_path = tmp_path / f"controller-{self.port}-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "coil", "coil-controller",
               "--etcd-endpoints", etcd_config.endpoints[0], "--etcd-prefix", etcd_config.prefix,
               "--metrics-addr", f"127.0.0.1:{self.port}", "--kubeconfig", kubeconfig, *args]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def metric(self, name, labels=""):
        from prometheus_client.parser import text_string_to_metric_families
        _, text = self.get("/metrics")
        want = dict(kv.split("=", 1) for kv in labels.split(",") if kv)
        total = None
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in want.items()):
                    total = (total or 0) + sample.value
        return total

    def wait_ready(self, timeout=60):
        wait_for(lambda: self.proc.poll() is not None or self.get("/readyz")[0] == 200,
                 timeout, what="coil-controller ready")
        assert self.proc.poll() is None, self.logs()

    def logs(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def log_records(self):
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def run_controller(tmp_path, kube_apiserver, rbac, etcd_config):
    started = []

    def start(*args, token=None, port=None):
        kc = kube_apiserver.kubeconfig(token or rbac["controller"], str(tmp_path / "kubeconfig"))
        p = ControllerProcess(tmp_path, kc, etcd_config, *args, port=port)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


# -- RBAC -------------------------------------------------------------------------------
def test_rbac_grants_exactly_what_is_needed(kube_apiserver, rbac, admin):
    node = unique()
    create_node(admin, node)
    ctl = kube_apiserver.core(rbac["controller"])
    dmn = kube_apiserver.core(rbac["coild"])
    try:
        # coil-controller: nodes get/list/watch, pods list, its Endpoints
        assert status_of(ctl.list_node) == 200
        assert status_of(ctl.read_node, node) == 200
        assert status_of(ctl.list_node, watch=True, timeout_seconds=1,
                         _preload_content=False) == 200
        assert status_of(ctl.list_pod_for_all_namespaces, limit=1) == 200
        assert status_of(ctl.read_namespaced_endpoints, "coil-etcd", "kube-system") in (200, 404)
        # ... and nothing more
        assert status_of(ctl.delete_node, node) == 403
        assert status_of(ctl.patch_node, node, {"metadata": {"labels": {"x": "y"}}}) == 403
        assert status_of(ctl.list_namespaced_secret, "kube-system") == 403
        assert status_of(ctl.list_secret_for_all_namespaces) == 403
        assert status_of(ctl.read_namespaced_endpoints, "kubernetes", "default") == 403
        assert status_of(ctl.list_namespaced_endpoints, "kube-system") == 403
        assert status_of(ctl.create_namespaced_pod, "default",
                         pod_manifest("x")[0]) == 403
        # coild (and its init container coil-installer): get/patch nodes
        assert status_of(dmn.read_node, node) == 200
        assert status_of(dmn.patch_node, node, {"metadata": {"labels": {"x": "y"}}}) == 200
        assert status_of(dmn.read_namespaced_endpoints, "coil-etcd", "kube-system") in (200, 404)
        assert status_of(dmn.delete_node, node) == 403
        assert status_of(dmn.list_node) == 403
        assert status_of(dmn.list_pod_for_all_namespaces) == 403
        assert status_of(dmn.list_namespaced_secret, "kube-system") == 403
    finally:
        admin.delete_node(node)


# -- deleted nodes ------------------------------------------------------------------------
def wait_idle(c):
    """The janitor has nothing due (after a ``wake()``)."""
    c.janitor.wake()
    time.sleep(0.05)
    wait_for(c.janitor.idle.is_set, what="janitor idle")


def test_deleted_nodes_blocks_are_freed_after_the_grace_period(store, controller_core, admin):
    """The whole controller (watch, janitor threads) on a fake clock: blocks
    of a missing Node are kept for the grace period, then freed."""
    from coil.controller.main import Controller
    store.create_pool("default", "10.200.0.0/20", 4)
    a, b, gone = unique(), unique(), unique()
    create_node(admin, a)
    create_node(admin, b)
    clock = FakeClock()
    c = Controller(store, controller_core, scan_interval=3600, node_grace=300, clock=clock)
    try:
        take_blocks(store, a, 2)
        take_blocks(store, b, 1)
        take_blocks(store, gone, 2)          # a node that no longer exists
        assert block_nodes(store) == sorted([a, b, gone])
        c.start()
        wait_for(lambda: gone in c.janitor.waiting(), what="orphan seen")
        wait_idle(c)
        assert block_nodes(store) == sorted([a, b, gone])      # kept: grace period
        wait_for(lambda: c.metrics.nodes_waiting._value.get() == 1, what="metric")
        clock.advance(299)
        wait_idle(c)
        assert gone in block_nodes(store)
        clock.advance(2)
        wait_for(lambda: gone not in block_nodes(store), what="orphan blocks freed")
        assert block_nodes(store) == sorted([a, b])
        assert store.etcd.count_prefix("ip/") == 6
        # a Node deleted while watching: kept for the grace period, then freed
        admin.delete_node(a)
        wait_for(lambda: a in c.janitor.waiting(), what="deletion seen")
        wait_idle(c)
        assert a in block_nodes(store)
        clock.advance(301)
        wait_for(lambda: a not in block_nodes(store), what="blocks of deleted node freed")
        assert block_nodes(store) == [b]
        assert store.etcd.count_prefix("ip/") == 2
        assert store.etcd.count_prefix(f"node-block/{a}/") == 0
        assert c.metrics.blocks_freed._value.get() == 4
        assert c.metrics.nodes_cleaned._value.get() == 2
        assert c.metrics.addresses_freed._value.get() == 8
        wait_for(lambda: c.metrics.nodes_waiting._value.get() == 0, what="metric")
        assert c.healthy()
    finally:
        c.shutdown()
        for n in (a, b):
            status_of(admin.delete_node, n)


def test_controller_process_keeps_a_deleted_nodes_blocks(run_controller, store, admin):
    """The issue's reproduction: one 404 for a Node no longer frees anything."""
    store.create_pool("default", "10.207.0.0/20", 4)
    n = unique()
    create_node(admin, n)
    take_blocks(store, n, 2)
    ctl = run_controller("--scan-interval", "1h")
    ctl.wait_ready()
    admin.delete_node(n)
    wait_for(lambda: ctl.metric("coil_controller_gone_nodes_waiting") == 1, what="node seen gone")
    assert block_nodes(store) == [n] and store.etcd.count_prefix("ip/") == 4
    assert any(r["msg"] == "node is gone; its blocks are kept for the grace period"
               and r["grace_s"] == 300 for r in ctl.log_records())
    assert ctl.stop() == 0


def test_recreated_node_keeps_its_blocks(store, controller_core, admin):
    """A node deleted and registered again within the grace period keeps its
    blocks; a later deletion starts the grace period again."""
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.201.0.0/20", 4)
    n = unique()
    create_node(admin, n)
    clock = FakeClock()
    janitor = NodeJanitor(store, controller_core, grace=300, clock=clock)
    try:
        take_blocks(store, n)
        assert janitor.check_node(n) == (0, None)          # it exists: nothing to do
        admin.delete_node(n)
        janitor.node_deleted(n)
        assert janitor.check_node(n) == (0, clock() + 300)
        clock.advance(200)
        create_node(admin, n)                                # back within the grace period
        clock.advance(200)
        assert janitor.check_node(n) == (0, None)
        assert n not in janitor.waiting() and block_nodes(store) == [n]
        admin.delete_node(n)
        janitor.node_deleted(n)
        assert janitor.check_node(n)[0] == 0                 # the grace starts again
        clock.advance(299)
        assert janitor.check_node(n)[0] == 0
        # deleted and re-created between two looks: the DELETED event restarts the count
        janitor.node_deleted(n)
        clock.advance(100)
        assert janitor.check_node(n)[0] == 0
        assert block_nodes(store) == [n]
        clock.advance(200)
    finally:
        status_of(admin.delete_node, n)
    assert janitor.check_node(n) == (1, None)
    assert block_nodes(store) == []


def test_watch_survives_apiserver_restart(kube_apiserver, store, controller_core, admin,
                                          caplog):
    from coil.controller.main import Controller
    store.create_pool("default", "10.202.0.0/20", 4)
    a, b = unique(), unique()
    create_node(admin, a)
    create_node(admin, b)
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    c = Controller(store, controller_core, scan_interval=3600, node_grace=60, clock=clock)
    try:
        take_blocks(store, a)
        take_blocks(store, b)
        c.start()
        wait_for(c.ready, what="controller ready")
        kube_apiserver.restart()
        admin = kube_apiserver.core()
        admin.delete_node(a)
        wait_for(lambda: a in c.janitor.waiting(), timeout=90,
                 what="deletion seen after the API server restarted")
        clock.advance(61)
        wait_for(lambda: a not in block_nodes(store), what="blocks freed")
        assert block_nodes(store) == [b]
        assert c.healthy()
        assert c.metrics.watch_restarts.labels("error")._value.get() >= 1
        assert any(r.getMessage() in ("watching nodes failed; retrying",
                                      "listing nodes failed; retrying")
                   and r.levelno == logging.WARNING and hasattr(r, "retry_s")
                   for r in caplog.records)
        # later deletions still arrive through the resumed watch
        admin.delete_node(b)
        wait_for(lambda: b in c.janitor.waiting(), what="second deletion seen")
        clock.advance(61)
        wait_for(lambda: block_nodes(store) == [], what="second node freed")
    finally:
        c.shutdown()
        for n in (a, b):
            status_of(kube_apiserver.core().delete_node, n)


# -- node liveness: a real coild on a real node namespace -------------------------------
@pytest.fixture
def coild_node(etcd_server, etcd_prefix, tmp_path, admin):
    """``start(name)``: a Node object and a coild for it (liveness TTL 3 s)."""
    from harness import Coild, Netns
    made = []

    def start(name):
        create_node(admin, name)
        ns = Netns("node")
        d = Coild(ns, str(tmp_path / name), etcd_server.unix_endpoint, etcd_prefix,
                  node_name=name, extra=["--liveness-ttl", "3s"])
        os.makedirs(d.workdir, exist_ok=True)
        made.append((name, ns, d))
        d.start()
        return d

    try:
        yield start
    finally:
        for name, ns, d in made:
            d.stop()
            ns.delete()
            status_of(admin.delete_node, name)


def alive(store, node):
    from coil.store import liveness
    return liveness.read(store.etcd, node) is not None


def test_node_deleted_while_coild_runs_keeps_everything(store, controller_core, admin,
                                                        coild_node, caplog):
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.208.0.0/20", 4)
    n = unique()
    take_blocks(store, n, 2)
    coild_node(n)
    assert alive(store, n)
    clock = FakeClock()
    caplog.set_level(logging.INFO)
    janitor = NodeJanitor(store, controller_core, grace=300, recheck=30, clock=clock)
    admin.delete_node(n)                             # kubectl delete node, node still running
    janitor.node_deleted(n)
    assert janitor.check_node(n) == (0, clock() + 300)
    for _ in range(3):                                # long after the grace period
        clock.advance(400)
        assert janitor.check_node(n) == (0, clock() + 30)
    assert block_nodes(store) == [n] and store.etcd.count_prefix("ip/") == 4
    assert n in janitor.waiting()
    assert [r.getMessage() for r in caplog.records].count(
        "node object is gone but its coild is alive; blocks are kept") == 1


def test_killed_coild_and_deleted_node_are_freed_after_grace_and_lease(
        store, controller_core, admin, coild_node):
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.209.0.0/20", 4)
    n = unique()
    take_blocks(store, n, 2)
    d = coild_node(n)
    clock = FakeClock()
    janitor = NodeJanitor(store, controller_core, grace=300, recheck=30, clock=clock)
    d.stop(signal.SIGKILL)
    admin.delete_node(n)
    janitor.node_deleted(n)
    assert janitor.check_node(n) == (0, clock() + 300)       # grace period
    clock.advance(301)
    if alive(store, n):                                      # the lease may still run
        assert janitor.check_node(n) == (0, clock() + 30)
        assert block_nodes(store) == [n]
    wait_for(lambda: not alive(store, n), timeout=20, what="lease expired")
    clock.advance(30)
    assert janitor.check_node(n) == (2, None)
    assert block_nodes(store) == [] and store.etcd.count_prefix("ip/") == 0
    assert n not in janitor.waiting()


def test_coild_killed_then_node_deleted_waits_for_grace(store, controller_core, admin,
                                                        coild_node):
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.210.0.0/20", 4)
    n = unique()
    take_blocks(store, n)
    coild_node(n).stop(signal.SIGKILL)
    wait_for(lambda: not alive(store, n), timeout=20, what="lease expired")
    clock = FakeClock()
    janitor = NodeJanitor(store, controller_core, grace=300, clock=clock)
    admin.delete_node(n)
    janitor.node_deleted(n)
    assert janitor.check_node(n)[0] == 0                    # lease gone, grace not yet
    clock.advance(299)
    assert janitor.check_node(n)[0] == 0
    assert block_nodes(store) == [n]
    clock.advance(1)
    assert janitor.check_node(n) == (1, None)


def test_node_recreated_within_grace_keeps_everything(store, controller_core, admin,
                                                      coild_node):
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.211.0.0/20", 4)
    n = unique()
    take_blocks(store, n, 2)
    coild_node(n).stop(signal.SIGKILL)
    wait_for(lambda: not alive(store, n), timeout=20, what="lease expired")
    clock = FakeClock()
    janitor = NodeJanitor(store, controller_core, grace=300, clock=clock)
    admin.delete_node(n)
    janitor.node_deleted(n)
    assert janitor.check_node(n)[0] == 0
    clock.advance(120)
    create_node(admin, n)                                   # the kubelet registers again
    clock.advance(600)
    assert janitor.check_node(n) == (0, None)
    assert block_nodes(store) == [n] and store.etcd.count_prefix("ip/") == 4
    assert n not in janitor.waiting()


def test_coild_coming_back_during_the_release_wins(store, controller_core, admin, coild_node,
                                                   etcd_server, etcd_prefix, tmp_path,
                                                   monkeypatch):
    """coild starts again between the janitor's last look and its release
    transaction: the transaction's liveness compare fails, nothing is freed."""
    from coil.controller.janitor import NodeJanitor
    store.create_pool("default", "10.212.0.0/20", 4)
    n = unique()
    take_blocks(store, n, 2)
    d = coild_node(n)
    d.stop(signal.SIGKILL)
    wait_for(lambda: not alive(store, n), timeout=20, what="lease expired")
    admin.delete_node(n)
    clock = FakeClock()
    janitor = NodeJanitor(store, controller_core, grace=300, clock=clock)
    janitor.node_deleted(n)
    janitor.check_node(n)
    clock.advance(301)
    real_free = store.free_block
    calls = []

    def coild_returns_first(block):
        if not calls:
            d.start()                         # writes node-alive/<n> before anything else
            assert alive(store, n)
        calls.append(block.cidr)
        return real_free(block)

    monkeypatch.setattr(store, "free_block", coild_returns_first)
    freed, again = janitor.check_node(n)
    assert freed == 0 and again == clock() + janitor.recheck
    assert len(calls) == 1                               # the guarded txn was tried, and failed
    assert block_nodes(store) == [n] and store.etcd.count_prefix("ip/") == 4
    status, body = d.rest("GET", "/status")              # and coild holds its blocks again
    assert status == 200 and len(body["address-blocks"]["default"]) == 2


def test_watch_relists_after_410_gone(kube_apiserver, rbac):
    """A resourceVersion older than the API server's watch cache is answered with
    410 Gone. A restart re-initialises that cache at the current revision, so
    after it resourceVersion "1" is expired whatever ran before this test."""
    from coil.controller.metrics import ControllerMetrics
    from coil.controller.watcher import NodeWatcher, WatchExpired
    kube_apiserver.restart()
    admin = kube_apiserver.core()
    controller_core = kube_apiserver.core(rbac["controller"])
    n = unique()
    create_node(admin, n)
    synced, deleted = [], []
    metrics = ControllerMetrics()
    w = NodeWatcher(controller_core, synced.append, deleted.append, metrics=metrics,
                    watch_timeout=5)
    try:
        # a resourceVersion far in the past is answered with 410 Gone
        with pytest.raises(Exception) as info:
            w.watch("1")
        assert isinstance(info.value, WatchExpired) or getattr(info.value, "status", 0) == 410
        # the loop, fed an expired resourceVersion, relists and carries on
        names, rv = w.list_nodes()
        assert n in names
        t = threading.Thread(target=w.run, args=("1",), daemon=True)   # resume from rv 1
        t.start()
        wait_for(lambda: synced, what="relist")
        assert n in synced[0]
        assert metrics.watch_restarts.labels("expired")._value.get() == 1
        wait_for(lambda: w.synced.is_set() and w.resource_version not in (None, "1"),
                 what="watching again")
        time.sleep(0.5)
        admin.delete_node(n)
        wait_for(lambda: n in deleted, what="deletion seen by the new watch")
    finally:
        w.stop()
        status_of(admin.delete_node, n)


# -- leak scan -----------------------------------------------------------------------------
SCAN_N = 100_000


def test_leak_scan_100k_finds_exactly_the_planted_leaks(store, controller_core, admin,
                                                        namespace):
    """100,000 addresses in etcd, a few hundred Pods through the API.

    Planted (indexes into the planted list):
      old & no Pod           -> leaks (i % 400 == 7), some in a foreign time format
      old & a Running Pod    -> kept (i % 400 == 9)
      old & a Succeeded Pod  -> kept (i % 4000 == 11)
      young & no Pod         -> not yet leaks (everything else)
    Pods with addresses etcd does not hold: in a pool -> unknown (errors);
    outside every pool, hostNetwork, or finished -> ignored.
    """
    from coil.controller.metrics import ControllerMetrics
    from coil.controller.scan import LeakScanner
    now = time.time()
    old, young = iso(now - 3 * 86400), iso(now - 600)

    def created(i):
        if i % 400 in (7, 9) or i % 4000 == 11:
            return "2020-01-01T00:00:00Z" if i % 2000 == 7 else old
        return young

    t0 = time.monotonic()
    planted = plant_addresses(store, "default", "10.64.0.0/12", SCAN_N,
                              [f"scan-node-{k}" for k in range(8)], created)
    plant_s = time.monotonic() - t0
    leaks = {addr for i, (addr, _, _) in enumerate(planted) if i % 400 == 7}
    held_running = [addr for i, (addr, _, _) in enumerate(planted) if i % 400 == 9]
    held_done = [addr for i, (addr, _, _) in enumerate(planted) if i % 4000 == 11]
    unknown = {f"10.79.255.{k}" for k in range(1, 21)}          # in the pool, not held
    pods = []
    for k, ip in enumerate(held_running):
        pods.append(pod_manifest(f"run-{k}", [ip, f"fd00::{k + 1:x}"]))
    for k, ip in enumerate(held_done):
        pods.append(pod_manifest(f"done-{k}", [ip], phase="Succeeded"))
    for k, ip in enumerate(sorted(unknown)):
        pods.append(pod_manifest(f"unknown-{k}", [ip], phase="Pending", node="scan-node-0"))
    for k in range(10):
        pods.append(pod_manifest(f"outside-{k}", [f"192.168.77.{k + 1}"]))
        pods.append(pod_manifest(f"hostnet-{k}", [f"10.79.254.{k + 1}"], host_network=True))
        pods.append(pod_manifest(f"finished-{k}", [f"10.79.253.{k + 1}"], phase="Failed"))
    pods.append(pod_manifest("no-ip-yet"))
    create_pods(admin, namespace, pods)
    assert len(leaks) == 250 and len(held_running) == 250 and len(held_done) == 25
    assert len(pods) == 326

    metrics = ControllerMetrics()
    scanner = LeakScanner(store, controller_core, expiration=86400, metrics=metrics,
                          page_size=100)
    calls_before = store.etcd.counters["calls"]
    t0 = time.monotonic()
    result = scanner.scan()
    scan_s = time.monotonic() - t0
    etcd_calls = store.etcd.counters["calls"] - calls_before
    print(f"\nplanted {SCAN_N} addresses in {plant_s:.1f}s; scan took {scan_s:.2f}s "
          f"and {etcd_calls} etcd requests")
    assert result.addresses == SCAN_N
    assert result.pods >= len(pods)
    assert {lk.address.address for lk in result.leaks} == leaks
    assert {u.ip for u in result.unknown} == unknown
    assert {u.node for u in result.unknown} == {"scan-node-0"}
    assert all(lk.age is not None and lk.age > 86400 for lk in result.leaks)
    assert result.released == 0
    assert store.etcd.count_prefix("ip/") == SCAN_N
    # the scan reads etcd in pages of 5,000 keys (every address, then the
    # blocks) and rechecks each of the 20 unknown Pod IPs by itself (two
    # reads each): about 60 requests, never one per address (100,000) or per
    # Pod (326). Speed itself is bench/'s job.
    assert 2 * len(unknown) <= etcd_calls <= 100, etcd_calls
    assert metrics.leaked._value.get() == 250
    assert metrics.unknown._value.get() == 20
    from prometheus_client import generate_latest
    text = generate_latest(metrics.registry).decode()
    assert 'coil_controller_addresses_in_use{pool="default"} 100000.0' in text
    assert 'coil_controller_blocks{node="scan-node-0",pool="default"} 391.0' in text

    # --release-leaked: exactly the leaks go, everything else stays; only on
    # the second look, at least one scan interval after the first
    clock = FakeClock(time.time())
    releaser = LeakScanner(store, controller_core, expiration=86400, release=True, clock=clock,
                           min_gap=600)
    result = releaser.scan()
    assert result.released == 0 and result.suspects == 250
    assert store.etcd.count_prefix("ip/") == SCAN_N
    clock.advance(599)
    assert releaser.scan().released == 0                 # too early for a second look
    clock.advance(1)
    result = releaser.scan()
    assert result.released == 250
    assert store.etcd.count_prefix("ip/") == SCAN_N - 250
    remaining = {a.address for a in store.all_addresses_paged()[0]}
    assert not (remaining & leaks)
    assert set(held_running) <= remaining and set(held_done) <= remaining
    assert releaser.scan().leaks == []


def test_leak_release_exemptions_and_two_looks(store, controller_core, admin, namespace):
    """What the leak release may free, on a fake clock: CNI records and REST
    records whose owner opted in, each only after two looks a scan interval
    apart at the same record; never REST records without the opt-in,
    records of unknown origin, nor the address of a Pod that exists and has
    no IP yet (Pending)."""
    import json as _json

    from coil.controller.scan import LeakScanner
    from coil.store import keys
    now = time.time()
    kinds = {0: {"origin": "cni", "network": "k8s", "ifname": "eth0"},
             1: {"origin": "rest"},
             2: {"origin": "rest", "release_if_leaked": True},
             3: {},                                              # an older coild's record
             4: {"origin": "cni", "network": "k8s", "ifname": "eth0",
                 "namespace": namespace, "pod": "waiting"},       # its Pod has no IP yet
             5: {"origin": "cni", "network": "k8s", "ifname": "eth0"}}
    planted = plant_addresses(store, "default", "10.213.0.0/24", 6, ["gone-node"],
                              lambda i: iso(now - 7200), record=lambda i: kinds[i])
    addr = [p[0] for p in planted]
    create_pods(admin, namespace, [pod_manifest("waiting")])          # Pending, no IP
    clock = FakeClock(now)
    scanner = LeakScanner(store, controller_core, expiration=3600, release=True, clock=clock,
                          min_gap=600)
    first = scanner.scan()
    assert {lk.address.address for lk in first.leaks} == {addr[i] for i in (0, 1, 2, 3, 5)}
    assert (first.released, first.exempt, first.suspects) == (0, 2, 3)
    assert store.etcd.count_prefix("ip/") == 6
    # record 5 is written anew between the looks (another owner): its first look is void
    _, cidr, off = planted[5]
    kv = store.etcd.get(keys.ip(cidr, off))
    assert store.etcd.txn([("mod", keys.ip(cidr, off), "==", kv.mod_revision)],
                          [("put", keys.ip(cidr, off),
                            _json.dumps(dict(_json.loads(kv.value), container_id="new")).encode())])[0]
    clock.advance(599)
    assert scanner.scan().released == 0                     # less than one interval later
    clock.advance(1)
    second = scanner.scan()
    assert second.released == 2
    held_now = {a.address for a in store.all_addresses_paged()[0]}
    assert held_now == {addr[i] for i in (1, 3, 4, 5)}
    clock.advance(600)
    assert scanner.scan().released == 1                     # record 5, on its own two looks
    assert {a.address for a in store.all_addresses_paged()[0]} == {addr[i] for i in (1, 3, 4)}


def test_leak_scan_judges_a_secondary_attachment_by_its_pod(store, controller_core, admin,
                                                           namespace):
    """A Multus secondary attachment's address (ifname net1) is in no
    ``status.podIPs``: while the Pod its record names exists it is no leak;
    once no such Pod exists it is, and the release frees it (two looks)."""
    from coil.controller.scan import LeakScanner
    now = time.time()
    net1 = {"origin": "cni", "network": "macvlan-b", "ifname": "net1", "namespace": namespace}
    kinds = {0: {"origin": "cni", "network": "k8s", "ifname": "eth0", "namespace": namespace,
                 "pod": "multus"},
             1: dict(net1, pod="multus"),                       # its Pod runs, eth0's IP posted
             2: dict(net1, pod="gone")}                         # no such Pod
    planted = plant_addresses(store, "default", "10.214.0.0/24", 3, ["gone-node"],
                              lambda i: iso(now - 7200), record=lambda i: kinds[i])
    addr = [p[0] for p in planted]
    create_pods(admin, namespace, [pod_manifest("multus", [addr[0]])])
    clock = FakeClock(now)
    scanner = LeakScanner(store, controller_core, expiration=3600, release=True, clock=clock,
                          min_gap=600)
    first = scanner.scan()
    assert [lk.address.address for lk in first.leaks] == [addr[2]]
    clock.advance(600)
    assert scanner.scan().released == 1
    assert {a.address for a in store.all_addresses_paged()[0]} == {addr[0], addr[1]}


def test_controller_process_reports_and_releases_leaks(run_controller, store, admin,
                                                        namespace):
    now = time.time()
    planted = plant_addresses(store, "default", "10.203.0.0/20", 64, ["leak-node"],
                              lambda i: iso(now - 7200) if i < 10 else iso(now))
    create_node(admin, "leak-node")
    try:
        # addresses 0..4 are used by Pods; 5..9 are old and unused: leaks
        create_pods(admin, namespace, [pod_manifest(f"p{i}", [planted[i][0]]) for i in range(5)])
        ctl = run_controller("--scan-interval", "2s", "--address-expiration", "1h")
        ctl.wait_ready()
        wait_for(lambda: ctl.metric("coil_controller_leaked_addresses") == 5, what="report")
        assert store.etcd.count_prefix("ip/") == 64            # reported, not freed
        leaked = {r["address"] for r in ctl.log_records()
                  if r["msg"] == "leaked address: held in etcd but used by no Pod"}
        assert leaked == {planted[i][0] for i in range(5, 10)}
        assert ctl.metric("coil_controller_scan_duration_seconds_count") >= 1
        assert ctl.metric("coil_controller_addresses_in_use", "pool=default") == 64
        assert ctl.stop() == 0

        # the release needs two scans, one interval apart, that both found the leak
        ctl = run_controller("--scan-interval", "2s", "--address-expiration", "1h",
                             "--release-leaked")
        wait_for(lambda: store.etcd.count_prefix("ip/") == 59, what="leaks released")
        wait_for(lambda: ctl.metric("coil_controller_leaked_addresses_released_total") == 5,
                 what="metrics")
        kept = {a.address for a in store.all_addresses_paged()[0]}
        assert {planted[i][0] for i in range(5)} <= kept
        assert ctl.stop() == 0
    finally:
        admin.delete_node("leak-node")


# -- faults -------------------------------------------------------------------------------
class _Erroring(BaseHTTPRequestHandler):
    """An API server that answers every request with 500, after ``delay``
    seconds (a slow or loaded API server)."""

    delay = 0.0

    def do_GET(self):
        time.sleep(self.delay)
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "message": "etcdserver: request timed out", "code": 500}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(params=["unreachable", "http-500", "slow-500"])
def broken_api(request):
    """"slow-500" answers after 2.1 s: two failed calls cannot both end
    within 4 s, as on a loaded machine (a test that counted the retries of
    a fixed sleep failed there)."""
    from kubernetes import client
    conf = client.Configuration()
    server = None
    if request.param == "unreachable":
        conf.host = f"https://127.0.0.1:{free_port()}"     # nothing listens there
    else:
        handler = type("Handler", (_Erroring,),
                       {"delay": 2.1 if request.param == "slow-500" else 0.0})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        conf.host = f"http://127.0.0.1:{server.server_address[1]}"
    conf.retries = 0
    try:
        yield client.CoreV1Api(client.ApiClient(conf))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()


def test_api_failures_retry_with_backoff_and_free_nothing(store, broken_api, caplog):
    from coil.controller.main import Controller
    now = time.time()
    plant_addresses(store, "default", "10.204.0.0/20", 32, ["ghost-node"],
                    lambda i: iso(now - 10 * 86400))
    caplog.set_level(logging.INFO)
    c = Controller(store, broken_api, scan_interval=3600, address_expiration=60,
                   release_leaked=True)
    c.scan_backoff.initial = c.scan_backoff._next = 0.2

    def retries(msg):
        return [r for r in list(caplog.records)
                if r.name.startswith("coil-controller") and r.getMessage() == msg]

    def node_retries():
        return retries("listing nodes failed; retrying")

    def scan_retries():
        return retries("leak scan failed: nothing was freed; retrying")

    c.start()
    try:
        # counted, not timed: wait for two failures of each loop however
        # slow the machine (or the API server) is
        wait_for(lambda: len(node_retries()) >= 2 and len(scan_retries()) >= 2,
                 timeout=120, what="two retries of the node list and of the leak scan")
        assert c.healthy()
        assert not c.ready()
    finally:
        c.shutdown()
    # nothing freed: not the "ghost" node's block, not the old addresses
    assert block_nodes(store) == ["ghost-node"]
    assert store.etcd.count_prefix("ip/") == 32
    node_retries, scan_retries = node_retries(), scan_retries()
    assert len(node_retries) >= 2 and len(scan_retries) >= 2
    delays = [r.retry_s for r in node_retries]
    assert delays[1] > delays[0]                     # backing off
    assert all(r.levelno == logging.WARNING and r.error for r in node_retries + scan_retries)
    assert c.metrics.scans.labels("error")._value.get() >= 2


def test_failed_pod_list_never_counts_as_no_pods(store, controller_core, admin, namespace,
                                                 kube_apiserver):
    """A Pod list that fails midway (pagination) or is forbidden frees nothing."""
    from kubernetes.client.exceptions import ApiException

    from coil.controller.scan import LeakScanner
    now = time.time()
    planted = plant_addresses(store, "default", "10.205.0.0/20", 16, ["n"],
                              lambda i: iso(now - 10 * 86400))
    create_pods(admin, namespace, [pod_manifest(f"p{i}", [planted[i][0]]) for i in range(6)])

    class FailingSecondPage:
        def __init__(self, core):
            self.core, self.calls = core, 0

        def list_pod_for_all_namespaces(self, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise ApiException(status=500, reason="Internal Server Error")
            return self.core.list_pod_for_all_namespaces(**kwargs)

    failing = FailingSecondPage(controller_core)
    with pytest.raises(ApiException):
        LeakScanner(store, failing, expiration=60, release=True, page_size=2).scan()
    assert failing.calls == 2
    assert store.etcd.count_prefix("ip/") == 16
    # a token that may not list Pods: 403, nothing freed
    forbidden = kube_apiserver.core(kube_apiserver.service_account_token("kube-system", "coild"))
    with pytest.raises(ApiException) as info:
        LeakScanner(store, forbidden, expiration=60, release=True).scan()
    assert info.value.status == 403
    assert store.etcd.count_prefix("ip/") == 16
    # with a working list, only the 10 unused addresses go (on the second look)
    clock = FakeClock(time.time())
    scanner = LeakScanner(store, controller_core, expiration=60, release=True, page_size=2,
                          clock=clock, min_gap=60)
    assert scanner.scan().released == 0
    clock.advance(60)
    result = scanner.scan()
    assert result.released == 10
    assert {a.address for a in store.all_addresses_paged()[0]} == {p[0] for p in planted[:6]}


def test_node_cleanup_waits_for_etcd(tmp_path, controller_core, admin, caplog):
    """etcd down when a Node is deleted: the cleanup is retried until it works.

    The blocks are in etcd before it goes down, so the first look that
    reaches etcd again must find and free them (no race with the test
    writing them while the janitor retries)."""
    from coil.config import EtcdConfig
    from coil.controller.janitor import NodeJanitor
    from coil.controller.watcher import Backoff
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    server = EtcdServer(str(tmp_path / "etcd"))
    server.start()
    store = IPAMStore(Etcd(EtcdConfig(endpoints=(server.endpoint,), prefix="/late/",
                                      timeout=1.0)))
    n = unique()
    store.create_pool("default", "10.206.0.0/20", 4)
    take_blocks(store, n)
    take_blocks(store, "other-gone")
    server.stop()
    caplog.set_level(logging.INFO)
    janitor = NodeJanitor(store, controller_core, backoff=Backoff(0.2, 1.0),
                          grace=0.0)            # the grace period is tested elsewhere
    t = threading.Thread(target=janitor.run, daemon=True)
    t.start()
    try:
        janitor.node_deleted(n)
        janitor.nodes_synced(set())
        wait_for(lambda: sum("will retry" in r.getMessage() for r in caplog.records) >= 2,
                 what="the janitor to fail and retry")
        assert t.is_alive()
        server.start()

        def cleaned():
            from coil.errors import StoreUnavailable
            try:
                return block_nodes(store) == []
            except StoreUnavailable:
                return False
        wait_for(cleaned, timeout=30, what="cleanup after etcd came up")
        wait_for(janitor.idle.is_set, what="idle")
    finally:
        janitor.stop_event.set()
        janitor.wake()
        t.join(5)
        store.close()
        server.stop()


def test_invalid_node_names_are_rejected(store, controller_core, caplog):
    from coil.controller.janitor import NodeJanitor
    from coil.controller.watcher import NodeWatcher
    from coil.errors import InvalidArgument
    janitor = NodeJanitor(store, controller_core)
    for bad in ("", "Node_1", "../etc", "a/b", "x" * 254, None, "-a"):
        with pytest.raises(InvalidArgument):
            janitor.node_deleted(bad)
        with pytest.raises(InvalidArgument):
            janitor.free_node(bad)
    assert janitor.idle.is_set()
    # a DELETED event with such a name is logged and skipped; the watch goes on
    caplog.set_level(logging.INFO)
    w = NodeWatcher(controller_core, lambda names: None, janitor.node_deleted)
    event = {"type": "DELETED", "object": {"metadata": {"name": "Bad_Name",
                                                        "resourceVersion": "42"}}}
    assert w._handle(json.dumps(event), "41") == "42"
    assert any(r.getMessage() == "ignoring deleted node with an invalid name"
               for r in caplog.records)
    from coil.controller.watcher import WatchError
    with pytest.raises(WatchError):
        w._handle("{not json", "1")


def test_cli_rejects_bad_options(tmp_path):
    from helpers import hypercoil
    for args, needle in ((["--scan-interval", "0"], "--scan-interval"),
                         (["--address-expiration", "0"], "'0'"),
                         (["--address-expiration", "30s"], "at least 1m"),
                         (["--node-grace-period", "10s"], "--node-grace-period"),
                         (["--node-grace-period", "0"], "--node-grace-period"),
                         (["--scan-interval", "ten"], "--scan-interval"),
                         (["--address-expiration", "-1h"], "--address-expiration"),
                         (["--metrics-addr", "nope"], "--metrics-addr"),
                         (["--etcd-endpoints", "@Bad_Name", "--kubeconfig",
                           str(tmp_path / "missing")], "kubeconfig")):
        r = hypercoil("coil-controller", *args, timeout=60)
        assert r.returncode != 0
        assert needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr



def test_metrics_listener_is_bounded_and_a_taken_port_is_one_line(run_controller):
    ctl = run_controller()
    ctl.wait_ready()
    pid = ctl.proc.pid
    threads = len(os.listdir(f"/proc/{pid}/task"))
    idle = [socket.create_connection(("127.0.0.1", ctl.port), timeout=30) for _ in range(100)]
    try:
        assert ctl.get("/healthz")[0] == 200        # the longest idle made room
        assert len(os.listdir(f"/proc/{pid}/task")) <= threads
    finally:
        for s in idle:
            s.close()
    # a second controller on the same address: one line naming it, non-zero exit
    other = run_controller(port=ctl.port)
    assert other.proc.wait(60) != 0
    text = other.logs()
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and f"--metrics-addr 127.0.0.1:{ctl.port}" in lines[0], text
    assert ctl.get("/healthz")[0] == 200
