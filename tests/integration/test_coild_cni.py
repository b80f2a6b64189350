"""coild and the coil CNI plugin, for real: etcd, network namespaces, the
libcni client (tests/cniclient), the reference plugins for chaining.

Each test gets a node namespace running its own coild and pod namespaces;
all are removed afterwards, even on failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness import CoilNode

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def cluster(etcd_server, store, etcd_prefix, tmp_path):
    """One node: namespace + coild + libcni client; pods made on demand."""
    c = CoilNode(str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    c.node = c.ns
    c.store = store
    c.prefix = etcd_prefix
    c.etcd = etcd_server
    try:
        yield c
    finally:
        c.close()


def add(c, pod, cid, ns="default", name=None):
    rc, out = c.cni.call("add", pod, cid, ns, name or cid)
    assert rc == 0, (out, c.coild.log())
    return out


def pod_ip(result) -> str:
    return str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)


def etcd_ips(store) -> dict:
    addrs, _ = store.all_addresses()
    return {a.address: a for a in addrs}


def coild_with_flags(c, *flags) -> tuple[subprocess.CompletedProcess, str]:
    """Run a second coild of the node in the foreground with ``flags`` (for
    flags it must refuse); returns its result and the socket path it was
    given."""
    sock = os.path.join(c.coild.workdir, "bad.sock")
    r = c.node.exec("env", "COIL_NODE_NAME=node1", sys.executable, "-m", "coil", "coild",
                    "--etcd-endpoints", c.etcd.unix_endpoint, "--etcd-prefix", c.prefix,
                    "--socket", sock, "--http", "", *flags, check=False, timeout=60)
    return r, sock


def test_add_wires_pod_and_publishes_block(cluster):
    cluster.store.create_pool("default", "10.20.0.0/24", 3)
    cluster.start()
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1", "default", "web")
    ip = pod_ip(res)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.20.0.0/24")
    assert res["cniVersion"] == "1.0.0"
    assert res["ips"][0]["gateway"] == "169.254.1.1"
    assert res["routes"] == [{"dst": "169.254.1.1/32"}, {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    host, cont = res["interfaces"]
    assert host["name"].startswith("veth") and len(host["name"]) == 15
    assert cont == {"name": "eth0", "mac": cont["mac"], "sandbox": pod.path}
    # pod side
    assert f"inet {ip}/32" in pod.exec("ip", "addr", "show", "eth0").stdout
    routes = pod.exec("ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0" in routes
    # node side
    assert f"{ip} dev {host['name']}" in cluster.node.exec("ip", "route").stdout
    assert "169.254.1.1/32" in cluster.node.exec("ip", "addr", "show", host["name"]).stdout
    table = cluster.node.exec("ip", "route", "show", "table", "119").stdout
    assert "10.20.0.0/29 dev lo proto 30" in table
    # etcd knows who holds it
    rec = etcd_ips(cluster.store)[ip]
    assert (rec.namespace, rec.pod, rec.container_id) == ("default", "web", "c1")
    # traffic both ways
    assert pod.exec("ping", "-c1", "-W2", "169.254.1.1", check=False).returncode == 0
    assert cluster.node.exec("ping", "-c1", "-W2", ip, check=False).returncode == 0


def test_addresses_unique_and_second_block_taken(cluster):
    cluster.store.create_pool("default", "10.21.0.0/24", 2)   # blocks of 4
    cluster.start()
    ips = []
    for i in range(6):
        ips.append(pod_ip(add(cluster, cluster.new_pod(), f"c{i}")))
    assert len(set(ips)) == 6
    table = cluster.node.exec("ip", "route", "show", "table", "119").stdout
    assert "10.21.0.0/30 dev lo proto 30" in table and "10.21.0.4/30 dev lo proto 30" in table
    assert sorted(etcd_ips(cluster.store)) == sorted(ips)
    blocks = {b.cidr for b in cluster.store.node_blocks("node1")}
    assert blocks == {"10.21.0.0/30", "10.21.0.4/30"}


def test_namespace_pool_only_for_its_namespace(cluster):
    cluster.store.create_pool("default", "10.22.0.0/24", 4)
    cluster.store.create_pool("global", "10.23.0.0/24", 4)
    cluster.start()
    a = pod_ip(add(cluster, cluster.new_pod(), "g1", "global"))
    b = pod_ip(add(cluster, cluster.new_pod(), "d1", "default"))
    c = pod_ip(add(cluster, cluster.new_pod(), "o1", "other"))
    assert ipaddress.ip_address(a) in ipaddress.ip_network("10.23.0.0/24")
    assert ipaddress.ip_address(b) in ipaddress.ip_network("10.22.0.0/24")
    assert ipaddress.ip_address(c) in ipaddress.ip_network("10.22.0.0/24")


def test_check_passes_then_fails_without_route(cluster):
    cluster.store.create_pool("default", "10.24.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    add(cluster, pod, "c1")
    assert cluster.cni.call("check", pod, "c1", "default", "c1") == (0, None)
    pod.exec("ip", "route", "del", "default")
    rc, err = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc != 0
    assert err["code"] == 104 and "default route" in err["msg"]


def test_del_removes_everything_and_is_idempotent(cluster):
    cluster.store.create_pool("default", "10.25.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    host = res["interfaces"][0]["name"]
    assert host in cluster.node.links()
    for _ in range(2):
        assert cluster.cni.call("del", pod, "c1", "default", "c1") == (0, None)
        assert host not in cluster.node.links()
        assert "eth0" not in pod.links()
        assert etcd_ips(cluster.store) == {}
    # DEL of a container never seen, and without a netns, also succeeds
    assert cluster.cni.call("del", "", "never-added", "default", "x") == (0, None)


def test_request_lines_reach_the_log_while_coild_runs(cluster):
    """The ``cni add`` / ``cni del`` lines are deferred to coild's log
    writer thread: they are written without a later line or an exit to
    push them, each with its request's fields."""
    from helpers import wait_for
    cluster.store.create_pool("default", "10.26.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    add(cluster, pod, "c-logged", "default", "logged-pod")
    assert cluster.cni.call("del", pod, "c-logged", "default", "logged-pod") == (0, None)

    def lines():
        return [r for r in cluster.coild.records() if r.get("container") == "c-logged"]

    wait_for(lambda: len(lines()) == 2, timeout=30)
    assert cluster.coild.proc.poll() is None
    add_line, del_line = lines()
    assert (add_line["msg"], del_line["msg"]) == ("cni add", "cni del")
    assert add_line["pod"] == "logged-pod" and add_line["namespace"] == "default"
    assert add_line["level"] == "info" and add_line["ms"] > 0
    assert "_defer" not in add_line


def test_address_reused_after_del(cluster):
    cluster.store.create_pool("default", "10.26.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    first = pod_ip(add(cluster, pod, "c1"))
    assert cluster.cni.call("del", pod, "c1", "default", "c1")[0] == 0
    again = pod_ip(add(cluster, cluster.new_pod(), "c2"))
    assert again == first


def test_chained_tuning_sets_mtu(cluster):
    cluster.store.create_pool("default", "10.27.0.0/24", 4)
    cluster.start(chain=[{"type": "tuning", "mtu": 1400}])
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert res["ips"][0]["address"].endswith("/32")
    assert "mtu 1400" in pod.exec("ip", "link", "show", "eth0").stdout
    assert cluster.cni.call("check", pod, "c1", "default", "c1")[0] == 0
    assert cluster.cni.call("del", pod, "c1", "default", "c1")[0] == 0


def test_chained_portmap_and_bandwidth(cluster):
    cluster.store.create_pool("default", "10.28.0.0/24", 4)
    cluster.start(chain=[{"type": "bandwidth", "ingressRate": 1000000, "ingressBurst": 100000,
                          "egressRate": 1000000, "egressBurst": 100000}])
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    host = res["interfaces"][0]["name"]
    # bandwidth puts a tbf qdisc on the host end (our host veth from prevResult)
    assert "tbf" in cluster.node.exec("tc", "qdisc", "show", "dev", host).stdout
    assert cluster.cni.call("del", pod, "c1", "default", "c1")[0] == 0


def test_coild_restart_keeps_state(cluster):
    cluster.store.create_pool("default", "10.29.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    ip = pod_ip(add(cluster, pod, "c1"))
    # a stale route of our protocol and a foreign route in table 119
    cluster.node.exec("ip", "route", "add", "10.99.0.0/24", "dev", "lo", "table", "119", "proto", "30")
    cluster.node.exec("ip", "route", "add", "10.98.0.0/24", "dev", "lo", "table", "119", "proto", "static")
    assert cluster.coild.stop() == 0          # SIGTERM: graceful
    cluster.coild.start()
    status, body = cluster.coild.rest("GET", "/ip/default/c1/c1")
    assert status == 200 and body["address"] == ip
    table = cluster.node.exec("ip", "route", "show", "table", "119").stdout
    assert "10.29.0.0/28 dev lo proto 30" in table
    assert "10.99.0.0/24" not in table            # stale route of ours: removed
    assert "10.98.0.0/24" in table                # somebody else's: kept
    other = pod_ip(add(cluster, cluster.new_pod(), "c2"))
    assert other != ip
    assert cluster.node.exec("ping", "-c1", "-W2", ip, check=False).returncode == 0


def test_rest_api(cluster):
    cluster.store.create_pool("default", "10.30.0.0/24", 4)
    cluster.store.create_pool("tiny", "10.31.0.0/31", 0)
    cluster.start()
    rest = cluster.coild.rest
    status, body = rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "a",
                                        "container-id": "x1"})
    assert status == 200 and body["status"] == 200
    ip = body["address"]
    assert rest("GET", "/ip/default/a/x1") == (200, {"address": ip, "addresses": [ip], "status": 200})
    status, body = rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "a",
                                        "container-id": "x1"})
    assert (status, body["address"]) == (200, ip)          # a retry gets the same address
    status, body = rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "b",
                                        "container-id": "x1"})
    assert status == 409 and body["status"] == 409 and "x1" in body["error"]
    status, body = rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "a"})
    assert status == 400 and "container-id" in body["error"]
    status, body = rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "a",
                                        "container-id": "x2", "address-type": "ipv5"})
    assert status == 400 and "ipv5" in body["error"]
    status, body = rest("GET", "/status")
    # v1's shape: container ID -> address; the per-pod lists are a new key
    assert status == 200 and body["pods"] == {"x1": ip}
    assert body["pod-addresses"] == {"default/a": [ip]}
    assert body["address-blocks"] == {"default": ["10.30.0.0/28"]}
    assert body["table-routes"] == ["10.30.0.0/28"]      # read from the kernel
    assert body["unreachable-routes"] == ["10.30.0.0/28"]
    for i in range(2):
        assert rest("POST", "/ip", {"pod-namespace": "tiny", "pod-name": f"t{i}",
                                    "container-id": f"t{i}"})[0] == 200
    status, body = rest("POST", "/ip", {"pod-namespace": "tiny", "pod-name": "t9",
                                        "container-id": "t9"})
    assert status == 503 and "tiny" in body["error"]
    assert rest("DELETE", "/ip/default/a/x1")[0] == 200
    assert rest("GET", "/ip/default/a/x1")[0] == 404
    assert rest("DELETE", "/ip/default/a/x1")[0] == 404
    status, text = rest("GET", "/healthz")
    assert status == 200
    status, metrics = rest("GET", "/metrics")
    assert status == 200
    assert "coild_addresses_in_use 2.0" in metrics            # the two tiny-pool addresses
    assert 'coild_blocks{pool="default"} 1.0' in metrics
    assert 'coild_blocks{pool="tiny"} 2.0' in metrics           # blocks of one address


def test_ipv6_pool(cluster):
    cluster.store.create_pool("default", "fd00:10::/120", 4)
    cluster.start(ipv4=False, ipv6=True)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    ip = pod_ip(res)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("fd00:10::/120")
    assert res["ips"][0]["gateway"] == "fe80::1"
    assert "fd00:10::/124 dev lo proto 30" in cluster.node.exec(
        "ip", "-6", "route", "show", "table", "119").stdout
    assert cluster.node.exec("ping", "-6", "-c1", "-W2", ip, check=False).returncode == 0
    assert cluster.cni.call("check", pod, "c1", "default", "c1")[0] == 0
    assert cluster.cni.call("del", pod, "c1", "default", "c1")[0] == 0
    assert etcd_ips(cluster.store) == {}


def test_dual_stack(cluster):
    cluster.store.create_pool("default", "10.32.0.0/24", 4)
    cluster.store.add_subnet("default", "fd00:32::/120")
    cluster.start(ipv6=True)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    got = sorted(i["address"] for i in res["ips"])
    assert got[0].startswith("10.32.0.") and got[1].startswith("fd00:32::")
    assert cluster.node.exec("ping", "-c1", "-W2", got[0].split("/")[0], check=False).returncode == 0
    assert cluster.node.exec("ping", "-6", "-c1", "-W2", got[1].split("/")[0],
                             check=False).returncode == 0


# -- bad input and faults ------------------------------------------------------

def leftovers(cluster):
    """(links on the node besides lo, addresses held in etcd), once coild's
    deletion queue has deleted what DEL retired."""
    cluster.node.wait_retired_gone()
    return [l for l in cluster.node.links() if l != "lo"], etcd_ips(cluster.store)


def raw_call(cluster, env: dict, stdin: str):
    """Exec the plugin directly (no libcni) to feed it malformed input."""
    base = {"PATH": os.environ["PATH"], "CNI_PATH": cluster.cni.bin}
    r = subprocess.run(["ip", "netns", "exec", cluster.node.name,
                        os.path.join(cluster.cni.bin, "coil")],
                       input=stdin, capture_output=True, text=True, env={**base, **env}, timeout=30)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else None


def base_env(pod, cid="bad1", **kw):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": pod.path,
           "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"}
    env.update(kw)
    return env


def conf(cluster, **kw):
    d = {"cniVersion": "1.0.0", "name": "coil-test", "type": "coil", "socket": cluster.coild.socket}
    d.update(kw)
    return json.dumps(d)


def test_bad_input_is_rejected_cleanly(cluster):
    cluster.store.create_pool("default", "10.33.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    cases = [
        (base_env(pod), conf(cluster)[:-1] + ", not json", 6, "not valid JSON"),
        (base_env(pod), conf(cluster, cniVersion="9.9.9"), 1, "9.9.9"),
        (base_env(pod, CNI_ARGS="K8S_POD_NAMESPACE=default"), conf(cluster), 4, "K8S_POD_NAME"),
        (base_env(pod, CNI_ARGS="garbage"), conf(cluster), 4, "garbage"),
        (base_env(pod, CNI_NETNS="/run/netns/does-not-exist"), conf(cluster), 4, "does-not-exist"),
        (base_env(pod, CNI_COMMAND="FROB"), conf(cluster), 4, "FROB"),
        (base_env(pod, CNI_CONTAINERID=""), conf(cluster), 4, "CNI_CONTAINERID"),
        (base_env(pod), conf(cluster, mtu="big"), 7, "mtu"),
    ]
    for env, stdin, code, needle in cases:
        rc, err = raw_call(cluster, env, stdin)
        assert rc != 0, (env, stdin)
        assert err["code"] == code and needle in err["msg"], (err, needle)
        assert leftovers(cluster) == ([], {})
    assert pod.links() == ["lo"]


def test_malformed_json_is_answered_by_coild(cluster):
    """The plugin relays stdin unchecked (it only scans for the top-level
    "socket"); coild answers a document that is not JSON with one line, a
    CNI error object with code 6 (decode failure) in the cniVersion the
    document seems to name, exit 1, and nothing made."""
    cluster.store.create_pool("default", "10.39.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    head = conf(cluster, cniVersion="0.4.0")[:-1]
    cases = [head + ", broken", head + "} trailing", head + ', "n": [1, 2',
             head + ', "deep": ' + "[" * 100000 + "]" * 100000 + "}",
             head + ', "s": "\udcff"}', head + ', "k": "\\q"}']
    for stdin in cases:
        for command in ("ADD", "DEL", "CHECK"):
            r = subprocess.run(["ip", "netns", "exec", cluster.node.name,
                                os.path.join(cluster.cni.bin, "coil")],
                               input=stdin.encode("utf-8", "surrogateescape"),
                               capture_output=True, timeout=30,
                               env={"PATH": os.environ["PATH"], "CNI_PATH": cluster.cni.bin,
                                    **base_env(pod, CNI_COMMAND=command)})
            assert r.returncode == 1 and r.stderr == b"", (stdin[-40:], r)
            assert r.stdout.count(b"\n") <= 1 and b"\n" not in r.stdout.rstrip(b"\n")
            err = json.loads(r.stdout)
            assert err["code"] == 6, (stdin[-40:], err)
            assert err["msg"].startswith("network configuration on stdin is not valid JSON: ")
            assert err["cniVersion"] == "0.4.0"
    assert leftovers(cluster) == ([], {})
    assert pod.links() == ["lo"]


def test_runtime_without_pod_namespace_gets_the_default_pool(cluster):
    """podman and nerdctl pass K8S_POD_NAME but no K8S_POD_NAMESPACE: the
    container gets an address of the default pool (not of a namespace pool),
    recorded with namespace "", and CHECK and DEL work as for a pod."""
    cluster.store.create_pool("default", "10.36.0.0/24", 4)
    cluster.store.create_pool("web", "10.37.0.0/24", 4)       # a namespace pool: not used
    cluster.start()
    pod, kube_pod = cluster.new_pod(), cluster.new_pod()
    res = add(cluster, pod, "podman1", ns="", name="web")     # libcni without the namespace
    ip = pod_ip(res)
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.36.0.0/24")
    rec = etcd_ips(cluster.store)[ip]
    assert (rec.namespace, rec.pod, rec.container_id) == ("", "web", "podman1")
    assert f"inet {ip}/32" in pod.exec("ip", "addr", "show", "eth0").stdout
    # a Kubernetes pod "web" of namespace "web" beside it: its own pool and veth
    kube = add(cluster, kube_pod, "kube1", ns="web", name="web")
    assert ipaddress.ip_address(pod_ip(kube)) in ipaddress.ip_network("10.37.0.0/24")
    assert kube["interfaces"][0]["name"] != res["interfaces"][0]["name"]
    rc, out = cluster.cni.call("check", pod, "podman1", "", "web")
    assert rc == 0, out
    rc, out = cluster.cni.call("del", pod, "podman1", "", "web")
    assert rc == 0, out
    # the pod side is gone (renamed for the batched deletion, or deleted)
    assert ip not in etcd_ips(cluster.store) and "eth0" not in pod.links()
    rc, out = cluster.cni.call("del", kube_pod, "kube1", "web", "web")
    assert rc == 0, out
    assert leftovers(cluster) == ([], {})


def test_coild_not_running_gives_code_11(cluster):
    cluster.store.create_pool("default", "10.34.0.0/24", 4)
    cluster.start()
    cluster.coild.stop()
    rc, err = cluster.cni.call("add", cluster.new_pod(), "c1")
    assert rc != 0 and err["code"] == 11
    assert cluster.coild.socket in err["msg"]


def test_etcd_down_gives_code_11_and_leaves_nothing(cluster, tmp_path):
    from helpers import EtcdServer
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    private = EtcdServer(str(tmp_path / "etcd2")).start()
    try:
        s = IPAMStore(Etcd(EtcdConfig(endpoints=(private.endpoint,), prefix="/x/")))
        s.create_pool("default", "10.38.0.0/24", 4)
        s.close()
        cluster.coild.etcd_endpoint = private.unix_endpoint
        cluster.coild.prefix = "/x/"
        cluster.coild.extra = ["--etcd-timeout", "1s"]
        cluster.start()
        private.stop()
        pod = cluster.new_pod()
        rc, err = cluster.cni.call("add", pod, "c1")
        assert rc != 0 and err["code"] == 11 and "etcd" in err["msg"]
        assert cluster.node.links() == ["lo"] and pod.links() == ["lo"]
        # coild survives and works again once etcd is back
        private.start()
        deadline = time.time() + 10      # the runtime retries a code-11 ADD
        while True:
            rc, out = cluster.cni.call("add", pod, "c1")
            if rc == 0 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert rc == 0, (out, cluster.coild.log())
    finally:
        private.stop()


def test_coild_waits_for_etcd_at_start(cluster, tmp_path):
    from helpers import EtcdServer
    private = EtcdServer(str(tmp_path / "etcd3"))
    cluster.coild.etcd_endpoint = private.unix_endpoint
    cluster.coild.extra = ["--etcd-timeout", "1s"]
    cluster.coild.start(wait=False)
    from helpers import wait_for
    wait_for(lambda: cluster.coild.log().count("waiting for etcd") >= 2 or
             cluster.coild.proc.poll() is not None, what="coild to retry")
    assert cluster.coild.proc.poll() is None           # still waiting, not crashed
    try:
        private.start()
        cluster.coild.wait_ready()
    finally:
        private.stop()


def test_pool_exhausted_names_pool(cluster):
    cluster.store.create_pool("default", "10.35.0.0/31", 0)     # two addresses
    cluster.start()
    add(cluster, cluster.new_pod(), "c1")
    add(cluster, cluster.new_pod(), "c2")
    pod = cluster.new_pod()
    rc, err = cluster.cni.call("add", pod, "c3")
    assert rc != 0 and err["code"] == 102 and "'default'" in err["msg"]
    assert pod.links() == ["lo"]
    assert len(etcd_ips(cluster.store)) == 2


def test_no_pool_at_all(cluster):
    cluster.start()
    pod = cluster.new_pod()
    rc, err = cluster.cni.call("add", pod, "c1")
    assert rc != 0 and err["code"] == 101 and "default" in err["msg"]
    assert leftovers(cluster) == ([], {})


def test_failed_add_leaves_nothing_then_retry_works(cluster):
    """The container already has eth0 (made by someone else): ADD fails,
    rolls back its address and veth; after the runtime's DEL, ADD works."""
    cluster.store.create_pool("default", "10.36.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    pod.exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    rc, err = cluster.cni.call("add", pod, "c1")
    assert rc != 0 and err["code"] == 103 and "eth0" in err["msg"]
    assert leftovers(cluster) == ([], {})
    pod.exec("ip", "link", "del", "eth0")
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    res = add(cluster, pod, "c1")
    assert pod_ip(res) in etcd_ips(cluster.store)


def hooked(cluster, tmp_path, *points):
    """Run the cluster's coild through tests/coild_hooked.py, pausing at ``points``."""
    hook_dir = tmp_path / "hooks"
    hook_dir.mkdir()
    (hook_dir / "pause").write_text("".join(p + "\n" for p in points))
    cluster.coild.hook_dir = str(hook_dir)
    return hook_dir


def wait_file(path, proc=None, bound=30.0):
    """Wait until a pause point announces itself (bounded; fails the test)."""
    end = time.monotonic() + bound
    while not path.exists():
        assert proc is None or proc.poll() is None, "the client ended before the pause point"
        assert time.monotonic() < end, f"{path.name} never reached"
        time.sleep(0.01)


def start_add(cluster, pod, cid):
    return subprocess.Popen(
        ["ip", "netns", "exec", cluster.node.name, "tests/cniclient/cnitool", "add",
         cluster.cni.conf_path, pod.path, cid, "eth0", "default", cid],
        env=cluster.cni.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_in_the_middle_of_add(cluster, tmp_path):
    cluster.store.create_pool("default", "10.37.0.0/24", 4)
    hooks = hooked(cluster, tmp_path, "add:wired c1")
    cluster.start()
    pod = cluster.new_pod()
    proc = start_add(cluster, pod, "c1")
    wait_file(hooks / "add:wired.c1.reached", proc)      # address recorded, veth made
    assert etcd_ips(cluster.store) and "eth0" in pod.links()
    cluster.coild.stop(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0
    # the runtime calls DEL: coild is down, so it must fail (and be retried)
    rc, err = cluster.cni.call("del", pod, "c1")
    assert rc != 0 and err["code"] == 11
    cluster.coild.hook_dir = None
    cluster.coild.start()
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    assert leftovers(cluster) == ([], {})
    assert pod.links() == ["lo"]
    # and the retried ADD works
    assert pod_ip(add(cluster, pod, "c1"))


def test_sigterm_drains_the_add_in_flight(cluster, tmp_path):
    """SIGTERM while an ADD is paused after wiring: coild stops accepting at
    once, lets the ADD finish, then closes its etcd client and exits 0."""
    cluster.store.create_pool("default", "10.38.0.0/24", 4)
    hooks = hooked(cluster, tmp_path, "add:wired c1")
    cluster.start()
    pod, late = cluster.new_pod(), cluster.new_pod()
    proc = start_add(cluster, pod, "c1")
    wait_file(hooks / "add:wired.c1.reached", proc)
    cluster.coild.proc.send_signal(signal.SIGTERM)
    wait_file(hooks / "shutdown:closed.reached")
    rc, err = cluster.cni.call("add", late, "c2")        # no longer accepted
    assert rc != 0 and err["code"] == 11 and "not reachable" in err["msg"]
    assert cluster.coild.proc.poll() is None              # still draining c1
    (hooks / "add:wired.c1.resume").touch()
    out, errout = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out, errout, cluster.coild.log())
    assert cluster.coild.proc.wait(timeout=60) == 0       # no second signal
    cluster.coild.stop()
    log = cluster.coild.log()
    assert log.index("draining requests in flight") < log.index("cni add") < \
        log.index("coild stopped")
    ip = pod_ip(json.loads(out))
    assert list(etcd_ips(cluster.store)) == [ip] and "eth0" in pod.links()
    assert late.links() == ["lo"]
    cluster.coild.hook_dir = None                          # the runtime's DEL: clean
    cluster.coild.start()
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    assert leftovers(cluster) == ([], {})


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_legacy_result_shape(cluster, version):
    cluster.store.create_pool("default", "10.39.0.0/24", 4)
    cluster.start(version=version)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert res["cniVersion"] == version
    assert res["ips"][0]["version"] == "4" and res["ips"][0]["interface"] == 1
    rc, _ = cluster.cni.call("del", pod, "c1")
    assert rc == 0


def test_gc_frees_stale_attachments_and_status(cluster):
    cluster.store.create_pool("default", "10.40.0.0/24", 4)
    cluster.start()
    keep, stale = cluster.new_pod(), cluster.new_pod()
    add(cluster, keep, "keep1", "default", "keep")
    stale_res = add(cluster, stale, "stale1", "default", "stale")
    gc_conf = conf(cluster, cniVersion="1.1.0",
                   **{"cni.dev/valid-attachments": [{"containerID": "keep1", "ifname": "eth0"}]})
    rc, out = raw_call(cluster, {"CNI_COMMAND": "GC", "CNI_PATH": cluster.cni.bin}, gc_conf)
    assert (rc, out) == (0, None)
    held = etcd_ips(cluster.store)
    assert [a.container_id for a in held.values()] == ["keep1"]
    assert stale_res["interfaces"][0]["name"] not in cluster.node.links()
    assert "eth0" in keep.links()
    # STATUS: ready while a pool exists
    rc, out = raw_call(cluster, {"CNI_COMMAND": "STATUS"}, conf(cluster, cniVersion="1.1.0"))
    assert (rc, out) == (0, None)
    # GC and STATUS need cniVersion 1.1.0
    rc, out = raw_call(cluster, {"CNI_COMMAND": "STATUS"}, conf(cluster, cniVersion="1.0.0"))
    assert rc != 0 and out["code"] == 1


def test_status_without_pool_is_limited(cluster):
    """No pool at all: no ADD could get an address, 51 (more: test_cni11.py)."""
    cluster.start()
    rc, out = raw_call(cluster, {"CNI_COMMAND": "STATUS"}, conf(cluster, cniVersion="1.1.0"))
    assert rc != 0 and out["code"] == 51 and "no address pool" in out["msg"]


def test_version_without_coild(cluster):
    cluster.start()
    cluster.coild.stop()
    rc, out = raw_call(cluster, {"CNI_COMMAND": "VERSION"}, conf(cluster, cniVersion="0.4.0"))
    assert rc == 0 and out["cniVersion"] == "0.4.0"
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(out["supportedVersions"])


def _etcd_calls(etcd) -> dict:
    """etcd's own count of KV requests served, by method."""
    import re
    import urllib.request
    with urllib.request.urlopen(f"{etcd.endpoint}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'grpc_server_handled_total\{[^}]*grpc_method="(\w+)",'
                         r'grpc_service="etcdserverpb\.KV"[^}]*\} (\d+)', text):
        out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return out


def _pool_reads(cluster) -> int:
    status, text = cluster.coild.rest("GET", "/metrics")
    assert status == 200
    for line in text.splitlines():
        if line.startswith("coild_pool_list_reads_total "):
            return int(float(line.split()[1]))
    raise AssertionError("coild_pool_list_reads_total missing from /metrics")


def test_add_costs_one_etcd_transaction(cluster):
    """Once the node holds a block with room, an ADD is one guarded txn and
    no other etcd request (pool names come from memory)."""
    cluster.store.create_pool("default", "10.41.0.0/24", 5)
    cluster.start()
    add(cluster, cluster.new_pod(), "warm")            # takes the block
    pods = [cluster.new_pod() for _ in range(10)]
    reads_before = _pool_reads(cluster)
    before = _etcd_calls(cluster.etcd)
    for i, pod in enumerate(pods):
        add(cluster, pod, f"c{i}")
    after = _etcd_calls(cluster.etcd)
    reads = _pool_reads(cluster) - reads_before
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("Txn", 0) == 10, delta
    # the only reads are coild's background pool refreshes (counted by coild;
    # one that started just before the first count may land inside: + 1)
    assert delta.get("Range", 0) <= reads + 1, (delta, reads)


def _tx_packets(ns, dev) -> int:
    return int(ns.exec("cat", f"/sys/class/net/{dev}/statistics/tx_packets").stdout)


def test_unassigned_address_of_a_local_block_is_unreachable(cluster):
    """A block taken -> 'unreachable <block> proto 30' in the node's main
    table. A pod pinging an unassigned address of its block gets an ICMP
    unreachable instead of the packet leaving by the node's default route
    (here a veth whose far end drops it, as a router sending it back would
    loop it). Without the route the packet does leave: the check is real."""
    cluster.store.create_pool("default", "10.20.0.0/24", 3)
    cluster.start()
    node = cluster.node
    node.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
    node.exec("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
    node.exec("ip", "link", "set", "up0", "arp", "off", "up")
    node.exec("ip", "link", "set", "up1", "up")
    node.exec("ip", "route", "add", "default", "dev", "up0")
    pod = cluster.new_pod()
    ip = pod_ip(add(cluster, pod, "c1", "default", "web"))
    block = ipaddress.ip_network(f"{ip}/29", strict=False)
    main = node.exec("ip", "route", "show").stdout
    assert f"unreachable {block} proto 30" in main
    free = str(next(a for a in block.hosts() if str(a) != ip))
    sent = _tx_packets(node, "up0")
    r = pod.exec("ping", "-c1", "-W2", free, check=False)
    assert r.returncode != 0 and "Unreachable" in r.stdout, r.stdout
    assert _tx_packets(node, "up0") == sent
    # the pod's own address still wins over the block's unreachable route
    assert node.exec("ping", "-c1", "-W2", ip, check=False).returncode == 0
    # without the unreachable route the packet takes the default route
    node.exec("ip", "route", "del", "unreachable", str(block))
    r = pod.exec("ping", "-c1", "-W1", free, check=False)
    assert "Unreachable" not in r.stdout
    assert _tx_packets(node, "up0") > sent
