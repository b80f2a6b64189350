"""``coilctl smoke`` against a real kube-apiserver, real etcd, real coild in
two node network namespaces and the real libcni client.

There is no kubelet: ``KubeletStandIn`` plays its part for the two test
nodes. It watches the Pods bound to them; for a new Pod it makes a pod
network namespace, runs the CNI ADD through coil (tests/cniclient/cnitool
with the coil conflist, inside the node's namespace) and patches the Pod's
status (podIP, phase Running) through the API server. A Pod whose command
is not ``sleep`` (the ping Pods) has that command run inside its network
namespace, and its phase set to Succeeded or Failed from the exit code.
When a Pod is deleted it runs the CNI DEL and removes the namespace; a
graceful deletion is finished with a grace-0 delete, as a kubelet does.

Routing between the nodes, two ways: ``static`` (a veth pair on private
addresses; each node routes the pool's subnet to the other, its own Pods'
/32 routes and its blocks' ``unreachable`` routes being more specific), and
``bird`` (docs/install.md's top-of-rack layout: a switch namespace running
BIRD, both nodes running BIRD from deploy/bird/bird-tor.conf.tmpl, which
carries the blocks coild puts in table 119). Nothing touches the root
network namespace; coilctl runs there but only talks to the API server and
etcd on loopback.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from types import SimpleNamespace

import pytest

from harness import CoilNode, Netns
from helpers import REPO, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

POOL = "10.71.0.0/24"
LINK = ("172.30.255.1", "172.30.255.2")     # node A, node B ends of the link between them
MANAGED = "app.kubernetes.io/managed-by=coilctl-smoke"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeletStandIn:
    """The kubelet of ``nodes`` (name -> harness.CoilNode, started). Pods of a node in ``hold`` stay Pending (an image pull that never
    ends); their deletion is still finished."""

    def __init__(self, core, nodes: dict):
        self.core = core
        self.nodes = nodes
        self.hold: set[str] = set()
        self.sandboxes: dict[str, dict] = {}    # Pod uid -> {netns, node, thread, ip}
        self.seen: dict[str, str] = {}          # Pod name -> phase we gave it ("Pending": held)
        self.stopping: set[str] = set()
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.workers: list[threading.Thread] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="kubelet-stand-in", daemon=True)
        self.thread.start()

    # -- the watch ----------------------------------------------------------------
    def _loop(self):
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        rv = None
        while not self.stop.is_set():
            try:
                if rv is None:
                    pods = self.core.list_pod_for_all_namespaces()
                    rv = pods.metadata.resource_version
                    for p in pods.items:
                        self._event("ADDED", p)
                w = watch.Watch()
                for ev in w.stream(self.core.list_pod_for_all_namespaces, resource_version=rv,
                                   timeout_seconds=1):
                    rv = ev["object"].metadata.resource_version
                    self._event(ev["type"], ev["object"])
                    if self.stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:
                    rv = None
                else:
                    self.errors.append(f"watch: {exc}")
                    self.stop.wait(0.2)
            except Exception as exc:            # noqa: BLE001 - keep playing the kubelet
                self.errors.append(f"watch: {exc!r}")
                self.stop.wait(0.2)

    def _event(self, kind: str, pod):
        node = pod.spec.node_name
        if node not in self.nodes:
            return
        uid = pod.metadata.uid
        with self.lock:
            if kind == "DELETED" or pod.metadata.deletion_timestamp is not None:
                if uid not in self.stopping:
                    self.stopping.add(uid)
                    self._spawn(self._stop, pod, kind != "DELETED")
                return
            if uid in self.sandboxes or pod.metadata.name in self.seen:
                return
            if node in self.hold:
                self.seen[pod.metadata.name] = "Pending"
                return
            sb = {"node": node, "netns": None, "ip": None,
                  "namespace": pod.metadata.namespace, "name": pod.metadata.name}
            self.sandboxes[uid] = sb
            self.seen[pod.metadata.name] = "Starting"
            sb["thread"] = self._spawn(self._start, pod, sb)

    def _spawn(self, fn, *args) -> threading.Thread:
        t = threading.Thread(target=self._guard, args=(fn, *args), daemon=True)
        self.workers.append(t)
        t.start()
        return t

    def _guard(self, fn, *args):
        try:
            fn(*args)
        except Exception as exc:                # noqa: BLE001 - reported by the test
            self.errors.append(f"{fn.__name__}: {exc!r}")

    # -- the Pod's life -----------------------------------------------------------
    def _status(self, pod, phase: str, ip: str | None, state: dict):
        status = {"phase": phase, "hostIP": LINK[0] if pod.spec.node_name == self.a else LINK[1],
                  "containerStatuses": [{"name": "smoke", "image": pod.spec.containers[0].image,
                                         "imageID": "", "ready": phase == "Running",
                                         "restartCount": 0, "state": state}]}
        if ip:
            status.update(podIP=ip, podIPs=[{"ip": ip}])
        self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                              {"status": status})
        self.seen[pod.metadata.name] = phase

    @property
    def a(self) -> str:
        return next(iter(self.nodes))

    def _start(self, pod, sb):
        node = self.nodes[pod.spec.node_name]
        sb["netns"] = Netns("pod")
        rc, out = node.cni.call("add", sb["netns"], pod.metadata.uid.replace("-", ""),
                                pod.metadata.namespace, pod.metadata.name)
        if rc != 0:
            self.errors.append(f"CNI ADD of {pod.metadata.name}: {out}")
            return
        sb["ip"] = str(ipaddress.ip_interface(out["ips"][0]["address"]).ip)
        self._status(pod, "Running", sb["ip"], {"running": {"startedAt": now()}})
        command = list(pod.spec.containers[0].command)
        if command[0] == "sleep":
            return
        r = sb["netns"].exec(*command, check=False, timeout=60)
        sb["output"] = r.stdout + r.stderr
        self._status(pod, "Succeeded" if r.returncode == 0 else "Failed", sb["ip"],
                     {"terminated": {"exitCode": r.returncode, "startedAt": now(),
                                     "finishedAt": now(),
                                     "reason": "Completed" if r.returncode == 0 else "Error"}})

    def _teardown(self, uid: str):
        sb = self.sandboxes.pop(uid, None)
        if sb is None:
            return
        sb["thread"].join(120)
        if sb["netns"] is not None:
            if sb["ip"] is not None:
                rc, out = self.nodes[sb["node"]].cni.call("del", sb["netns"],
                                                          uid.replace("-", ""),
                                                          sb["namespace"], sb["name"])
                if rc != 0:
                    self.errors.append(f"CNI DEL of {uid}: {out}")
            sb["netns"].delete()

    def _stop(self, pod, finish: bool):
        from kubernetes.client.exceptions import ApiException
        self._teardown(pod.metadata.uid)
        if finish:          # the kubelet's last word on a graceful deletion
            try:
                self.core.delete_namespaced_pod(
                    pod.metadata.name, pod.metadata.namespace,
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}})
            except ApiException as exc:
                if exc.status not in (404, 409):
                    raise

    def close(self):
        self.stop.set()
        self.thread.join(30)
        for t in list(self.workers):
            t.join(120)
        for uid in list(self.sandboxes):
            self._teardown(uid)

    def netns_count(self) -> int:
        return sum(1 for sb in self.sandboxes.values() if sb["netns"] is not None)


def ip(ns: Netns, *args):
    return ns.exec("ip", *args)


TOR, NODE_ADDRESSES = "172.30.0.1", ("172.30.0.11", "172.30.0.12")
TOR_BIRD = """
router id 172.30.0.1;
log "LOG" all;
protocol device { }
protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }
template bgp node { local 172.30.0.1 as 65001; connect retry time 2;
  ipv4 { import all; export all; }; }
protocol bgp n1 from node { neighbor 172.30.0.11 as 64601; }
protocol bgp n2 from node { neighbor 172.30.0.12 as 64601; }
"""


class Bird:
    """BIRD inside a namespace, stopped by PID."""

    def __init__(self, ns: Netns, workdir: str, conf: str):
        self.ctl = os.path.join(workdir, "bird.ctl")
        self.log = os.path.join(workdir, "bird.log")
        conf = conf.replace("log syslog {", f'log "{self.log}" {{').replace('"LOG"',
                                                                              f'"{self.log}"')
        path = os.path.join(workdir, "bird.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns.name, "bird", "-f", "-c", path,
                                      "-s", self.ctl], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wire_static(a, b):
    """A veth pair between the nodes; each routes the pool to the other (its
    own Pods' /32s and its blocks' unreachable routes are more specific)."""
    ip(a.ns, "link", "add", "smoke0", "type", "veth", "peer", "name", "smoke0",
       "netns", b.ns.name)
    for n, addr, peer in ((a, LINK[0], LINK[1]), (b, LINK[1], LINK[0])):
        ip(n.ns, "addr", "add", f"{addr}/30", "dev", "smoke0")
        ip(n.ns, "link", "set", "smoke0", "up")
        ip(n.ns, "route", "add", POOL, "via", peer, "dev", "smoke0")


def wire_bird(a, b, tmp_path, made: list):
    """docs/install.md's top-of-rack layout: a switch namespace (bridge,
    BIRD, eBGP AS 65001) and both nodes on it, each running BIRD from
    deploy/bird/bird-tor.conf.tmpl (rack AS 64601), which exports the
    blocks coild puts in table 119."""
    tor = Netns("tor")
    made.append(tor)
    ip(tor, "link", "add", "br0", "type", "bridge")
    ip(tor, "addr", "add", f"{TOR}/24", "dev", "br0")
    ip(tor, "link", "set", "br0", "up")
    tor.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    for i, (n, addr) in enumerate(zip((a, b), NODE_ADDRESSES)):
        ip(tor, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
           "netns", n.ns.name)
        ip(tor, "link", "set", f"p{i}", "master", "br0", "up")
        ip(n.ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        ip(n.ns, "link", "set", "eth0", "up")
    birds = {}
    d = tmp_path / "bird-tor"
    d.mkdir()
    made.append(Bird(tor, str(d), TOR_BIRD))
    for n, addr in zip((a, b), NODE_ADDRESSES):
        r = subprocess.run([os.path.join(REPO, "deploy", "bird", "render.sh"),
                            "bird-tor.conf.tmpl"], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, NODE_ADDRESS=addr, NODE_AS="64601",
                                    TOR_ADDRESS=TOR, TOR_AS="65001",
                                    POOL_PREFIXES=f"{POOL}{{24,32}}"))
        assert r.returncode == 0, r.stderr
        d = tmp_path / f"bird-{n.name}"
        d.mkdir()
        birds[n.name] = Bird(n.ns, str(d), r.stdout)
        made.append(birds[n.name])
    return birds


@pytest.fixture
def cluster(request, kube_apiserver, etcd_server, etcd_prefix, store, tmp_path):
    """Two Ready Nodes, each a network namespace running coild and played
    by the kubelet stand-in, routed to each other (``static``, or ``bird``
    by indirect parametrisation); a namespace for the Pods."""
    from kubernetes.client.exceptions import ApiException
    routing = getattr(request, "param", "static")
    core = kube_apiserver.core()
    store.create_pool("default", POOL, 3)
    tag = uuid.uuid4().hex[:6]
    names = [f"coiltest-smoke-{tag}-a", f"coiltest-smoke-{tag}-b"]
    nodes: dict[str, CoilNode] = {}
    namespace = f"coiltest-smoke-{tag}"
    kubelet = None
    made: list = []             # BIRDs and the switch namespace, stopped/removed at the end
    c = SimpleNamespace(baseline=set(), birds={})
    try:
        for name in names:
            work = str(tmp_path / name)
            os.makedirs(work)
            n = CoilNode(work, etcd_server.unix_endpoint, etcd_prefix, node_name=name)
            n.name = name
            nodes[name] = n
            n.ns.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        a, b = nodes[names[0]], nodes[names[1]]
        if routing == "static":
            wire_static(a, b)
        else:
            c.birds = wire_bird(a, b, tmp_path, made)
        for name, n in nodes.items():
            n.start()
            core.create_node({"metadata": {"name": name}})
            core.patch_node_status(name, {"status": {"conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "stand-in", "lastHeartbeatTime": now(),
                 "lastTransitionTime": now()}]}})
            # the node lifecycle controller's part: admission tainted the new Node not-ready
            core.patch_node(name, {"spec": {"taints": None}})
        if routing == "bird":
            # a cluster already running Pods: each node holds a block and BGP has
            # carried it to the other node before the smoke test starts
            warm = {}
            for i, n in enumerate((a, b)):
                pod = n.new_pod()
                rc, out = n.cni.call("add", pod, f"warm{i}", "default", f"warm-{i}")
                assert rc == 0, out
                warm[n.name] = (pod, str(ipaddress.ip_interface(out["ips"][0]["address"]).ip))
            c.baseline = {w[1] for w in warm.values()}
            wait_for(lambda: warm[a.name][0].exec("ping", "-c", "1", "-W", "1", warm[b.name][1],
                                                  check=False).returncode == 0,
                     timeout=90, interval=1, what="BGP to carry both blocks")
        core.create_namespace({"metadata": {"name": namespace}})
        kubelet = KubeletStandIn(core, nodes)
        c.core, c.nodes, c.a, c.b = core, nodes, a, b
        c.namespace, c.kubelet, c.store = namespace, kubelet, store
        c.kubeconfig = kube_apiserver.kubeconfig()
        c.etcd = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", etcd_prefix]
        c.home = str(tmp_path / "home")
        os.makedirs(c.home)
        yield c
    finally:
        for p in core.list_namespaced_pod(namespace).items if kubelet else []:
            try:
                core.delete_namespaced_pod(p.metadata.name, namespace, grace_period_seconds=0)
            except ApiException:
                pass
        if kubelet is not None:
            kubelet.close()
        for thing in made:
            if isinstance(thing, Bird):
                thing.stop()
        for name, n in nodes.items():
            n.close()
            try:
                core.delete_node(name)
            except ApiException:
                pass
        for thing in made:
            if isinstance(thing, Netns):
                thing.delete()


def coilctl(c, *args, etcd=True, output="json", timeout=120):
    """``hypercoil coilctl [etcd flags] -o OUTPUT ARGS`` with no config
    file or COILCTL_* variable around: (CompletedProcess, parsed JSON)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COILCTL", "KUBECONFIG"))}
    env["HOME"] = c.home
    cmd = [sys.executable, "-m", "coil", "coilctl", *(c.etcd if etcd else []), "-o", output,
           "smoke", "--kubeconfig", c.kubeconfig, "--namespace", c.namespace, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    data = json.loads(r.stdout) if output == "json" and r.stdout.strip() else None
    return r, data


def smoke_pods(c) -> list[str]:
    return [p.metadata.name for p in
            c.core.list_pod_for_all_namespaces(label_selector=MANAGED).items]


def assert_all_gone(c):
    """No smoke Pod left in the API, no pod namespace, no address held."""
    try:
        wait_for(lambda: not smoke_pods(c), timeout=30, what="the smoke Pods to be deleted")
    except AssertionError:
        left = c.core.list_pod_for_all_namespaces(label_selector=MANAGED).items
        raise AssertionError([(p.metadata.name, p.status.phase, p.metadata.deletion_timestamp,
                               p.metadata.finalizers) for p in left], c.kubelet.errors,
                             c.kubelet.seen, c.kubelet.stopping) from None
    wait_for(lambda: c.kubelet.netns_count() == 0 and not c.kubelet.sandboxes, timeout=60,
             what="the stand-in kubelet to tear the sandboxes down")
    wait_for(lambda: {a.address for a in c.store.all_addresses()[0]} <= c.baseline, timeout=30,
             what="addresses to be freed")
    assert not c.kubelet.errors, c.kubelet.errors


def one_line_error(r, needle: str):
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("coilctl: error: ") and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# -- the cases --------------------------------------------------------------------------
def test_pods_on_two_nodes_ping_each_other(cluster):
    c = cluster
    r, rep = coilctl(c, "--node", c.a.name, "--node", c.b.name)
    assert r.returncode == 0, (r.stderr, r.stdout, c.kubelet.errors)
    assert r.stderr == ""
    assert rep["ok"] and rep["problems"] == [] and rep["next_steps"] == []
    assert rep["nodes"] == [c.a.name, c.b.name]
    assert [(d["from_node"], d["to_node"], d["result"]) for d in rep["directions"]] == \
        [(c.a.name, c.b.name, "ok"), (c.b.name, c.a.name, "ok")]
    # four Pods, each on its node, each address in pool default, held by that node in etcd
    assert sorted(p["role"] for p in rep["pods"]) == ["ping-a-b", "ping-b-a", "server-a",
                                                       "server-b"]
    for p in rep["pods"]:
        assert p["pool"] == "default"
        assert ipaddress.ip_address(p["ip"]) in ipaddress.ip_network(POOL)
    servers = {p["role"]: p for p in rep["pods"] if p["role"].startswith("server")}
    assert servers["server-a"]["node"] == c.a.name and servers["server-b"]["node"] == c.b.name
    for d, server in zip(rep["directions"], ("server-b", "server-a")):
        assert d["to_ip"] == servers[server]["ip"]
    assert rep["pool_check"]["checked"] and rep["pool_check"]["outside"] == []
    assert rep["cleanup"]["kept"] is False and len(rep["cleanup"]["deleted"]) == 4
    assert_all_gone(c)

    # the nodes picked by default, no etcd configured: the pool check is skipped and says so
    r, _ = coilctl(c, etcd=False, output="human")
    assert r.returncode == 0, (r.stderr, r.stdout)
    assert f"nodes {c.a.name} and {c.b.name}" in r.stdout
    assert "pool check: skipped: etcd is not configured" in r.stdout
    assert "result: ok, both directions" in r.stdout and "deleted 4 Pods" in r.stdout
    assert_all_gone(c)


@pytest.mark.parametrize("cluster", ["bird"], indirect=True)
def test_pods_ping_each_other_over_bgp_and_fail_when_a_session_is_lost(cluster):
    c = cluster
    r, rep = coilctl(c)
    assert r.returncode == 0, (r.stderr, r.stdout, c.kubelet.errors)
    assert [d["result"] for d in rep["directions"]] == ["ok", "ok"]
    assert {p["node"] for p in rep["pods"]} == {c.a.name, c.b.name}
    assert_all_gone(c)

    # node B's BIRD stops: the switch withdraws B's block from A, and B forgets A's
    c.birds[c.b.name].stop()
    wait_for(lambda: "proto bird" not in c.a.ns.exec("ip", "route", "show").stdout,
             timeout=60, what="node A to lose the routes learned by BGP")
    r, rep = coilctl(c, "--node", c.a.name, "--node", c.b.name)
    assert r.returncode == 3, (r.stderr, r.stdout)
    one_line_error(r, "smoke test failed: ping from node")
    assert [d["result"] for d in rep["directions"]] == ["failed", "failed"]
    assert any("birdc show route for" in s for s in rep["next_steps"])
    assert_all_gone(c)


def test_a_broken_route_fails_with_the_next_steps(cluster):
    c = cluster
    ip(c.b.ns, "route", "del", POOL)          # node B no longer reaches node A's Pods
    r, rep = coilctl(c, "--node", c.a.name, "--node", c.b.name)
    assert r.returncode == 3, (r.stderr, r.stdout)
    one_line_error(r, "smoke test failed: ping from node")
    assert not rep["ok"]
    # replies from B to A are lost as well: both directions fail, neither times out
    assert [d["result"] for d in rep["directions"]] == ["failed", "failed"]
    assert all(d["exit_code"] not in (0, None) for d in rep["directions"])
    steps = "\n".join(rep["next_steps"])
    for d in rep["directions"]:
        assert f"coilctl address info {d['to_ip']}" in steps
    assert "ip route show table 119" in steps and "birdc show route for" in steps
    assert "docs/troubleshooting.md#when-coilctl-smoke-fails" in steps
    assert len(rep["cleanup"]["deleted"]) == 4
    assert_all_gone(c)

    # human output: the failure and the steps are printed too
    r, _ = coilctl(c, "--node", c.a.name, "--node", c.b.name, output="human")
    assert r.returncode == 3
    assert "result: FAILED" in r.stdout and "next steps:" in r.stdout
    assert_all_gone(c)


def test_addresses_outside_every_pool_fail(cluster, etcd_server):
    c = cluster
    # coilctl reads another prefix, whose only pool is elsewhere: these addresses are not "its"
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    other = f"/coiltest-other-{uuid.uuid4().hex[:8]}/"
    s = IPAMStore(Etcd(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=other, timeout=5)))
    try:
        s.create_pool("default", "10.250.0.0/24", 3)
        c.etcd = ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", other]
        r, rep = coilctl(c, "--node", c.a.name, "--node", c.b.name)
    finally:
        s.delete_pool("default")
        s.close()
    assert r.returncode == 3, (r.stderr, r.stdout)
    one_line_error(r, "which is in no coil pool")
    assert [d["result"] for d in rep["directions"]] == ["ok", "ok"]
    assert sorted(o["pod"] for o in rep["pool_check"]["outside"]) == \
        sorted(p["name"] for p in rep["pods"])
    assert any("another CNI plugin" in s for s in rep["next_steps"])
    assert_all_gone(c)


def test_keep_leaves_the_pods_and_says_how_to_delete_them(cluster):
    c = cluster
    r, _ = coilctl(c, "--node", c.a.name, "--node", c.b.name, "--keep", output="human")
    assert r.returncode == 0, (r.stderr, r.stdout)
    assert "Pods kept (--keep)" in r.stdout
    hint = r.stdout.split("delete pod -l ")[1].split()[0]
    assert hint.startswith("coil.cybozu.com/smoke-run=")
    kept = c.core.list_namespaced_pod(c.namespace, label_selector=hint).items
    assert len(kept) == 4 and len(smoke_pods(c)) == 4
    assert {p.metadata.labels["app.kubernetes.io/managed-by"] for p in kept} == {"coilctl-smoke"}
    assert sorted(p.status.phase for p in kept) == ["Running", "Running", "Succeeded",
                                                    "Succeeded"]
    for p in kept:
        c.core.delete_namespaced_pod(p.metadata.name, c.namespace, grace_period_seconds=1)
    assert_all_gone(c)


def test_timeout_deletes_the_pods(cluster):
    c = cluster
    c.kubelet.hold.add(c.b.name)              # node B never starts its Pods
    r, rep = coilctl(c, "--node", c.a.name, "--node", c.b.name, "--timeout", "3s")
    assert r.returncode == 3, (r.stderr, r.stdout)
    one_line_error(r, f"on node {c.b.name} got no address within 3s")
    assert [d["result"] for d in rep["directions"]] == ["not run", "not run"]
    pods = {p["role"]: p for p in rep["pods"]}
    assert set(pods) == {"server-a", "server-b"}            # no ping Pod was made
    assert pods["server-a"]["ip"] and pods["server-b"]["ip"] is None
    assert any(f"describe pod {pods['server-b']['name']}" in s for s in rep["next_steps"])
    assert sorted(rep["cleanup"]["deleted"]) == sorted(p["name"] for p in rep["pods"])
    assert_all_gone(c)


@pytest.mark.parametrize("sig,with_etcd", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupt_deletes_the_pods(cluster, sig, with_etcd):
    c = cluster
    c.kubelet.hold.add(c.b.name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COILCTL", "KUBECONFIG"))}
    env["HOME"] = c.home
    proc = subprocess.Popen([sys.executable, "-m", "coil", "coilctl",
                             *(c.etcd if with_etcd else ()), "smoke",
                             "--kubeconfig", c.kubeconfig, "--namespace", c.namespace,
                             "--node", c.a.name, "--node", c.b.name, "--timeout", "5m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # both servers exist, A's is running: coilctl is waiting for B's address
        wait_for(lambda: len(smoke_pods(c)) == 2 and c.kubelet.seen.get(
            [n for n in smoke_pods(c) if n.endswith("server-a")][0]) == "Running",
                 timeout=60, what="server-a running")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert err == "coilctl: error: interrupted; deleted 2 smoke Pods\n"
    assert_all_gone(c)


@pytest.fixture
def kube_only(kube_apiserver, tmp_path):
    """A Ready node, a NotReady node and a namespace; no coild needed."""
    from kubernetes.client.exceptions import ApiException
    core = kube_apiserver.core()
    tag = uuid.uuid4().hex[:6]
    c = SimpleNamespace()
    c.core = core
    c.ready, c.ready2 = f"coiltest-smoke-{tag}-ready", f"coiltest-smoke-{tag}-ready2"
    c.not_ready = f"coiltest-smoke-{tag}-down"
    c.namespace = f"coiltest-smoke-{tag}"
    c.kubeconfig = kube_apiserver.kubeconfig()
    c.home = str(tmp_path)
    c.etcd = []
    try:
        for name, status in ((c.ready, "True"), (c.ready2, "True"), (c.not_ready, "False")):
            core.create_node({"metadata": {"name": name}})
            core.patch_node_status(name, {"status": {"conditions": [
                {"type": "Ready", "status": status, "reason": "Test", "message": "",
                 "lastHeartbeatTime": now(), "lastTransitionTime": now()}]}})
        core.create_namespace({"metadata": {"name": c.namespace}})
        yield c
    finally:
        for name in (c.ready, c.ready2, c.not_ready):
            try:
                core.delete_node(name)
            except ApiException:
                pass


@pytest.mark.parametrize("case", ["unknown", "not-ready", "twice", "once", "three", "namespace",
                                  "timeout", "image", "etcd"])
def test_bad_arguments_name_the_value_and_create_nothing(kube_only, case):
    c = kube_only
    ns = ["--namespace", c.namespace]
    args, needle = {
        "unknown": (["--node", c.ready, "--node", "no-such-node", *ns],
                    "node no-such-node does not exist"),
        "not-ready": (["--node", c.ready, "--node", c.not_ready, *ns],
                      f"node {c.not_ready} is not Ready"),
        "twice": (["--node", c.ready, "--node", c.ready, *ns],
                  f"--node {c.ready} is given twice"),
        "once": (["--node", c.ready, *ns], f"not 1 time(s): {c.ready}"),
        "three": (["--node", c.ready, "--node", "x", "--node", "y", *ns], "not 3 time(s)"),
        "namespace": (["--node", c.ready, "--node", c.ready2, "--namespace", "nope-x"],
                      "namespace nope-x does not exist"),
        "timeout": (["--timeout", "-3s", *ns], "--timeout"),
        "image": (["--image", "bad image", *ns], "invalid --image 'bad image'"),
        # etcd configured but down: an error before anything is created
        "etcd": (["--node", c.ready, "--node", c.ready2, *ns], "no etcd member answered"),
    }[case]
    pre = ["--etcd-endpoints", "http://127.0.0.1:1", "--etcd-timeout", "1s"] \
        if case == "etcd" else []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COILCTL", "KUBECONFIG"))}
    env["HOME"] = c.home
    r = subprocess.run([sys.executable, "-m", "coil", "coilctl", *pre, "smoke", "--kubeconfig",
                        c.kubeconfig, *args], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0
    one_line_error(r, needle)
    assert r.stdout == ""
    assert smoke_pods(c) == []


def test_a_refused_pod_creation_is_one_line_and_leaves_nothing(kube_only, kube_apiserver):
    """A user who may read nodes and namespaces but not create Pods: the
    API server's 403 ends the run with one line, and no Pod exists."""
    c = kube_only
    name = f"coiltest-smoke-{uuid.uuid4().hex[:6]}"
    kube_apiserver.apply([
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": c.namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name},
         "rules": [{"apiGroups": [""], "resources": ["nodes", "namespaces"],
                    "verbs": ["get", "list"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": c.namespace}]},
    ])
    token = kube_apiserver.service_account_token(c.namespace, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COILCTL", "KUBECONFIG"))}
    env["HOME"] = c.home
    r = subprocess.run([sys.executable, "-m", "coil", "coilctl", "smoke", "--kubeconfig",
                        kube_apiserver.kubeconfig(token), "--namespace", c.namespace,
                        "--node", c.ready, "--node", c.ready2],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    one_line_error(r, "HTTP 403")
    assert "may not create Pods in " + c.namespace in r.stderr
    assert smoke_pods(c) == []
