"""Audit and repair, pool lifecycle, dead nodes: ``coilctl ipam check``,
``ipam release --from-report``, ``pool delete``, ``pool remove-subnet``,
``node release``, ``address free`` against a real etcd and a real
kube-apiserver (tests/kube.py); the route check against a real coild in a
node namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from coil.sandbox import kube as recipe
from coil.store import keys
from harness import Coild, Netns
from helpers import hypercoil
from leakdata import create_pods, delete_pods, pod_manifest
from nsrelay import NetnsRelay


def dump(store) -> dict:
    kvs, _ = store.etcd.get_prefix("")
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


def one_line_error(r, *named):
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == 1, out
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("coilctl: error:"), r.stderr
    for word in named:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in list(os.environ):
        if var.startswith("COILCTL_") or var in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
            monkeypatch.delenv(var)


@pytest.fixture
def ctl(etcd_server, etcd_prefix):
    def run(*args, input=None):
        return hypercoil("coilctl", "--etcd-endpoints", etcd_server.endpoint,
                         "--etcd-prefix", etcd_prefix, *args, input=input)
    return run


@pytest.fixture
def kube(kube_apiserver, tmp_path):
    """(admin CoreV1Api, admin kubeconfig path, a fresh namespace)."""
    core = kube_apiserver.core()
    ns = f"coiltest-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": ns}})
    created_nodes = []

    class K:
        pass
    k = K()
    k.core, k.ns = core, ns
    k.kubeconfig = kube_apiserver.kubeconfig(path=str(tmp_path / "kubeconfig"))
    k.apiserver = kube_apiserver

    def node(name):
        core.create_node({"metadata": {"name": name}})
        created_nodes.append(name)
    k.node = node
    try:
        yield k
    finally:
        delete_pods(core, ns)
        core.delete_namespace(ns)
        for name in created_nodes:
            core.delete_node(name)


def uniq(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- ipam check -----------------------------------------------------------------------

@pytest.fixture
def scene(store, kube):
    """One instance of every category in pool 'audit' (10.213.0.0/24, blocks of 8)."""
    store.create_pool("audit", "10.213.0.0/24", 3)
    live, dead = uniq("live"), uniq("dead")
    kube.node(live)
    b_live = store.acquire_block("audit", live)          # 10.213.0.0/29
    b_dead = store.acquire_block("audit", dead)          # 10.213.0.8/29: no Node object
    ns = kube.ns
    store.assign_address(b_live, 1, ns, "gone-0", "c1")   # leaked: no Pod at all
    store.assign_address(b_live, 2, ns, "web-0", "c2")    # held by its Running Pod
    store.assign_address(b_live, 3, ns, "lag-0", "c3")    # its Pod exists, no IP yet
    store.assign_address(b_live, 4, ns, "dup-a", "c4")    # reported by two Pods
    store.assign_address(b_dead, 1, ns, "gone-1", "c5")   # leaked too
    create_pods(kube.core, ns, [
        pod_manifest("web-0", ["10.213.0.2"], node=live),
        pod_manifest("lag-0", node=live),
        pod_manifest("dup-a", ["10.213.0.4"], node=live),
        pod_manifest("dup-b", ["10.213.0.4"], node=live),
        pod_manifest("orphan-0", ["10.213.0.5"], node=live),     # no record
        pod_manifest("host-0", ["10.213.0.6"], host_network=True, node=live),
    ])
    return {"live": live, "dead": dead, "b_live": b_live, "b_dead": b_dead, "ns": ns}


def mine(items, ns=None, pool="audit"):
    return [i for i in items if i.get("namespace", ns) == ns or i.get("pool") == pool]


def test_ipam_check_reports_each_category(ctl, store, kube, scene):
    before = dump(store)
    r = ctl("-o", "json", "ipam", "check", "--kubeconfig", kube.kubeconfig, "--min-age", "0s")
    assert r.returncode == 3, r.stderr          # problems found
    rep = json.loads(r.stdout)
    ns = scene["ns"]
    leaked = sorted((e["address"], e["pod"]) for e in rep["leaked_addresses"]
                    if e["namespace"] == ns)
    assert leaked == [("10.213.0.1", "gone-0"), ("10.213.0.9", "gone-1")]
    assert all(e["mod_revision"] > 0 for e in rep["leaked_addresses"])
    assert [d for d in rep["duplicate_addresses"] if d["address"] == "10.213.0.4"] == [
        {"address": "10.213.0.4", "pods": [f"{ns}/dup-a", f"{ns}/dup-b"]}]
    assert [(u["address"], u["pod"]) for u in rep["pods_without_record"]
            if u["namespace"] == ns] == [("10.213.0.5", "orphan-0")]
    assert [(b["block"], b["node"]) for b in rep["blocks_of_missing_nodes"]
            if b["pool"] == "audit"] == [("10.213.0.8/29", scene["dead"])]
    assert rep["summary"]["addresses"] == 5 and rep["prefix"] == store.etcd.prefix
    assert dump(store) == before               # a check changes nothing
    # the human report names the same things
    r = ctl("ipam", "check", "--kubeconfig", kube.kubeconfig, "--min-age", "0s")
    assert r.returncode == 3
    for word in ("10.213.0.1", "gone-0", "dup-b", "orphan-0", scene["dead"]):
        assert word in r.stdout
    # exit 3 comes from the one boundary: a ProblemsFound, one line on stderr
    problems = sum(rep["summary"][k] for k in ("leaked_addresses", "duplicate_addresses",
                                                "pods_without_record", "blocks_of_missing_nodes",
                                                "blocks_without_route", "coild_errors"))
    assert r.stderr.startswith(f"coilctl: error: ipam check found {problems} problems (")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_min_age_keeps_young_records_out(ctl, kube, scene):
    r = ctl("-o", "json", "ipam", "check", "--kubeconfig", kube.kubeconfig, "--min-age", "1h")
    rep = json.loads(r.stdout)
    assert [e for e in rep["leaked_addresses"] if e["namespace"] == scene["ns"]] == []


def test_release_from_report_frees_only_what_is_still_leaked(ctl, store, kube, scene, tmp_path):
    r = ctl("-o", "json", "ipam", "check", "--kubeconfig", kube.kubeconfig, "--min-age", "0s")
    report = tmp_path / "report.json"
    report.write_text(r.stdout)
    ns = scene["ns"]
    # after the report: gone-1's record is rewritten (freed and taken again by
    # another container) and a Pod named gone-0 ... no: gone-0 stays leaked.
    b_dead = scene["b_dead"]
    assert store.release_address(b_dead.cidr, 1)
    assert store.assign_address(b_dead, 1, ns, "new-1", "c9") is not None
    other = [e for e in json.loads(r.stdout)["leaked_addresses"] if e["namespace"] != ns]
    before_other = {(e["block"], e["offset"]): store.get_address(e["block"], e["offset"])
                    for e in other}
    # without a terminal, --yes is required
    r = ctl("ipam", "release", "--from-report", str(report), "--kubeconfig", kube.kubeconfig)
    one_line_error(r, "--yes")
    # scope the report to this test's namespace (the session apiserver is shared)
    rep = json.loads(report.read_text())
    rep["leaked_addresses"] = [e for e in rep["leaked_addresses"] if e["namespace"] == ns]
    report.write_text(json.dumps(rep))
    r = ctl("-o", "json", "ipam", "release", "--from-report", str(report), "--yes",
            "--kubeconfig", kube.kubeconfig)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["released"] == ["10.213.0.1"]
    assert [k["address"] for k in out["kept"]] == ["10.213.0.9"]
    assert store.get_address(scene["b_live"].cidr, 1) is None
    assert store.get_address(b_dead.cidr, 1).pod == "new-1"     # changed since: kept
    assert {k: store.get_address(*k) for k in before_other} == before_other
    # again: nothing left to free, nothing changed
    before = dump(store)
    r = ctl("-o", "json", "ipam", "release", "--from-report", str(report), "--yes",
            "--kubeconfig", kube.kubeconfig)
    assert json.loads(r.stdout)["released"] == []
    assert dump(store) == before


def test_release_keeps_an_address_whose_pod_appeared(ctl, store, kube, scene, tmp_path):
    r = ctl("-o", "json", "ipam", "check", "--kubeconfig", kube.kubeconfig, "--min-age", "0s")
    rep = json.loads(r.stdout)
    rep["leaked_addresses"] = [e for e in rep["leaked_addresses"]
                               if e["namespace"] == scene["ns"] and e["pod"] == "gone-0"]
    report = tmp_path / "report.json"
    report.write_text(json.dumps(rep))
    # the Pod of the record shows up (its status not yet reporting the IP)
    create_pods(kube.core, scene["ns"], [pod_manifest("gone-0", node=scene["live"])])
    before = dump(store)
    r = ctl("-o", "json", "ipam", "release", "--from-report", str(report), "--yes",
            "--kubeconfig", kube.kubeconfig)
    out = json.loads(r.stdout)
    assert out["released"] == [] and "exists" in out["kept"][0]["reason"]
    assert dump(store) == before


@pytest.mark.parametrize("content,named", [
    ("not json", "not JSON"),
    ('{"version": 99, "leaked_addresses": []}', "not a report"),
    ('{"version": 1, "prefix": "/other/", "leaked_addresses": []}', "/other/"),
    ('{"version": 1, "prefix": "PREFIX", "leaked_addresses": [{"address": "10.0.0.1"}]}',
     "leaked_addresses[0]"),
])
def test_release_rejects_a_bad_report(ctl, store, kube, tmp_path, etcd_prefix, content, named):
    store.create_pool("audit", "10.213.0.0/24", 3)
    before = dump(store)
    path = tmp_path / "bad.json"
    path.write_text(content.replace("PREFIX", etcd_prefix))
    r = ctl("ipam", "release", "--from-report", str(path), "--yes",
            "--kubeconfig", kube.kubeconfig)
    one_line_error(r, str(path), named)
    assert dump(store) == before


def test_check_reports_a_block_whose_route_is_missing(etcd_server, store, etcd_prefix, kube,
                                                      tmp_path):
    """A real coild in a node namespace; coilctl runs there too (it reaches
    kube-apiserver through a relay, etcd through its UNIX socket)."""
    node_name = uniq("rt")
    kube.node(node_name)
    store.create_pool("default", "10.214.0.0/24", 3)
    b1 = store.acquire_block("default", node_name)
    b2 = store.acquire_block("default", node_name)
    node = Netns("node")
    coild = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix, node_name=node_name)
    try:
        coild.start()
        with NetnsRelay(f"/run/netns/{node.name}",
                        ("127.0.0.1", kube.apiserver.port)) as relay:
            kc = recipe.write_kubeconfig(str(tmp_path / "kc-relay"),
                                         f"https://127.0.0.1:{relay.port}",
                                         kube.apiserver.ca_file, kube.apiserver.admin_token,
                                         name="relay")

            def check():
                r = subprocess.run(
                    ["ip", "netns", "exec", node.name, sys.executable, "-m", "coil", "coilctl",
                     "--etcd-endpoints", etcd_server.unix_endpoint, "--etcd-prefix", etcd_prefix,
                     "-o", "json", "ipam", "check", "--kubeconfig", kc,
                     "--coild", f"http://127.0.0.1:{coild.http_port}"],
                    capture_output=True, text=True, timeout=60)
                assert r.returncode in (0, 3), r.stderr
                return json.loads(r.stdout)

            rep = check()
            assert rep["coilds"] == [{"url": f"http://127.0.0.1:{coild.http_port}",
                                      "node": node_name}]
            assert [b for b in rep["blocks_without_route"] if b["node"] == node_name] == []
            node.exec("ip", "route", "del", b2.cidr, "table", "119")
            node.exec("ip", "route", "del", "unreachable", b1.cidr)
            rep = check()
            assert sorted((b["block"], b["node"], b["route"])
                          for b in rep["blocks_without_route"]) == sorted([
                (b2.cidr, node_name, "export"), (b1.cidr, node_name, "unreachable")])
    finally:
        coild.stop()
        node.delete()


def test_unreachable_coild_is_reported_not_judged(ctl, kube, store):
    from helpers import free_port
    url = f"http://127.0.0.1:{free_port()}"
    r = ctl("-o", "json", "ipam", "check", "--kubeconfig", kube.kubeconfig, "--coild", url)
    assert r.returncode == 3
    rep = json.loads(r.stdout)
    assert [e["url"] for e in rep["coild_errors"]] == [url]
    r = ctl("ipam", "check", "--kubeconfig", kube.kubeconfig, "--coild", "ftp://x")
    one_line_error(r, "ftp://x")


# -- pool lifecycle -------------------------------------------------------------------

def test_pool_delete_refuses_while_a_block_is_held(ctl, store):
    store.create_pool("p", "10.215.0.0/24", 3)
    store.add_subnet("p", "10.216.0.0/24")
    b = store.acquire_block("p", "node-7")
    before = dump(store)
    r = ctl("pool", "delete", "p")
    one_line_error(r, "'p'", "node-7", "1 block")
    assert dump(store) == before
    assert store.release_block(b)
    r = ctl("pool", "delete", "p")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "deleted pool p (10.215.0.0/24, 10.216.0.0/24)"
    kvs, _ = store.etcd.get_prefix("subnet/")
    assert kvs == [] and store.list_pools() == []
    # the subnets are free again
    store.create_pool("q", "10.215.0.0/24", 3)
    r = ctl("pool", "delete", "nope")
    one_line_error(r, "nope")


def test_pool_delete_guard_sees_a_block_taken_meanwhile(store, monkeypatch):
    """A block taken between the read and the transaction: the range compare
    fails the delete; the retry names the holder."""
    from coil.errors import Conflict
    store.create_pool("p", "10.215.0.0/24", 3)
    real_txn = store.etcd.txn
    taken = []

    def txn(compares, success, failure=()):
        if not taken and any(c[0] == "prefix-empty" for c in compares):
            taken.append(store.acquire_block("p", "node-late"))
        return real_txn(compares, success, failure)
    monkeypatch.setattr(store.etcd, "txn", txn)
    with pytest.raises(Conflict, match="node-late"):
        store.delete_pool("p")
    assert store.get_pool("p").name == "p"


def test_remove_subnet(ctl, store):
    store.create_pool("p", "10.215.0.0/24", 3)
    store.add_subnet("p", "10.216.0.0/24")
    store.add_subnet("p", "fd00:215::/120")
    b = store.acquire_block("p", "node-1")            # lowest first: in 10.215.0.0/24
    b2 = store.acquire_block("p", "node-2")
    assert b.cidr.startswith("10.215.0.") and b2.cidr.startswith("10.215.0.")
    before = dump(store)
    r = ctl("pool", "remove-subnet", "p", "10.215.0.0/24")
    one_line_error(r, "10.215.0.0/24", "node-1", "node-2", "2 blocks")
    assert dump(store) == before
    r = ctl("-o", "json", "pool", "remove-subnet", "p", "10.216.0.0/24")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["subnets"] == ["10.215.0.0/24", "fd00:215::/120"]
    assert store.etcd.get(keys.subnet("10.216.0.0/24")) is None
    r = ctl("pool", "remove-subnet", "p", "10.216.0.0/24")
    one_line_error(r, "10.216.0.0/24", "not a subnet")
    r = ctl("pool", "remove-subnet", "p", "10.216.0.1/24")
    one_line_error(r, "10.216.0.1/24")
    assert store.release_block(b) and store.release_block(b2)
    r = ctl("pool", "remove-subnet", "p", "10.215.0.0/24")
    assert r.returncode == 0, r.stderr
    r = ctl("pool", "remove-subnet", "p", "fd00:215::/120")
    one_line_error(r, "last subnet", "pool delete")


def test_remove_subnet_guard_sees_a_block_taken_meanwhile(store, monkeypatch):
    from coil.errors import Conflict
    store.create_pool("p", "10.215.0.0/24", 3)
    store.add_subnet("p", "10.216.0.0/24")
    pool = store.get_pool("p")
    real_txn = store.etcd.txn
    taken = []

    def txn(compares, success, failure=()):
        if not taken and any(c[0] == "prefix-mod-below" for c in compares):
            # taken with the pool revision the remover read: only the range
            # compare can notice it
            import ipaddress
            from coil.store.model import _dumps
            cidr = "10.216.0.8/29"
            ok, _, _ = real_txn([("mod", keys.pool("p"), "==", pool.revision),
                                 ("version", keys.block("p", cidr), "==", 0)],
                                [("put", keys.block("p", cidr),
                                  _dumps({"node": "node-late", "subnet": "10.216.0.0/24",
                                          "acquired_at": ""})),
                                 ("put", keys.node_block("node-late", cidr), b"p")])
            assert ok and ipaddress.ip_network(cidr)
            taken.append(cidr)
        return real_txn(compares, success, failure)
    monkeypatch.setattr(store.etcd, "txn", txn)
    with pytest.raises(Conflict, match="node-late"):
        store.remove_subnet("p", "10.216.0.0/24")
    assert [str(s) for s in store.get_pool("p").subnets] == ["10.215.0.0/24", "10.216.0.0/24"]


# -- node release ---------------------------------------------------------------------

def test_node_release(ctl, store):
    store.create_pool("p", "10.215.0.0/24", 3)
    b1 = store.acquire_block("p", "node-x")
    b2 = store.acquire_block("p", "node-x")
    keep = store.acquire_block("p", "node-y")
    store.assign_address(b2, 0, "ns", "pod-0", "c0")
    before = dump(store)
    r = ctl("node", "release", "node-x")
    one_line_error(r, "node-x", "--yes")
    r = ctl("node", "release", "node-x", "--yes")
    one_line_error(r, "node-x", "1 address", b2.cidr, "--force")
    assert dump(store) == before
    # alive: its liveness record exists (under a lease, as coild keeps it)
    lease = store.etcd.lease_grant(60)
    assert store.etcd.txn([("version", keys.node_alive("node-x"), "==", 0)],
                          [("put", keys.node_alive("node-x"), b'{"pid": 1}', lease)])[0]
    r = ctl("node", "release", "node-x", "--yes", "--force")
    one_line_error(r, "node-x", "alive")
    assert {k: v for k, v in dump(store).items() if not k.startswith("node-alive/")} == before
    assert store.etcd.lease_revoke(lease)
    r = ctl("-o", "json", "node", "release", "node-x", "--yes", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted((d["block"], d["addresses_freed"]) for d in json.loads(r.stdout)) == \
        sorted([(b1.cidr, 0), (b2.cidr, 1)])
    assert store.node_blocks("node-x") == [] and store.count_addresses(b2.cidr) == 0
    assert [b.cidr for b in store.node_blocks("node-y")] == [keep.cidr]
    r = ctl("node", "release", "node-x", "--yes")
    assert r.returncode == 0 and "holds no block" in r.stdout


def test_node_release_guard_sees_the_node_come_alive(store, monkeypatch):
    """The lease appears after the check: the transaction's compare refuses."""
    from coil.errors import Conflict
    store.create_pool("p", "10.215.0.0/24", 3)
    store.acquire_block("p", "node-x")
    real_txn = store.etcd.txn

    def txn(compares, success, failure=()):
        if any(c[1] == keys.node_alive("node-x") for c in compares):
            real_txn([], [("put", keys.node_alive("node-x"), b'{"pid": 2}')])
        return real_txn(compares, success, failure)
    monkeypatch.setattr(store.etcd, "txn", txn)
    with pytest.raises(Conflict, match="came alive"):
        store.release_node("node-x")
    assert len(store.node_blocks("node-x")) == 1


# -- address free ---------------------------------------------------------------------

def test_address_free_refuses_while_the_pod_exists(ctl, store, kube):
    store.create_pool("p", "10.215.0.0/24", 3)
    b = store.acquire_block("p", "node-1")
    store.assign_address(b, 1, kube.ns, "web-0", "c1")
    store.assign_address(b, 2, kube.ns, "gone-0", "c2")
    create_pods(kube.core, kube.ns, [pod_manifest("web-0", ["10.215.0.1"])])
    before = dump(store)
    r = ctl("address", "free", "--yes", "--kubeconfig", kube.kubeconfig, "10.215.0.1")
    one_line_error(r, "10.215.0.1", f"{kube.ns}/web-0", "--force")
    # no Kubernetes to ask: refuse to judge
    r = ctl("address", "free", "--yes", "10.215.0.2")
    one_line_error(r, "10.215.0.2", "--force")
    assert dump(store) == before
    r = ctl("address", "free", "--yes", "--kubeconfig", kube.kubeconfig, "10.215.0.2")
    assert r.returncode == 0, r.stderr
    assert store.get_address(b.cidr, 2) is None
    r = ctl("address", "free", "--yes", "--force", "10.215.0.1")
    assert r.returncode == 0, r.stderr
    assert store.get_address(b.cidr, 1) is None


# -- capacity metrics -------------------------------------------------------------------

def _metric(text: str, name: str, pool: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{pool="{pool}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{pool={pool}}} not in metrics")


def test_capacity_metrics_per_pool(store, kube):
    from coil.controller.metrics import ControllerMetrics
    from coil.controller.scan import LeakScanner
    from helpers import free_port
    store.create_pool("cap", "10.217.0.0/24", 3)            # 32 blocks, 256 addresses
    store.add_subnet("cap", "10.218.0.0/25")                # 16 blocks, 128 addresses
    store.create_pool("idle", "10.219.0.0/28", 2)           # 4 blocks, 16 addresses
    blocks = [store.acquire_block("cap", f"node-{i}") for i in range(3)]
    for off in range(5):
        store.assign_address(blocks[off % 3], off, "ns", f"p{off}", f"c{off}")
    metrics = ControllerMetrics()
    text = metrics.render()[0].decode()
    assert "coil_controller_pool_blocks_free" not in text      # nothing before a scan
    # the capacity needs etcd only: a scan whose Pod list fails still sets it
    dead = recipe.api_client(f"https://127.0.0.1:{free_port()}", kube.apiserver.ca_file, "x")
    from kubernetes import client
    with pytest.raises(Exception):
        LeakScanner(store, client.CoreV1Api(dead), metrics=metrics).scan()
    text = metrics.render()[0].decode()
    assert _metric(text, "coil_controller_pool_blocks", "cap") == 48
    assert _metric(text, "coil_controller_pool_blocks_free", "cap") == 45
    assert _metric(text, "coil_controller_pool_addresses", "cap") == 384
    assert _metric(text, "coil_controller_pool_addresses_free", "cap") == 379
    assert _metric(text, "coil_controller_pool_blocks_free", "idle") == 4
    assert _metric(text, "coil_controller_pool_addresses_free", "idle") == 16
    # a full scan refreshes them
    store.acquire_block("idle", "node-9")
    LeakScanner(store, kube.core, metrics=metrics).scan()
    text = metrics.render()[0].decode()
    assert _metric(text, "coil_controller_pool_blocks_free", "idle") == 3
