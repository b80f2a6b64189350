"""Attachments keyed as the CNI spec says: (CNI_CONTAINERID, CNI_IFNAME)
within one network ``name``. Driven the Multus way: one container, several
coil attachments (two networks, or eth0 and net1 of one network), each with
its own addresses and host veth; DEL, CHECK, GC and a retried ADD of one
never touch another. For real: etcd, coild in a node namespace, pods in
their own namespaces, Debian's libcni (tests/cniclient/cnitool).
"""

from __future__ import annotations

import json
import os

import pytest

from harness import CNI, coil_conflist, plugin_binary
from test_coild_cni import add, cluster, etcd_ips, leftovers, pod_ip, raw_call  # noqa: F401

from coil.coild.podnet import PodNetwork, host_veth_name, legacy_host_veth_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def network(cluster, name: str) -> CNI:
    """A libcni client for one more conflist of type coil, named ``name``
    (its own directory: conflist, libcni's result cache)."""
    workdir = os.path.join(cluster.coild.workdir, f"net-{name}")
    os.makedirs(workdir, exist_ok=True)
    conflist = dict(coil_conflist(cluster.coild.socket), name=name)
    return CNI(cluster.node, workdir, conflist, plugin_binary())


def attach(cni: CNI, pod, cid: str, ifname: str, ns="default", name="web") -> dict:
    rc, out = cni.call("add", pod, cid, ns, name, ifname=ifname)
    assert rc == 0, out
    return out


def host_of(result) -> str:
    return next(i["name"] for i in result["interfaces"] if not i.get("sandbox"))


def routes_to(node, ip) -> list[str]:
    return [line.strip() for line in node.exec("ip", "route").stdout.splitlines()
            if line.split()[0] == ip]


def ping(ns, ip) -> bool:
    return ns.exec("ping", "-c1", "-W2", ip, check=False).returncode == 0


def pod_addrs(pod, ifname) -> str:
    return pod.exec("ip", "-o", "addr", "show", "dev", ifname, check=False).stdout


def test_two_networks_one_container(cluster):
    """coil-a on eth0 and coil-b on net1 of one container (Multus): two
    addresses, two host veths; a retried ADD of each answers the same; a
    coild restart keeps both; DEL of one leaves the other held in etcd,
    routed, pinging and passing CHECK."""
    cluster.store.create_pool("default", "10.70.0.0/24", 4)
    cluster.start()
    net_a, net_b = network(cluster, "coil-a"), network(cluster, "coil-b")
    pod = cluster.new_pod()
    res_a = attach(net_a, pod, "c1", "eth0")
    res_b = attach(net_b, pod, "c1", "net1")
    ip_a, ip_b = pod_ip(res_a), pod_ip(res_b)
    host_a, host_b = host_of(res_a), host_of(res_b)
    assert ip_a != ip_b and host_a != host_b
    assert host_a == host_veth_name("c1", "eth0", "coil-a") and len(host_a) == 15
    assert host_b == host_veth_name("c1", "net1", "coil-b")
    held = etcd_ips(cluster.store)
    assert {(a.container_id, a.network, a.ifname) for a in held.values()} == {
        ("c1", "coil-a", "eth0"), ("c1", "coil-b", "net1")}
    assert held[ip_a].network == "coil-a" and held[ip_b].network == "coil-b"
    assert f"{ip_a}/32" in pod_addrs(pod, "eth0") and f"{ip_b}/32" in pod_addrs(pod, "net1")
    assert routes_to(cluster.node, ip_a) == [f"{ip_a} dev {host_a} proto static scope link"]
    assert routes_to(cluster.node, ip_b) == [f"{ip_b} dev {host_b} proto static scope link"]
    assert ping(cluster.node, ip_a) and ping(cluster.node, ip_b)
    # retried ADDs: the same result each, nothing new
    assert attach(net_a, pod, "c1", "eth0") == res_a
    assert attach(net_b, pod, "c1", "net1") == res_b
    assert sorted(etcd_ips(cluster.store)) == sorted([ip_a, ip_b])
    for cni, ifname in ((net_a, "eth0"), (net_b, "net1")):
        assert cni.call("check", pod, "c1", "default", "web", ifname=ifname) == (0, None)
    # a restart's reconcile keeps both host veths
    assert cluster.coild.stop() == 0
    cluster.coild.start()
    assert {host_a, host_b} <= set(cluster.node.links())

    assert net_a.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    held = etcd_ips(cluster.store)
    assert list(held) == [ip_b] and held[ip_b].ifname == "net1"
    assert host_a not in cluster.node.links() and routes_to(cluster.node, ip_a) == []
    assert host_b in cluster.node.links()
    assert routes_to(cluster.node, ip_b) == [f"{ip_b} dev {host_b} proto static scope link"]
    assert "eth0" not in pod.links() and "net1" in pod.links()
    assert ping(cluster.node, ip_b) and ping(pod, "169.254.1.1")
    assert net_b.call("check", pod, "c1", "default", "web", ifname="net1") == (0, None)
    # the DEL again (the runtime retries): nothing more goes
    assert net_a.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert list(etcd_ips(cluster.store)) == [ip_b] and ping(cluster.node, ip_b)

    assert net_b.call("del", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert leftovers(cluster) == ([], {})


def test_one_network_two_ifnames(cluster):
    """eth0 and net1 of one container in the same network: two
    attachments. DEL of net1 leaves eth0 working and its CHECK passing; the
    eth0 ADD retried still answers the same; DEL of eth0 then frees it."""
    cluster.store.create_pool("default", "10.71.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    cni = cluster.cni
    res0 = attach(cni, pod, "c1", "eth0")
    res1 = attach(cni, pod, "c1", "net1")
    ip0, ip1 = pod_ip(res0), pod_ip(res1)
    host0, host1 = host_of(res0), host_of(res1)
    assert ip0 != ip1 and host0 != host1
    assert attach(cni, pod, "c1", "net1") == res1 and attach(cni, pod, "c1", "eth0") == res0
    assert sorted(etcd_ips(cluster.store)) == sorted([ip0, ip1])
    assert ping(cluster.node, ip0) and ping(cluster.node, ip1)
    for ifname in ("eth0", "net1"):
        assert cni.call("check", pod, "c1", "default", "web", ifname=ifname) == (0, None)

    assert cni.call("del", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert list(etcd_ips(cluster.store)) == [ip0]
    assert host1 not in cluster.node.links() and host0 in cluster.node.links()
    assert routes_to(cluster.node, ip0) == [f"{ip0} dev {host0} proto static scope link"]
    assert ping(cluster.node, ip0) and "net1" not in pod.links()
    assert cni.call("check", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert attach(cni, pod, "c1", "eth0") == res0
    assert cni.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert leftovers(cluster) == ([], {})


def test_retried_add_of_the_later_attachment_after_the_first_is_gone(cluster):
    """net1 was added beside eth0 (its pod-side routes carry a metric of
    their own); once eth0 is deleted, net1's routes carry the traffic and a
    retried ADD of net1 still answers the same."""
    cluster.store.create_pool("default", "10.72.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    res0 = attach(cluster.cni, pod, "c1", "eth0")
    res1 = attach(cluster.cni, pod, "c1", "net1")
    routes = pod.exec("ip", "route").stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "default via 169.254.1.1 dev net1" in routes      # beside it, higher metric
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert "default via 169.254.1.1 dev net1" in pod.exec("ip", "route").stdout
    assert ping(pod, "169.254.1.1") and ping(cluster.node, pod_ip(res1))
    assert attach(cluster.cni, pod, "c1", "net1") == res1
    assert pod_ip(res0) not in etcd_ips(cluster.store)
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert leftovers(cluster) == ([], {})


def test_dual_stack_two_ifnames(cluster):
    """IPv4 and IPv6 on eth0 and net1 of one container: four addresses;
    once eth0 is deleted, net1's routes of both families carry the
    traffic (both families' pod-side routes were added beside eth0's)."""
    cluster.store.create_pool("default", "10.76.0.0/24", 4)
    cluster.store.add_subnet("default", "fd00:76::/120")
    cluster.start(ipv6=True)
    pod = cluster.new_pod()
    res0 = attach(cluster.cni, pod, "c1", "eth0")
    res1 = attach(cluster.cni, pod, "c1", "net1")
    ips1 = sorted(i["address"].split("/")[0] for i in res1["ips"])
    assert len(ips1) == 2 and len(etcd_ips(cluster.store)) == 4
    assert cluster.cni.call("check", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert sorted(etcd_ips(cluster.store)) == sorted(ips1)
    assert "default via fe80::1 dev net1" in pod.exec("ip", "-6", "route").stdout
    for ip in ips1:
        assert cluster.node.exec("ping", "-6" if ":" in ip else "-4", "-c1", "-W2", ip,
                                 check=False).returncode == 0, ip
    assert cluster.cni.call("check", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert attach(cluster.cni, pod, "c1", "net1") == res1
    assert all(i["address"].split("/")[0] not in etcd_ips(cluster.store) for i in res0["ips"])
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert leftovers(cluster) == ([], {})


def gc(cluster, name: str, valid) -> tuple:
    conf = {"cniVersion": "1.1.0", "name": name, "type": "coil",
            "socket": cluster.coild.socket, "cni.dev/valid-attachments": valid}
    return raw_call(cluster, {"CNI_COMMAND": "GC"}, json.dumps(conf))


def test_gc_frees_only_the_attachment_not_listed(cluster):
    """GC of a network whose valid list names only eth0 of c1 frees c1's
    net1 of that network (address, host veth) and nothing else: not eth0,
    and not c1's attachment of another network."""
    cluster.store.create_pool("default", "10.73.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    net_b = network(cluster, "coil-b")
    res0 = attach(cluster.cni, pod, "c1", "eth0")          # network coil-test
    res1 = attach(cluster.cni, pod, "c1", "net1")
    res2 = attach(net_b, pod, "c1", "net2")                  # network coil-b
    assert gc(cluster, "coil-test", [{"containerID": "c1", "ifname": "eth0"}]) == (0, None)
    held = etcd_ips(cluster.store)
    assert sorted(held) == sorted([pod_ip(res0), pod_ip(res2)])
    links = cluster.node.links()
    assert host_of(res1) not in links and {host_of(res0), host_of(res2)} <= set(links)
    assert routes_to(cluster.node, pod_ip(res1)) == []
    assert ping(cluster.node, pod_ip(res0)) and ping(cluster.node, pod_ip(res2))
    assert cluster.cni.call("check", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert net_b.call("check", pod, "c1", "default", "web", ifname="net2") == (0, None)
    # the other network's GC with an empty list: only its own attachment goes
    assert gc(cluster, "coil-b", []) == (0, None)
    assert list(etcd_ips(cluster.store)) == [pod_ip(res0)]
    assert ping(cluster.node, pod_ip(res0))
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="eth0") == (0, None)
    assert cluster.cni.call("del", pod, "c1", "default", "web", ifname="net1") == (0, None)
    assert net_b.call("del", pod, "c1", "default", "web", ifname="net2") == (0, None)
    assert leftovers(cluster) == ([], {})


def legacy_pod(cluster, pod, cid: str, ns="default", name="old") -> str:
    """What an older coild left: an address record without origin, network
    or ifname, and a pair whose host end has the pod's older name. Made
    while coild is down; returns the address."""
    store = cluster.store
    block = store.acquire_block("default", cluster.coild.node_name, 4)
    rec = store.assign_address(block, 1, ns, name, cid)       # v1-era fields only
    raw = json.loads(store.etcd.get(f"ip/{block.cidr}/1").value)
    assert sorted(raw) == ["container_id", "created_at", "namespace", "pod"]
    PodNetwork(cluster.node.path).setup(pod.path, "eth0", legacy_host_veth_name(ns, name),
                                        [rec.address])
    return rec.address


def test_old_record_without_ifname_is_the_eth0_attachment(cluster):
    """A record written before records named their attachment counts as
    eth0 of any network: a retried ADD answers it with its older host veth,
    CHECK passes, a net1 ADD beside it gets its own address, a restart
    keeps the older veth, and DEL of eth0 removes the older veth and
    releases only that address."""
    cluster.store.create_pool("default", "10.74.0.0/24", 4)
    pod = cluster.new_pod()
    ip = legacy_pod(cluster, pod, "old1")
    old_host = legacy_host_veth_name("default", "old")
    cluster.start()
    assert old_host in cluster.node.links()
    res = attach(cluster.cni, pod, "old1", "eth0", name="old")
    assert pod_ip(res) == ip and host_of(res) == old_host       # the ADD retried
    assert cluster.cni.call("check", pod, "old1", "default", "old") == (0, None)
    res1 = attach(cluster.cni, pod, "old1", "net1", name="old")
    assert pod_ip(res1) != ip and host_of(res1) == host_veth_name("old1", "net1", "coil-test")
    assert cluster.coild.stop() == 0
    cluster.coild.start()                                # reconcile keeps the older veth
    assert old_host in cluster.node.links() and ping(cluster.node, ip)

    assert cluster.cni.call("del", pod, "old1", "default", "old") == (0, None)
    assert list(etcd_ips(cluster.store)) == [pod_ip(res1)]
    assert old_host not in cluster.node.links() and routes_to(cluster.node, ip) == []
    assert ping(cluster.node, pod_ip(res1))
    assert cluster.cni.call("del", pod, "old1", "default", "old", ifname="net1") == (0, None)
    assert leftovers(cluster) == ([], {})


def test_old_record_del_after_the_pod_namespace_is_gone(cluster):
    """DEL of an older coild's attachment whose namespace is already gone
    (so its pair is too): the record is released; a DEL whose network
    configuration has no name (best effort) finds it as well."""
    cluster.store.create_pool("default", "10.75.0.0/24", 4)
    pod = cluster.new_pod()
    legacy_pod(cluster, pod, "old2")
    cluster.start()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "old2", "CNI_NETNS": "",
           "CNI_IFNAME": "eth0", "CNI_ARGS": ""}
    conf = {"cniVersion": "1.0.0", "type": "coil", "socket": cluster.coild.socket}
    pod.delete()
    assert raw_call(cluster, env, json.dumps(conf)) == (0, None)
    assert leftovers(cluster) == ([], {})


def test_rest_addresses_are_no_attachment(cluster):
    """A REST address (``POST /ip``, origin rest) of a container that also
    has a CNI attachment: each is its own; ``DELETE /ip`` frees only the
    REST one (the pod keeps its address and veth), CNI DEL only the CNI
    one."""
    cluster.store.create_pool("default", "10.77.0.0/24", 4)
    cluster.start()
    pod = cluster.new_pod()
    res = attach(cluster.cni, pod, "c1", "eth0")
    ip = pod_ip(res)
    status, body = cluster.coild.rest("POST", "/ip", {"pod-namespace": "default",
                                                      "pod-name": "web", "container-id": "c1"})
    assert status == 200 and body["address"] != ip
    rest_ip = body["address"]
    held = etcd_ips(cluster.store)
    assert (held[ip].origin, held[rest_ip].origin) == ("cni", "rest")
    status, body = cluster.coild.rest("GET", "/ip/default/web/c1")
    assert status == 200 and sorted(body["addresses"]) == sorted([ip, rest_ip])
    assert cluster.coild.rest("DELETE", "/ip/default/web/c1") == (
        200, {"address": rest_ip, "status": 200})
    assert list(etcd_ips(cluster.store)) == [ip] and ping(cluster.node, ip)
    assert cluster.coild.rest("DELETE", "/ip/default/web/c1")[0] == 404
    assert cluster.cni.call("check", pod, "c1", "default", "web") == (0, None)
    # and the other way round: CNI DEL leaves a REST address alone
    rest_ip = cluster.coild.rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "web",
                                                 "container-id": "c1"})[1]["address"]
    assert cluster.cni.call("del", pod, "c1", "default", "web") == (0, None)
    assert list(etcd_ips(cluster.store)) == [rest_ip]
    assert cluster.coild.rest("DELETE", "/ip/default/web/c1")[0] == 200
    assert leftovers(cluster) == ([], {})
