"""CNI 1.1 conformance of the coil plugin, for real: etcd, coild in a node
namespace, pods in their own namespaces, the plugin binary as the runtime
runs it, and Debian's libcni (tests/cniclient) where it can drive the call.

Debian's libcni is 1.1.2: it predates GC and STATUS (and "cniVersions").
So GC and STATUS are driven here exactly as the spec's protocol says: the
plugin executable is exec'd with CNI_COMMAND (and CNI_PATH) in the
environment and the plugin's configuration on stdin, built the way libcni
1.2+ builds it from a conflist (the plugin object, plus the conflist's
"name" and the chosen "cniVersion", plus "cni.dev/valid-attachments" for GC).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from harness import CNI, Coild, Netns, coil_conflist, plugin_binary
from helpers import EtcdServer
from test_coild_cni import add, base_env, cluster, conf, etcd_ips, pod_ip, raw_call  # noqa: F401

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shipped_conflist(socket_path: str) -> dict:
    """deploy/coil-config.yaml's conflist, pointed at the test's coild."""
    with open(os.path.join(REPO, "deploy", "coil-config.yaml")) as f:
        doc = yaml.safe_load(f)
    conflist = json.loads(doc["data"]["cni_netconf"])
    for plugin in conflist["plugins"]:
        if plugin["type"] == "coil":
            plugin["socket"] = socket_path
    return conflist


def plugin_conf(conflist: dict, version: str, **extra) -> str:
    """The stdin libcni (1.2+) gives the first plugin of ``conflist`` when it
    has picked ``version``: the plugin object with the list's name and the
    version injected (libcni's buildOneConfig), plus ``extra``."""
    doc = dict(conflist["plugins"][0], name=conflist["name"], cniVersion=version, **extra)
    return json.dumps(doc)


def newest_listed(conflist: dict, known=("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")) -> str:
    """What a libcni that knows ``known`` picks: the highest of
    "cniVersions" it knows (libcni 1.2 and later), else "cniVersion"."""
    listed = [v for v in conflist.get("cniVersions", []) if v in known]
    if listed:
        return max(listed, key=lambda v: tuple(int(p) for p in v.split(".")))
    return conflist["cniVersion"]


# -- 1. the shipped configuration is CNI 1.1 -------------------------------------------------
def test_shipped_conflist_old_libcni_adds_new_runtime_reaches_gc_and_status(cluster):
    """deploy/coil-config.yaml: Debian's libcni 1.1.2 keeps "cniVersion"
    1.0.0 and ADD/DEL work through the whole shipped chain (not CHECK: Debian's
    bandwidth plugin panics on CHECK without runtime bandwidth config); a runtime
    whose libcni picks from "cniVersions" gets 1.1.0, and its STATUS and GC
    (driven per the spec's protocol, see the module docstring) reach coild."""
    cluster.store.create_pool("default", "10.60.0.0/24", 4)
    cluster.start()
    shipped = shipped_conflist(cluster.coild.socket)
    assert shipped["cniVersion"] == "1.0.0" and shipped["cniVersions"] == ["1.0.0", "1.1.0"]
    cluster.cni.write_conf(shipped)
    keep, stale = cluster.new_pod(), cluster.new_pod()
    res = add(cluster, keep, "keep1", "default", "keep")
    assert res["cniVersion"] == "1.0.0"                  # libcni 1.1.2 chose 1.0.0
    stale_res = add(cluster, stale, "stale1", "default", "stale")

    version = newest_listed(shipped)
    assert version == "1.1.0"
    env = {"CNI_COMMAND": "STATUS", "CNI_PATH": cluster.cni.bin}
    before = cluster.coild.log().count("cni request failed")
    assert raw_call(cluster, env, plugin_conf(shipped, version)) == (0, None)
    env = {"CNI_COMMAND": "GC", "CNI_PATH": cluster.cni.bin}
    gc = plugin_conf(shipped, version, **{"cni.dev/valid-attachments": [
        {"containerID": "keep1", "ifname": "eth0"}]})
    assert raw_call(cluster, env, gc) == (0, None)
    held = etcd_ips(cluster.store)
    assert [a.container_id for a in held.values()] == ["keep1"]
    assert stale_res["interfaces"][0]["name"] not in cluster.node.links()
    assert "eth0" in keep.links()
    assert cluster.coild.log().count("cni request failed") == before
    assert cluster.cni.call("del", keep, "keep1", "default", "keep")[0] == 0
    assert etcd_ips(cluster.store) == {}
    # the same STATUS once coild is gone: the launcher answers 50, not 11
    cluster.coild.stop()
    rc, out = raw_call(cluster, {"CNI_COMMAND": "STATUS"}, plugin_conf(shipped, version))
    assert rc == 1 and out["code"] == 50, out
    assert "coild is not reachable" in out["msg"]


# -- 2. STATUS per the spec ----------------------------------------------------------------
def status(cluster, **kw):
    return raw_call(cluster, {"CNI_COMMAND": "STATUS"}, conf(cluster, cniVersion="1.1.0", **kw))


def test_status_needs_no_default_pool_and_reports_exhaustion(cluster):
    """0 with only a namespace pool; 51 with no pool at all; 51 when every
    pool is exhausted (the node's block full and no free block left); 0
    again once an address is free."""
    cluster.start()
    rc, out = status(cluster)
    assert rc == 1 and out["code"] == 51 and "no address pool" in out["msg"], out
    # one block of 4 addresses: the only one of the pool
    cluster.store.create_pool("team-a", "10.61.0.0/30", 2)
    assert status(cluster) == (0, None)                 # no pool named "default" needed
    pods = []
    for i in range(4):
        pod = cluster.new_pod()
        add(cluster, pod, f"c{i}", "team-a", f"p{i}")
        pods.append(pod)
    extra = cluster.new_pod()
    rc, out = cluster.cni.call("add", extra, "c9", "team-a", "p9")
    assert rc != 0 and out["code"] == 102, out          # the ADD fails: exhausted
    rc, out = status(cluster)
    assert rc == 1 and out["code"] == 51 and "exhausted" in out["msg"], out
    # IPv6 asked for and no pool has IPv6: also 51
    assert cluster.cni.call("del", pods[0], "c0", "team-a", "p0")[0] == 0
    assert status(cluster) == (0, None)
    rc, out = status(cluster, ipv4=False, ipv6=True)
    assert rc == 1 and out["code"] == 51, out


@pytest.fixture
def private_etcd(tmp_path):
    server = EtcdServer(str(tmp_path / "etcd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_status_is_50_when_etcd_is_unreachable(private_etcd, tmp_path):
    """coild up, its etcd killed: STATUS answers 50 (coild cannot serve);
    every other failure of the plugin stays 11."""
    node = Netns("node")
    coild = Coild(node, str(tmp_path), private_etcd.unix_endpoint, "/coil-status/")
    try:
        coild.start()
        cni = CNI(node, str(tmp_path), coil_conflist(coild.socket, version="1.1.0"),
                  plugin_binary())

        class C:
            pass
        c = C()
        c.node, c.coild, c.cni = node, coild, cni
        from coil.config import EtcdConfig
        from coil.store import IPAMStore
        from coil.store.etcd import Etcd
        store = IPAMStore(Etcd(EtcdConfig(endpoints=(private_etcd.endpoint,),
                                          prefix="/coil-status/", timeout=5.0)))
        try:
            store.create_pool("default", "10.62.0.0/24", 4)
        finally:
            store.close()
        assert status(c) == (0, None)
        private_etcd.stop()
        rc, out = status(c)
        assert rc == 1 and out["code"] == 50, out
    finally:
        coild.stop()
        node.delete()


# -- 3. input validation with the spec's codes ----------------------------------------------
@pytest.mark.parametrize("ifname", ["eth:0", "eth 0", "a/b", ".", "..", "x" * 16, "tab\tx"])
def test_bad_ifname_is_4_and_changes_nothing(cluster, ifname):
    cluster.store.create_pool("default", "10.63.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    links = cluster.node.links()
    rc, out = raw_call(cluster, base_env(pod, cid="c1", CNI_IFNAME=ifname), conf(cluster))
    assert rc == 1 and out["code"] == 4 and "CNI_IFNAME" in out["msg"], out
    assert etcd_ips(cluster.store) == {}
    assert cluster.node.links() == links and pod.links() == ["lo"]


@pytest.mark.parametrize("cid", ["-abc", "_abc", ".abc", "abc/def", "abc def", "abc:1", "ä1"])
def test_bad_container_id_is_4_and_changes_nothing(cluster, cid):
    cluster.store.create_pool("default", "10.64.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    for command in ("ADD", "CHECK", "DEL"):
        rc, out = raw_call(cluster, base_env(pod, cid=cid, CNI_COMMAND=command), conf(cluster))
        assert rc == 1 and out["code"] == 4 and "CNI_CONTAINERID" in out["msg"], (command, out)
    assert etcd_ips(cluster.store) == {} and pod.links() == ["lo"]
    # the spec's alphabet is accepted
    rc, out = raw_call(cluster, base_env(pod, cid="A1_b.c-d"), conf(cluster))
    assert rc == 0, out


def test_missing_cni_version_is_0_1_0_and_incompatible(cluster):
    """As skel: no "cniVersion" means 0.1.0, which coil does not speak: 1."""
    cluster.store.create_pool("default", "10.65.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    doc = json.loads(conf(cluster))
    del doc["cniVersion"]
    rc, out = raw_call(cluster, base_env(pod, cid="c1"), json.dumps(doc))
    assert rc == 1 and out["code"] == 1 and "0.1.0" in out["msg"], out
    assert etcd_ips(cluster.store) == {}


def test_del_is_best_effort(cluster):
    """Malformed CNI_ARGS, a conflist edited since the ADD (both families
    off, a bad mtu, no name) or an unusable ifname never make DEL fail:
    it removes what the records of the attachment say and succeeds. An
    unusable ifname names no attachment an ADD could have made: that DEL
    succeeds and leaves the container's eth0 attachment alone."""
    cluster.store.create_pool("default", "10.66.0.0/24", 4)
    cluster.start()
    pods = [cluster.new_pod() for _ in range(4)]
    for i, pod in enumerate(pods):
        add(cluster, pod, f"c{i}", "default", f"p{i}")
    assert len(etcd_ips(cluster.store)) == 4
    edited = json.loads(conf(cluster))
    cases = [
        (base_env(pods[0], cid="c0", CNI_COMMAND="DEL", CNI_ARGS="garbage;;=x"), conf(cluster)),
        (base_env(pods[1], cid="c1", CNI_COMMAND="DEL"),
         json.dumps(dict(edited, ipv4=False, ipv6=False, mtu=1))),
        (base_env(pods[2], cid="c2", CNI_COMMAND="DEL"),
         json.dumps({k: v for k, v in edited.items() if k != "name"})),
        (base_env(pods[3], cid="c3", CNI_COMMAND="DEL", CNI_IFNAME="bad:name"), conf(cluster)),
    ]
    for env, stdin in cases:
        rc, out = raw_call(cluster, env, stdin)
        assert (rc, out) == (0, None), (env, out)
    assert [a.container_id for a in etcd_ips(cluster.store).values()] == ["c3"]
    for i in range(3):
        assert "eth0" not in pods[i].links()
    assert "eth0" in pods[3].links()
    assert cluster.cni.call("del", pods[3], "c3", "default", "p3") == (0, None)
    assert etcd_ips(cluster.store) == {}
    # the last one's host end went too; nothing routes its address
    r = cluster.node.exec("ip", "route", "show", check=False)
    assert not [line for line in r.stdout.splitlines()
                if line.startswith("10.66.0.") and " dev veth" in line], r.stdout


# -- 6. the ADD result ----------------------------------------------------------------------
def test_result_1_1_carries_mtu_and_scoped_gateway_route(cluster):
    """A 1.1.0 ADD (driven per the spec's protocol: Debian's libcni cannot
    parse 1.1.0 results) names the MTU it set and the on-link route to the
    gateway with scope link (253); both match the pod's kernel state."""
    cluster.store.create_pool("default", "10.67.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    rc, res = raw_call(cluster, base_env(pod, cid="c1"), conf(cluster, cniVersion="1.1.0",
                                                               mtu=1400))
    assert rc == 0, res
    assert res["cniVersion"] == "1.1.0"
    cont = res["interfaces"][1]
    assert cont["name"] == "eth0" and cont["mtu"] == 1400
    assert "mtu 1400" in pod.exec("ip", "link", "show", "eth0").stdout
    assert res["routes"] == [{"dst": "169.254.1.1/32", "scope": 253},
                             {"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    assert "169.254.1.1 dev eth0" in pod.exec("ip", "route").stdout
    # 1.0.0 has no interface mtu nor route scope: left out
    pod2 = cluster.new_pod()
    rc, res = raw_call(cluster, base_env(pod2, cid="c2"), conf(cluster, mtu=1400))
    assert rc == 0 and "mtu" not in res["interfaces"][1], res
    assert res["routes"][0] == {"dst": "169.254.1.1/32"}


def test_add_not_first_in_the_chain_passes_prev_result_on(cluster):
    """libcni (Debian's, 1.0.0) runs loopback first, then coil with
    loopback's result as prevResult: coil's result keeps loopback's
    interface and address and adds its own after them (interface indexes
    shifted)."""
    cluster.store.create_pool("default", "10.68.0.0/24", 4)
    cluster.start()
    conflist = {"cniVersion": "1.0.0", "name": "coil-test", "plugins": [
        {"type": "loopback"}, {"type": "coil", "socket": cluster.coild.socket}]}
    cluster.cni.write_conf(conflist)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    names = [i["name"] for i in res["interfaces"]]
    assert names[0] == "lo" and names[-1] == "eth0" and names[1].startswith("veth"), res
    assert res["ips"][0]["address"].startswith("127.0.0.1"), res
    ours = res["ips"][-1]
    assert ours["address"].startswith("10.68.0.") and ours["interface"] == 2, res
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    assert etcd_ips(cluster.store) == {}


# -- 5. CHECK per the spec ------------------------------------------------------------------
def _host(res):
    return res["interfaces"][0]["name"]


def _release_in_etcd(cluster, pod, res, ip):
    """The reservation disappears from etcd; coild's cache still has it."""
    rec = etcd_ips(cluster.store)[ip]
    assert cluster.store.release_address(rec.block, rec.offset)


def _pod_end_replaced_by_a_bridge(cluster, pod, res, ip):
    """eth0 becomes a bridge with the veth's MAC, MTU, address and routes:
    only the interface type differs from what ADD made."""
    mac = res["interfaces"][1]["mac"]
    pod.exec("ip", "link", "set", "eth0", "down")
    pod.exec("ip", "link", "set", "eth0", "name", "eth9")
    pod.exec("ip", "link", "add", "eth0", "address", mac, "mtu", "1400", "type", "bridge")
    pod.exec("ip", "link", "set", "eth0", "up")
    pod.exec("ip", "addr", "add", f"{ip}/32", "dev", "eth0")
    pod.exec("ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
    pod.exec("ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")


DRIFT = {
    "pod-link-down": lambda c, pod, res, ip: pod.exec("ip", "link", "set", "eth0", "down"),
    "host-link-down": lambda c, pod, res, ip: c.node.exec("ip", "link", "set", _host(res),
                                                           "down"),
    "gateway-addr-removed": lambda c, pod, res, ip: c.node.exec(
        "ip", "addr", "del", "169.254.1.1/32", "dev", _host(res)),
    "pod-mac-changed": lambda c, pod, res, ip: pod.exec("ip", "link", "set", "eth0",
                                                        "address", "02:00:00:00:00:42"),
    "host-mac-changed": lambda c, pod, res, ip: c.node.exec("ip", "link", "set", _host(res),
                                                             "address", "02:00:00:00:00:43"),
    "mtu-changed": lambda c, pod, res, ip: pod.exec("ip", "link", "set", "eth0", "mtu", "1300"),
    "host-mtu-changed": lambda c, pod, res, ip: c.node.exec("ip", "link", "set", _host(res),
                                                             "mtu", "1300"),
    "pod-address-removed": lambda c, pod, res, ip: pod.exec("ip", "addr", "del", f"{ip}/32",
                                                            "dev", "eth0"),
    "default-route-removed": lambda c, pod, res, ip: pod.exec("ip", "route", "del", "default"),
    "host-route-removed": lambda c, pod, res, ip: c.node.exec("ip", "route", "del",
                                                              f"{ip}/32"),
    "reservation-gone-from-etcd": _release_in_etcd,
    "pod-interface-not-a-veth": _pod_end_replaced_by_a_bridge,
}


@pytest.mark.parametrize("drift", list(DRIFT))
def test_check_sees_drift(cluster, drift):
    """Through Debian's libcni (which passes the cached prevResult): CHECK
    passes on the pod ADD wired, then one thing is broken and CHECK fails
    with 104 (never 3: that would tell the runtime no DEL is needed); DEL
    still cleans up."""
    cluster.store.create_pool("default", "10.69.0.0/24", 4)
    cluster.start(mtu=1400)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    ip = pod_ip(res)
    rc, out = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc == 0, out
    DRIFT[drift](cluster, pod, res, ip)
    rc, out = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc != 0 and out["code"] == 104, out
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    assert etcd_ips(cluster.store) == {}


DRIFT6 = {
    "host-gateway6-removed": lambda c, pod, res: c.node.exec(
        "ip", "-6", "addr", "del", "fe80::1/64", "dev", _host(res)),
    "pod-default6-route-removed": lambda c, pod, res: pod.exec(
        "ip", "-6", "route", "del", "default", "via", "fe80::1", "dev", "eth0"),
}


@pytest.mark.parametrize("drift", list(DRIFT6))
def test_check_sees_ipv6_drift(cluster, drift):
    """Dual stack: the IPv6 side of what ADD set up (fe80::1 on the host
    end, the pod's IPv6 default route) is checked too: one broken, CHECK
    fails with 104; DEL still cleans up."""
    cluster.store.create_pool("default", "10.71.0.0/24", 4)
    cluster.store.add_subnet("default", "fd00:71::/120")
    cluster.start(ipv6=True)
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert len(res["ips"]) == 2, res
    rc, out = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc == 0, out
    DRIFT6[drift](cluster, pod, res)
    rc, out = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc != 0 and out["code"] == 104 and "fe80::1" in out["msg"], out
    assert cluster.cni.call("del", pod, "c1")[0] == 0
    assert etcd_ips(cluster.store) == {}


def test_check_tolerates_later_plugins_and_needs_prev_result(cluster):
    """Routes and addresses a later plugin adds do not fail CHECK; a CHECK
    without prevResult is refused (7); a prevResult naming another address
    fails (104)."""
    cluster.store.create_pool("default", "10.70.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    pod.exec("ip", "route", "add", "10.123.0.0/24", "via", "169.254.1.1", "dev", "eth0")
    pod.exec("ip", "addr", "add", "192.168.77.1/32", "dev", "eth0")
    rc, out = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc == 0, out
    env = base_env(pod, cid="c1", CNI_COMMAND="CHECK", CNI_ARGS=
                   "K8S_POD_NAMESPACE=default;K8S_POD_NAME=c1")
    rc, out = raw_call(cluster, env, conf(cluster))
    assert rc == 1 and out["code"] == 7 and "prevResult" in out["msg"], out
    assert raw_call(cluster, env, conf(cluster, prevResult=res)) == (0, None)
    other = json.loads(json.dumps(res))
    other["ips"][0]["address"] = "10.70.0.250/32"
    rc, out = raw_call(cluster, env, conf(cluster, prevResult=other))
    assert rc == 1 and out["code"] == 104, out
