"""Coil v1 stores: detection, refusal by every role, ``coilctl migrate v1``
(complete, repeated, interrupted and resumed), then the real coild serving
CNI ADD and DEL for pods that held v1 addresses.

The v1 store is written through etcd exactly as v1.1.9 wrote it
(tests/v1store.py); nothing is mocked.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

import pytest

from harness import Coild, CoilNode, Netns
from helpers import hypercoil
from v1store import V1Writer, build_cluster_store, dump

from coil.errors import Conflict, InvalidArgument
from coil.store import v1


def ctl(etcd_server, prefix, *args, **kw):
    return hypercoil("coilctl", "--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix,
                     *args, **kw)


def one_line_error(text: str, role: str):
    # coild's structured log lines (JSON) share the file with stderr in the harness
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, text
    assert lines[0].startswith(f"{role}: error: ") and "'coilctl migrate v1'" in lines[0], text
    assert "Traceback" not in text


def v1_keys(d: dict) -> list:
    return [k for k in d if v1._v1_subnet_marker(k) or v1._v1_block_doc(k) or v1._v1_ip_key(k)]


def normalized(d: dict) -> dict:
    """The dump with each block's acquired_at (the migration's clock) masked."""
    out = {}
    for k, v in d.items():
        if k.startswith("block/"):
            data = json.loads(v)
            data["acquired_at"] = "T"
            v = json.dumps(data, sort_keys=True).encode()
        out[k] = v
    return out


def check_converted(store, held: dict):
    """Every v1 pool, subnet, block and address is in the new layout, unchanged."""
    pools = {p.name: ([str(s) for s in p.subnets], p.block_size) for p in store.list_pools()}
    assert pools == {"default": (["10.60.0.0/27", "10.60.1.0/28"], 2),
                     "team": (["10.61.0.0/26"], 3), "spare": (["10.62.0.0/28"], 2)}
    blocks = {(b.pool, b.cidr): b.node for b in store.all_blocks()}
    assert blocks == {("default", "10.60.0.0/30"): "node1", ("default", "10.60.0.4/30"): "node2",
                      ("default", "10.60.0.8/30"): "node1", ("default", "10.60.0.12/30"): "node3",
                      ("team", "10.61.0.0/29"): "node1", ("team", "10.61.0.8/29"): "node2"}
    for node in ("node1", "node2", "node3"):      # the node index agrees
        assert {(b.pool, b.cidr) for b in store.node_blocks(node)} == \
            {k for k, n in blocks.items() if n == node}
    addrs, _ = store.all_addresses()
    got = {a.address: (a.namespace, a.pod, a.container_id) for a in addrs}
    assert got == {a: h[:3] for a, h in held.items()}
    for a in addrs:
        owner = blocks[(store.address_info(a.address)["pool"], a.block)]
        assert owner == held[a.address][3]
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", a.created_at)
    legacy = [a for a in addrs if not a.container_id]
    assert [a.created_at for a in legacy] == ["1970-01-01T00:00:00.000000Z"]
    assert {a.created_at for a in addrs if a.container_id} == {"2024-05-06T07:08:09.123456Z"}
    # subnets are unique again in the new form, and the guard was advanced
    kvs, _ = store.etcd.get_prefix("subnet/")
    assert {kv.key: json.loads(kv.value)["pool"] for kv in kvs} == {
        "subnet/10.60.0.0/27": "default", "subnet/10.60.1.0/28": "default",
        "subnet/10.61.0.0/26": "team", "subnet/10.62.0.0/28": "spare"}
    assert int(store.etcd.get("subnets-guard").value) == 4


def test_detection_is_one_keys_only_read(store):
    assert v1.detect(store.etcd) is None                     # empty
    store.create_pool("default", "10.70.0.0/24", 4)
    assert v1.detect(store.etcd) is None                     # current layout
    V1Writer(store.etcd).add_pool("old", "10.71.0.0/24", 4)
    assert v1.detect(store.etcd) == "subnet/10.71.0.0"


def test_dry_run_reports_and_changes_nothing(etcd_server, store, etcd_prefix):
    held = build_cluster_store(store.etcd)
    before = dump(store.etcd)
    r = ctl(etcd_server, etcd_prefix, "-o", "json", "migrate", "v1", "--dry-run")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["v1"] and report["dry_run"]
    assert [p["name"] for p in report["pools"]] == ["default", "spare", "team"]
    assert len(report["blocks"]) == 6 and report["addresses"] == len(held) == 11
    assert report["legacy_addresses"] == [{"address": "10.60.0.5", "namespace": "default",
                                           "pod": "old-pod"}]
    assert report["steps"]["applied"] == 0 and report["steps"]["pending"] == report["steps"]["total"]
    assert dump(store.etcd) == before
    human = ctl(etcd_server, etcd_prefix, "migrate", "v1", "--dry-run")
    assert human.returncode == 0
    assert "would convert 3 pools, 6 blocks of 3 nodes, 11 addresses" in human.stdout
    assert "10.60.0.5 (default/old-pod)" in human.stdout
    assert dump(store.etcd) == before


def test_migrate_keeps_everything_and_repeats_harmlessly(etcd_server, store, etcd_prefix):
    held = build_cluster_store(store.etcd)
    r = ctl(etcd_server, etcd_prefix, "-o", "json", "migrate", "v1")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["steps"]["pending"] == 0 and report["steps"]["applied"] == report["steps"]["total"]
    after = dump(store.etcd)
    assert v1_keys(after) == [] and v1.detect(store.etcd) is None
    check_converted(store, held)
    # a second run finds nothing to do and writes nothing
    again = ctl(etcd_server, etcd_prefix, "migrate", "v1")
    assert again.returncode == 0 and "nothing to convert" in again.stdout
    assert dump(store.etcd) == after
    # every other coilctl command works again
    r = ctl(etcd_server, etcd_prefix, "node", "blocks", "node1")
    assert r.returncode == 0 and "10.60.0.8/30" in r.stdout


@pytest.mark.parametrize("stop_after", [1, 4, 7, 12, 21, 23, 27])
def test_interrupted_migration_resumes_to_the_same_end(etcd_server, etcd_config, stop_after):
    """Stop after N applied steps (every kind of step is hit by one N), check the
    half-converted store is still refused, resume, compare with an uninterrupted run."""
    import dataclasses

    from coil.store import IPAMStore
    from coil.store.etcd import Etcd

    class Stop(Exception):
        pass

    def stores():
        return (IPAMStore(Etcd(dataclasses.replace(etcd_config, prefix=etcd_config.prefix + "ref/"))),
                IPAMStore(Etcd(dataclasses.replace(etcd_config, prefix=etcd_config.prefix + "cut/"))))

    ref, cut = stores()
    try:
        build_cluster_store(ref.etcd)
        held = build_cluster_store(cut.etcd)
        total = v1.migrate(ref.etcd)["steps"]["total"]
        assert total == 29                   # 4 subnets, 6 blocks, 11 addresses, 4 docs, 4 markers
        kinds = []

        def hook(step, applied):
            kinds.append(step.kind)
            if applied == stop_after:
                raise Stop

        v1._after_step = hook
        try:
            with pytest.raises(Stop):
                v1.migrate(cut.etcd)
        finally:
            v1._after_step = None
        assert len(kinds) == stop_after
        # half way, the store is still v1 to everyone but the migration
        assert v1.detect(cut.etcd) is not None
        r = ctl(etcd_server, cut.etcd.prefix, "pool", "list")
        assert r.returncode == 1
        one_line_error(r.stderr, "coilctl")
        report = v1.migrate(cut.etcd)
        # no step is applied twice and none is skipped
        assert report["steps"]["applied"] == total - stop_after
        assert normalized(dump(cut.etcd)) == normalized(dump(ref.etcd))
        check_converted(cut, held)
    finally:
        ref.close()
        cut.close()


def test_migration_stops_when_a_v1_coild_writes_meanwhile(store):
    """A v1 coild still running changes a v1 document: the guarded step fails,
    nothing is half-written, and a rerun (after stopping it) completes."""
    held = build_cluster_store(store.etcd)
    w = V1Writer(store.etcd)

    def hook(step, applied):
        if applied == 5:                       # among the block steps
            held_block = w.acquire_block("node4", "default")
            held[w.allocate_ip(held_block, "cid-late", "default", "late-0")] = \
                ("default", "late-0", "cid-late", "node4")
            v1._after_step = None

    v1._after_step = hook
    try:
        with pytest.raises(Conflict, match="still running"):
            v1.migrate(store.etcd)
    finally:
        v1._after_step = None
    assert v1.detect(store.etcd) is not None
    v1.migrate(store.etcd)
    blocks = {b.cidr: b.node for b in store.all_blocks()}
    assert blocks["10.60.0.16/30"] == "node4"
    addrs, _ = store.all_addresses()
    assert {a.address: (a.namespace, a.pod, a.container_id) for a in addrs} == \
        {a: h[:3] for a, h in held.items()}


def test_inconsistent_v1_store_is_refused_before_any_write(etcd_server, store, etcd_prefix):
    w = V1Writer(store.etcd)
    w.add_pool("default", "10.63.0.0/28", 2)
    w.acquire_block("node1", "default")
    kv = store.etcd.get("block/default/10.63.0.0")
    doc = json.loads(kv.value)
    doc["nodes"]["node2"] = list(doc["nodes"]["node1"])           # two owners
    store.etcd.put("block/default/10.63.0.0", json.dumps(doc).encode())
    before = dump(store.etcd)
    with pytest.raises(InvalidArgument, match="held by two nodes"):
        v1.migrate(store.etcd)
    r = ctl(etcd_server, etcd_prefix, "migrate", "v1")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "held by two nodes" in r.stderr and "Traceback" not in r.stderr
    assert dump(store.etcd) == before


def test_every_role_refuses_a_v1_store_and_writes_nothing(etcd_server, store, etcd_prefix, tmp_path):
    build_cluster_store(store.etcd)
    before = dump(store.etcd)
    for args in (("pool", "list"), ("pool", "create", "x", "10.99.0.0/24", "2"),
                 ("node", "blocks", "node1"), ("address", "free", "--yes", "10.60.0.1")):
        r = ctl(etcd_server, etcd_prefix, *args)
        assert r.returncode == 1, (args, r.stdout)
        one_line_error(r.stderr, "coilctl")
    # coild, in a node namespace: it stops before touching the node
    node = Netns("node")
    try:
        coild = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
        coild.start(wait=False)
        assert coild.proc.wait(60) == 1
        log = coild.log()
        coild.stop()
        one_line_error(log, "coild")
        assert not os.path.exists(coild.socket)
        assert node.exec("ip", "route", "show", "table", "119", check=False).stdout == ""
    finally:
        node.delete()
    # coil-controller, with a kubeconfig it never needs to contact
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    r = hypercoil("coil-controller", "--etcd-endpoints", etcd_server.endpoint,
                  "--etcd-prefix", etcd_prefix, "--kubeconfig", str(kubeconfig),
                  "--metrics-addr", "", timeout=60)
    assert r.returncode == 1
    one_line_error(r.stderr, "coil-controller")
    assert dump(store.etcd) == before


pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def node1(etcd_server, store, etcd_prefix, tmp_path):
    """node1's namespace and coild (started by the test), pods on demand."""
    n = CoilNode(str(tmp_path), etcd_server.unix_endpoint, etcd_prefix, node_name="node1")
    try:
        yield n
    finally:
        n.close()


@pytestmark_root
def test_coild_serves_v1_pods_after_migration(etcd_server, store, etcd_prefix, tmp_path, node1):
    held = build_cluster_store(store.etcd)
    r = ctl(etcd_server, etcd_prefix, "migrate", "v1")
    assert r.returncode == 0, r.stderr
    cni = node1.start().cni
    # coild learned node1's v1 blocks and published them in table 119
    routes = node1.ns.exec("ip", "route", "show", "table", "119").stdout
    for block in ("10.60.0.0/30", "10.60.0.8/30", "10.61.0.0/29"):
        assert block in routes
    status, body = node1.coild.rest("GET", "/status")
    assert status == 200
    assert body["pods"] == {h[2]: a for a, h in held.items() if h[3] == "node1"}
    assert body["address-blocks"] == {"default": ["10.60.0.0/30", "10.60.0.8/30"],
                                      "team": ["10.61.0.0/29"]}

    # DEL of v1-era containers (their pods are gone: no netns) frees their v1 addresses
    for cid, ns, pod in (("cid-a1", "default", "web-1"), ("cid-t2", "team", "team-2")):
        assert cni.call("del", "", cid, ns, pod) == (0, None)
    freed = {"10.60.0.1", "10.61.0.2"}
    still = {a: h for a, h in held.items() if a not in freed}
    addrs, _ = store.all_addresses()
    assert {a.address: (a.namespace, a.pod, a.container_id) for a in addrs} == \
        {a: h[:3] for a, h in still.items()}

    # new pods never get an address still held; node1 fills its own v1 blocks first
    got = {}
    for i in range(4):
        rc, res = cni.call("add", node1.new_pod(), f"new-{i}", "default", f"new-{i}")
        assert rc == 0, (res, node1.coild.log())
        got[f"new-{i}"] = str(ipaddress.ip_interface(res["ips"][0]["address"]).ip)
    rc, res = cni.call("add", node1.new_pod(), "new-team", "team", "new-team")
    assert rc == 0, res
    got["new-team"] = str(ipaddress.ip_interface(res["ips"][0]["address"]).ip)
    assert not set(got.values()) & set(still)
    assert len(set(got.values())) == len(got)
    node1_blocks = [ipaddress.ip_network(b.cidr) for b in store.node_blocks("node1")]
    assert all(any(ipaddress.ip_address(a) in b for b in node1_blocks) for a in got.values())
    # no address changed hands: every v1 record left is exactly as v1 wrote it
    addrs, _ = store.all_addresses()
    now = {a.address: (a.namespace, a.pod, a.container_id) for a in addrs}
    for a, h in still.items():
        assert now[a] == h[:3]
    # DEL of a new pod frees only its own address; node2's pre-1.0.2 record stays
    assert cni.call("del", "", "new-0", "default", "new-0")[0] == 0
    assert now["10.60.0.5"] == ("default", "old-pod", "")
    addrs, _ = store.all_addresses()
    assert {a.address for a in addrs} == (set(still) | set(got.values())) - {got["new-0"]}


def test_migration_killed_with_sigkill_resumes(etcd_server, store, etcd_prefix, tmp_path):
    """The real coilctl process is killed (SIGKILL: no cleanup at all) right
    after its 9th transaction; 'coilctl migrate v1' run again finishes the job."""
    import signal
    import subprocess
    import sys
    held = build_cluster_store(store.etcd)
    # test-side hook inside the child: the production module only offers _after_step
    script = ("import os, signal, sys\n"
              "from coil.store import v1\n"
              "def hook(step, applied):\n"
              "    if applied == 9:\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "v1._after_step = hook\n"
              "from coil.coilctl.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "--etcd-endpoints", etcd_server.endpoint,
                        "--etcd-prefix", etcd_prefix, "migrate", "v1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert v1.detect(store.etcd) is not None          # still v1 for everyone else
    r = ctl(etcd_server, etcd_prefix, "-o", "json", "migrate", "v1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"]["applied"] == 29 - 9
    check_converted(store, held)
    assert v1_keys(dump(store.etcd)) == []
