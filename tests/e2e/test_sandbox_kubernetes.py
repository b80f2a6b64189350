"""The sandbox with Kubernetes (``up --kubernetes``): the real kube-apiserver
1.20 and coil-controller next to the nodes, a Node object per node, and
``node-rm``: a node goes away, its Node is deleted, coil-controller frees
its blocks in etcd and the other nodes stop routing them, while the pods
of the remaining nodes keep talking.

One 3-node sandbox (2 pods per node) is shared by the module, in this
order: Nodes registered; node-rm node3; node-rm refusals; down leaves
nothing. Needs the kube-apiserver binary (``make kube-apiserver``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from helpers import need_sandbox

from coil.sandbox import bird
from coil.sandbox import kube as skube
from coil.sandbox.cluster import Config, Sandbox, netns_exists
from coil.sandbox.state import State

NODES = ["node1", "node2", "node3"]




def new_sandbox(tag: str) -> tuple[Sandbox, str]:
    rand = uuid.uuid4().hex[:6]
    return Sandbox(f"/run/coil-e2e-{tag}-{rand}"), f"cst{tag[:3]}{rand}"


def _need_kubernetes():
    if skube.find_binary() is None:
        pytest.skip(f"kube-apiserver not built ({skube.binary_path()}): make kube-apiserver")
    pytest.importorskip("kubernetes")


@pytest.fixture(scope="module")
def ksandbox():
    need_sandbox("openssl")
    _need_kubernetes()
    sb, name = new_sandbox("kub")
    try:
        res = sb.up(Config(nodes=3, pods=2, name=name, kubernetes=True))
        sb.up_result = res
        yield sb
    finally:
        sb.down()
        sb.close()


def sandbox_cli(sb, *args, env=None):
    return subprocess.run([sys.executable, "-m", "coil", "sandbox", "--state-dir", sb.dir, *args],
                          capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, **(env or {})))


def routed(sb, node: str) -> set[str]:
    """Blocks ``node`` routes by BGP: kernel main table and BIRD's table."""
    kernel = {r["dst"] for r in sb.bird_routes(node)}
    return kernel | set(bird.routes(sb.node(node)["bird_ctl"]))


def listening_pids_in_root_namespace() -> str:
    return subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout


def test_nodes_registered_and_controller_running(ksandbox):
    sb = ksandbox
    assert sb.up_result["phases"].get("kubernetes") is not None
    data = sb.status()
    k = data["kubernetes"]
    assert k["nodes"] == NODES
    assert k["apiserver"]["running"] and k["controller"]["running"]
    assert k["controller"]["credentials"].startswith("ServiceAccount kube-system/coil-controller")
    # the Node objects carry the node's fabric address
    core = sb.kube.core(sb)
    node = sb.kube.call(sb, core.read_node, "node2")
    assert {"type": "InternalIP", "address": sb.node("node2")["address"]} in [
        a.to_dict() for a in node.status.addresses]
    # the controller is healthy and watching (its metrics live in the fabric namespace)
    status, body = sb.kube.call(sb, skube.http_get, f"http://{skube.CONTROLLER_METRICS}/readyz")
    assert status == 200, body
    # nothing of it listens in the root network namespace
    ss = listening_pids_in_root_namespace()
    for role in ("kube-apiserver", "coil-controller"):
        assert f"pid={sb.state.process(role)['pid']}," not in ss
    # the CLI shows the same
    r = sandbox_cli(sb, "status")
    assert r.returncode == 0, r.stderr
    assert "Nodes (3): node1, node2, node3" in r.stdout
    assert "coil-controller pid" in r.stdout and "kube-apiserver pid" in r.stdout


def test_node_rm_frees_the_blocks_and_the_routes_go(ksandbox):
    sb = ksandbox
    store = sb.store()
    blocks = sorted(b.cidr for b in store.node_blocks("node3"))
    assert blocks, "node3 holds no block"
    for other in ("node1", "node2"):
        assert set(blocks) <= routed(sb, other)
    node3_ns = sb.node("node3")["netns"]
    node3_pods = [p["netns"] for p in sb.state.pods if p["node"] == "node3"]

    r = sandbox_cli(sb, "node-rm", "node3")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    steps = ["node3 is gone", "Node node3 deleted", "coil-controller freed the",
             "no BGP route left to", "peer node3 removed", "node node3 removed in"]
    found = [next(i for i, ln in enumerate(lines) if s in ln) for s in steps]
    assert found == sorted(found), r.stdout
    assert "coilctl node blocks node3: nothing" in r.stdout

    sb.state.load()
    # gone from etcd (also as coilctl shows it) ...
    assert store.node_blocks("node3") == []
    assert not {a.block for a in store.all_addresses()[0]} & set(blocks)
    out = subprocess.run([sys.executable, "-m", "coil", "coilctl", "--etcd-endpoints",
                          sb.etcd_endpoint, "--etcd-prefix", sb.config.etcd_prefix,
                          "node", "blocks", "node3"], capture_output=True, text=True, timeout=30)
    # like v1: an idle node exits 0 and prints nothing
    assert (out.returncode, out.stdout) == (0, ""), out
    # ... and from the other nodes' routes
    for other in ("node1", "node2"):
        assert not set(blocks) & routed(sb, other)
    # the Node is gone from the API, the node from the sandbox
    assert sb.kube.node_names(sb) == ["node1", "node2"]
    assert sb.node_names() == ["node1", "node2"]
    assert not any(netns_exists(ns) for ns in [node3_ns, *node3_pods])
    with open(sb.state.process("coil-controller")["log"]) as f:
        assert '"freed blocks of deleted node", "node": "node3"' in f.read()
    # the pods that are left still talk to each other, the BGP mesh is whole again
    res = sb.check()
    assert res["ok"], res["failures"]
    assert res["matrix"]["node1"]["node2"][1] > 0 and res["matrix"]["node2"]["node1"][1] > 0
    status = sb.status()
    assert status["kubernetes"]["removed"]["node3"]["blocks"] == blocks


def test_node_rm_refuses_unknown_removed_and_plain_sandboxes(ksandbox, make_sandbox):
    r = sandbox_cli(ksandbox, "node-rm", "node9")
    assert r.returncode == 1 and "no node 'node9'" in r.stderr, r.stderr
    r = sandbox_cli(ksandbox, "node-rm", "node3")
    assert r.returncode == 1 and "removed already" in r.stderr, r.stderr
    plain = make_sandbox("plain")
    plain.up(Config(nodes=1, pods=0, global_pods=0, name=plain.test_name))
    r = sandbox_cli(plain, "node-rm", "node1")
    assert r.returncode == 1 and "Kubernetes is not enabled" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert plain.state.load().process("coild", "node1").alive()     # nothing was touched


def test_up_kubernetes_without_the_binary_fails_early(tmp_path):
    need_sandbox("openssl")
    state = tmp_path / "sb"
    r = subprocess.run([sys.executable, "-m", "coil", "sandbox", "--state-dir", str(state),
                        "up", "--kubernetes", "--name", "cstnobin"], capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, COIL_KUBE_APISERVER=str(tmp_path / "missing")))
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "kube-apiserver not found" in r.stderr and "make kube-apiserver" in r.stderr
    assert not state.exists() and not netns_exists("cstnobin-fabric")


def test_down_leaves_nothing(ksandbox):
    sb = ksandbox
    st = State(sb.dir).load()
    procs = list(st.processes)
    roles = {p["role"] for p in procs}
    assert {"etcd", "coild", "bird", "kube-apiserver", "coil-controller"} <= roles
    prefix = sb.config.name
    res = sb.down()
    assert res["removed"] and not res["left"]
    assert not any(p.alive() for p in procs)
    assert not [ns for ns in os.listdir("/run/netns") if ns.startswith(f"{prefix}-")]
    assert not os.path.exists(sb.dir)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if sb.dir.encode() in f.read():
                    leftovers.append(pid)
        except OSError:
            pass
    assert not leftovers
