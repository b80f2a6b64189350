"""coild's side of the safe release paths, for real: etcd, network
namespaces, coild as a process, the libcni client and the plugin.

- liveness: coild keeps ``node-alive/<node>`` under a lease; the record
  lapses when coild is killed and is made again when its lease expired;
- adoption: blocks recorded for the node before coild starts are kept;
- CNI GC frees only CNI attachments of this network, absent from the valid
  list, older than the request, with no request of the container in flight.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from harness import CNI, CoilNode, coil_conflist, plugin_binary
from helpers import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

TTL = 3          # --liveness-ttl of the coilds here (etcd's minimum is ~2 s)
NET = "coil-test"


@pytest.fixture
def node(etcd_server, store, etcd_prefix, tmp_path):
    n = CoilNode(str(tmp_path), etcd_server.unix_endpoint, etcd_prefix,
                 extra=["--liveness-ttl", f"{TTL}s"])
    n.store = store
    try:
        yield n
    finally:
        n.close()


def alive(store, name="node1"):
    from coil.store import liveness
    return liveness.read(store.etcd, name)


def held(store) -> dict:
    return {a.address: a for a in store.all_addresses()[0]}


def pod_ip(result) -> str:
    return str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)


def add(n, pod, cid, name=None):
    rc, out = n.cni.call("add", pod, cid, "default", name or cid)
    assert rc == 0, (out, n.coild.log())
    return pod_ip(out)


def call_plugin(n, env: dict, conf: dict):
    """Exec the plugin directly with ``conf`` on stdin: (exit code, JSON)."""
    base = {"PATH": os.environ["PATH"], "CNI_PATH": n.cni.bin}
    r = subprocess.run(["ip", "netns", "exec", n.ns.name, os.path.join(n.cni.bin, "coil")],
                       input=json.dumps(conf), capture_output=True, text=True,
                       env={**base, **env}, timeout=60)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None


def gc(n, **valid):
    conf = {"cniVersion": "1.1.0", "name": NET, "type": "coil", "socket": n.coild.socket}
    conf.update(valid)
    return call_plugin(n, {"CNI_COMMAND": "GC"}, conf)


def metric(n, name) -> float:
    status, text = n.coild.rest("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


# -- liveness -------------------------------------------------------------------------
def test_liveness_record_kept_lapses_when_killed_and_is_made_again(node):
    node.store.create_pool("default", "10.150.0.0/24", 4)
    assert alive(node.store) is None
    node.start()
    rec = alive(node.store)
    assert rec is not None and rec.lease != 0
    assert json.loads(rec.value)["pid"] == node.coild.proc.pid
    # renewed: after three TTLs it is still the very same record on the same lease
    time.sleep(3 * TTL)
    again = alive(node.store)
    assert again is not None and (again.create_revision, again.lease) == (rec.create_revision,
                                                                           rec.lease)
    assert metric(node, "coild_liveness_ok") == 1
    # the lease expires (as after etcd was out of reach longer than the TTL): made again
    assert node.store.etcd.lease_revoke(rec.lease)
    assert alive(node.store) is None
    fresh = wait_for(lambda: alive(node.store), timeout=4 * TTL, what="record made again")
    assert fresh.lease != rec.lease
    assert "liveness lease had expired" in node.coild.log()
    # killed: nobody renews, etcd drops the record once the TTL has passed
    node.coild.stop(signal.SIGKILL)
    wait_for(lambda: alive(node.store) is None, timeout=4 * TTL, what="record lapsed")
    # a restarted coild writes it again; a graceful stop does not revoke the
    # lease (the node's pods keep running without coild) ...
    node.coild.extra = ["--liveness-ttl", "60s"]
    node.coild.start()
    first = alive(node.store)
    assert first is not None
    node.coild.stop()
    assert alive(node.store) == first
    # ... and the next coild takes over the predecessor's live record at once
    node.coild.start()
    second = alive(node.store)
    assert second.lease != first.lease and json.loads(second.value)["pid"] == node.coild.proc.pid


def test_coild_adopts_blocks_recorded_for_its_node(node):
    """Blocks and addresses in etcd for the node before coild starts are its own."""
    store = node.store
    store.create_pool("default", "10.151.0.0/24", 3)
    block = store.acquire_block("default", "node1")
    kept = [store.assign_address(block, off, "default", f"old{off}", f"old{off}",
                                 {"origin": "cni", "network": NET, "ifname": "eth0"})
            for off in (0, 1)]
    node.start()
    status, body = node.coild.rest("GET", "/status")
    assert status == 200 and body["address-blocks"] == {"default": [block.cidr]}
    assert body["pod-addresses"] == {"default/old0": [kept[0].address],
                                     "default/old1": [kept[1].address]}
    assert f"{block.cidr} dev lo proto 30" in node.ns.exec("ip", "route", "show", "table",
                                                          "119").stdout
    ip = add(node, node.new_pod(), "new1")
    assert ipaddress.ip_address(ip) in block.network
    assert ip not in {a.address for a in kept}
    assert store.node_blocks("node1") == [block]           # no second block taken
    assert {a.container_id for a in held(store).values()} == {"old0", "old1", "new1"}


def test_bad_liveness_ttl_is_rejected():
    from helpers import hypercoil
    for value in ("0", "1s", "2h", "soon"):
        r = hypercoil("coild", "--liveness-ttl", value, env={"COIL_NODE_NAME": "n1"})
        assert r.returncode != 0
        assert "--liveness-ttl" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- CNI GC -----------------------------------------------------------------------------
def test_gc_frees_only_stale_cni_attachments_of_this_network(node, tmp_path):
    store = node.store
    store.create_pool("default", "10.152.0.0/24", 4)
    node.start()
    keep_pod, stale_pod = node.new_pod(), node.new_pod()
    keep = add(node, keep_pod, "keep1")
    stale = add(node, stale_pod, "stale1")
    # listed by container ID but with another ifname: not valid
    other_if = add(node, node.new_pod(), "stale2")
    # an attachment of another network on this node
    other_cni = CNI(node.ns, str(tmp_path / "other"),
                    dict(coil_conflist(node.coild.socket), name="other-net"), plugin_binary())
    other = pod_ip(other_cni.call("add", node.new_pod(), "other1", "default", "other1")[1])
    # an address taken through the REST API
    status, body = node.coild.rest("POST", "/ip", {"pod-namespace": "default",
                                                   "pod-name": "tool", "container-id": "rest1"})
    assert status == 200
    rest = body["address"]
    # an owner that opts in to the leak release; a non-boolean opt-in is refused
    status, body = node.coild.rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "vm",
                                                   "container-id": "rest2",
                                                   "release-if-leaked": True})
    assert status == 200
    rest2 = body["address"]
    status, body = node.coild.rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "vm3",
                                                   "container-id": "rest3",
                                                   "release-if-leaked": "yes"})
    assert status == 400 and "release-if-leaked" in body["error"]
    records = held(store)
    assert (records[rest2].origin, records[rest2].release_if_leaked) == ("rest", True)
    assert records[rest].release_if_leaked is False
    assert (records[stale].origin, records[stale].network, records[stale].ifname) == (
        "cni", NET, "eth0")
    assert records[other].network == "other-net"
    assert records[rest].origin == "rest"

    rc, out = gc(node, **{"cni.dev/valid-attachments": [
        {"containerID": "keep1", "ifname": "eth0"}, {"containerID": "stale2", "ifname": "net1"},
        {"containerID": "gone", "ifname": "eth0"}]})
    assert (rc, out) == (0, None), node.coild.log()
    assert set(held(store)) == {keep, other, rest, rest2}
    assert stale not in held(store) and other_if not in held(store)
    assert "eth0" in keep_pod.links() and "eth0" not in stale_pod.links()
    assert metric(node, "coild_cni_gc_freed_total") == 2


def test_gc_list_forms(node):
    """Both list keys are read; a missing or null list means none is valid;
    a list that is not a list is refused and frees nothing."""
    store = node.store
    store.create_pool("default", "10.153.0.0/24", 4)
    node.start()
    a = add(node, node.new_pod(), "a1")
    b = add(node, node.new_pod(), "b1")
    c = add(node, node.new_pod(), "c1")
    for bad in ("keep1", {"containerID": "a1"}, [{"ifname": "eth0"}], ["a1"]):
        rc, out = gc(node, **{"cni.dev/valid-attachments": bad})
        assert rc != 0 and out["code"] == 7 and "valid-attachments" in out["msg"], out
    assert set(held(store)) == {a, b, c}
    # the older key name; an entry without ifname keeps every attachment of the container
    rc, out = gc(node, **{"cni.dev/attachments": [{"containerID": "a1"}],
                          "cni.dev/valid-attachments": [{"containerID": "b1", "ifname": "eth0"}]})
    assert rc == 0, out
    assert set(held(store)) == {a, b}
    rc, out = gc(node, **{"cni.dev/valid-attachments": None})       # null: none valid
    assert rc == 0, out
    assert held(store) == {}
    d = add(node, node.new_pod(), "d1")
    assert gc(node) == (0, None)                                     # missing: none valid
    assert d not in held(store)


def test_gc_keeps_records_newer_than_the_request(node):
    """A record created after the GC request started (here: planted with a
    created_at in the future and loaded by a coild restart) is kept."""
    from coil.store import keys
    store = node.store
    store.create_pool("default", "10.154.0.0/24", 4)
    node.start()
    old = add(node, node.new_pod(), "old1")
    block = store.node_blocks("node1")[0]
    future = "2999-01-01T00:00:00.000000Z"
    rec = json.dumps({"namespace": "default", "pod": "young", "container_id": "young1",
                      "created_at": future, "origin": "cni", "network": NET,
                      "ifname": "eth0"}).encode()
    assert store.etcd.txn([("version", keys.ip(block.cidr, 9), "==", 0)],
                          [("put", keys.ip(block.cidr, 9), rec)])[0]
    node.coild.stop()
    node.coild.start()
    assert gc(node) == (0, None)
    assert [a.container_id for a in held(store).values()] == ["young1"]
    assert old not in held(store)


def test_gc_keeps_a_container_with_a_request_in_flight(node, tmp_path):
    """An ADD paused (coild's pause point, through tests/coild_hooked.py)
    after recording its address and wiring the pod: a GC that arrives
    meanwhile leaves that container alone; the ADD then finishes."""
    store = node.store
    store.create_pool("default", "10.155.0.0/24", 4)
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    (hook_dir / "pause").write_text("add:wired slow1\n")
    node.coild.hook_dir = str(hook_dir)
    node.start()
    old = add(node, node.new_pod(), "old1")
    pod = node.new_pod()
    result = {}
    t = threading.Thread(target=lambda: result.update(
        out=node.cni.call("add", pod, "slow1", "default", "slow1")), daemon=True)
    t.start()
    wait_for(lambda: (hook_dir / "add:wired.slow1.reached").exists(), what="ADD paused")
    assert {a.container_id for a in held(store).values()} == {"old1", "slow1"}
    assert gc(node, **{"cni.dev/valid-attachments": []}) == (0, None)
    assert [a.container_id for a in held(store).values()] == ["slow1"]   # old1 freed
    assert "gc: request in flight, attachment kept" in node.coild.log()
    (hook_dir / "add:wired.slow1.resume").touch()
    t.join(60)
    assert result["out"][0] == 0, result
    assert [a.container_id for a in held(store).values()] == ["slow1"]
    assert old not in held(store)


def test_gc_goes_on_past_errors(node, tmp_path):
    """etcd out of reach: every release fails; each is counted, the answer is
    one error naming how many failed, and coild still holds every record."""
    from helpers import EtcdServer
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    private = EtcdServer(str(tmp_path / "etcd-gc")).start()
    try:
        s = IPAMStore(Etcd(EtcdConfig(endpoints=(private.endpoint,), prefix="/gc/")))
        s.create_pool("default", "10.156.0.0/24", 4)
        node.coild.etcd_endpoint = private.unix_endpoint
        node.coild.prefix = "/gc/"
        node.coild.extra += ["--etcd-timeout", "1s"]
        node.start()
        ips = {add(node, node.new_pod(), f"g{i}") for i in range(3)}
        private.stop()
        rc, out = gc(node)
        assert rc != 0 and out["code"] == 11, out
        assert "3 failed" in out["msg"] and "freed 0" in out["msg"], out
        assert metric(node, "coild_cni_gc_errors_total") == 3
        assert node.coild.log().count("gc: freeing an attachment failed") == 3
        s.close()
        status, body = node.coild.rest("GET", "/status")      # coild still holds all three
        assert status == 200 and set(body["pods"].values()) == ips
    finally:
        private.stop()

