"""DEL with the deletion queue, through the real plugin, coild, etcd and
libcni: the invariants of a deferred veth teardown.

coild runs with ``--teardown-delay 1h`` and a large batch here, so a
retired veth stays until the test makes the queue flush (SIGTERM) or kills
coild (SIGKILL): nothing depends on timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from test_coild_cni import add, cluster, coild_with_flags, etcd_ips, pod_ip  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

HOLD = ["--teardown-delay", "1h", "--teardown-batch", "1000"]


def start_holding(cluster, subnet):
    cluster.store.create_pool("default", subnet, 4)
    cluster.coild.extra = list(HOLD)
    return cluster.start()


def routes_to(node, ip) -> list[str]:
    """Lines of the node's main table that route ``ip``/32."""
    return [line.strip() for line in node.exec("ip", "route").stdout.splitlines()
            if line.split()[0] == ip]


def ping(ns, ip) -> bool:
    return ns.exec("ping", "-c1", "-W2", ip, check=False).returncode == 0


def test_address_reused_at_once_is_routed_only_to_the_new_pod(cluster):
    start_holding(cluster, "10.40.0.0/24")
    old_pod, new_pod = cluster.new_pod(), cluster.new_pod()
    res = add(cluster, old_pod, "c1", name="old")
    ip, old_host = pod_ip(res), res["interfaces"][0]["name"]
    assert cluster.cni.call("del", old_pod, "c1", "default", "old") == (0, None)
    # the old pair waits for its batch, but routes nothing any more
    (retired,) = cluster.node.retired()
    assert old_host not in cluster.node.links()
    assert routes_to(cluster.node, ip) == []
    assert ip not in etcd_ips(cluster.store)
    # the next pod gets the same address at once ...
    res = add(cluster, new_pod, "c2", name="new")
    assert pod_ip(res) == ip
    new_host = res["interfaces"][0]["name"]
    # ... and only its own veth routes it, while the old one still exists
    assert cluster.node.retired() == [retired]
    status, metrics = cluster.coild.rest("GET", "/metrics")
    assert "coild_teardown_pending 1.0" in metrics and "coild_teardown_retired_total 1.0" in metrics
    assert routes_to(cluster.node, ip) == [f"{ip} dev {new_host} proto static scope link"]
    assert f"dev {new_host}" in cluster.node.exec("ip", "route", "get", ip).stdout
    assert ping(cluster.node, ip) and ping(new_pod, "169.254.1.1")
    # SIGTERM: the queue is flushed on the way out; the new pod is untouched
    assert cluster.coild.stop() == 0
    assert cluster.node.retired() == []
    assert new_host in cluster.node.links() and ping(cluster.node, ip)


def test_del_answered_is_final_across_sigkill(cluster):
    start_holding(cluster, "10.41.0.0/24")
    gone, stays = cluster.new_pod(), cluster.new_pod()
    ip_gone = pod_ip(add(cluster, gone, "c1"))
    res = add(cluster, stays, "c2")
    ip_stays, stays_host = pod_ip(res), res["interfaces"][0]["name"]
    assert cluster.cni.call("del", gone, "c1", "default", "c1") == (0, None)
    assert len(cluster.node.retired()) == 1
    cluster.coild.stop(signal.SIGKILL)              # before its deferred teardown
    # what the answered DEL promised is already true
    assert ip_gone not in etcd_ips(cluster.store) and routes_to(cluster.node, ip_gone) == []
    assert len(cluster.node.retired()) == 1         # the kernel work is still owed
    cluster.coild.start()
    assert cluster.node.retired() == []
    assert sorted(cluster.node.links()) == sorted(["lo", stays_host])
    assert gone.links() == ["lo"]
    assert sorted(etcd_ips(cluster.store)) == [ip_stays]
    assert ping(cluster.node, ip_stays)
    assert cluster.cni.call("check", stays, "c2", "default", "c2") == (0, None)


def test_restart_removes_veth_whose_record_is_gone(cluster):
    """The address was freed behind coild's back (an operator's ``coilctl
    address free`` while coild was down): the next start removes the veth
    that still routes it."""
    start_holding(cluster, "10.42.0.0/24")
    freed, kept = cluster.new_pod(), cluster.new_pod()
    res = add(cluster, freed, "c1")
    ip_freed, freed_host = pod_ip(res), res["interfaces"][0]["name"]
    res = add(cluster, kept, "c2")
    kept_host = res["interfaces"][0]["name"]
    assert cluster.coild.stop() == 0
    rec = etcd_ips(cluster.store)[ip_freed]
    cluster.store.release_address(rec.block, rec.offset, rec.revision)
    cluster.coild.start()
    links = cluster.node.links()
    assert freed_host not in links and kept_host in links
    assert routes_to(cluster.node, ip_freed) == []
    assert freed.links() == ["lo"] and "eth0" in kept.links()


@pytest.mark.parametrize("namespace", ["kept", "deleted"])
def test_add_straight_after_del_same_container_netns_ifname(cluster, namespace):
    start_holding(cluster, "10.43.0.0/24")
    pod = cluster.new_pod()
    first = pod_ip(add(cluster, pod, "c1"))
    assert cluster.cni.call("del", pod, "c1", "default", "c1") == (0, None)
    if namespace == "deleted":                      # the runtime made a new one, same path
        subprocess.run(["ip", "netns", "del", pod.name], check=True)
        subprocess.run(["ip", "netns", "add", pod.name], check=True)
        pod.exec("ip", "link", "set", "lo", "up")
    res = add(cluster, pod, "c1")
    ip = pod_ip(res)
    assert ip == first
    assert cluster.cni.call("check", pod, "c1", "default", "c1") == (0, None)
    assert ping(cluster.node, ip) and ping(pod, "169.254.1.1")
    if namespace == "kept":          # the old end waits in the namespace, renamed, down
        (old,) = [l for l in pod.all_links() if l not in pod.links()]
        assert old.startswith("cdel") and pod.retired() == [old]
    # deleting the old pair disturbs nothing of the new one
    assert cluster.coild.stop() == 0
    assert cluster.node.retired() == [] and sorted(pod.links()) == ["eth0", "lo"]
    cluster.coild.start()
    assert cluster.cni.call("check", pod, "c1", "default", "c1") == (0, None)
    assert ping(cluster.node, ip)


def test_check_after_del_fails(cluster):
    """CNI spec: CHECK of a container that was DELeted is an error; coil
    answers 104 (the reservation is gone), never 3, which would tell the
    runtime that no DEL is needed (issue 14). libcni itself refuses it (its cached
    result went with the DEL), so the plugin is also asked directly."""
    start_holding(cluster, "10.44.0.0/24")
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert cluster.cni.call("del", pod, "c1", "default", "c1") == (0, None)
    rc, err = cluster.cni.call("check", pod, "c1", "default", "c1")
    assert rc != 0 and err["code"]
    env = {"PATH": os.environ["PATH"], "CNI_PATH": cluster.cni.bin, "CNI_COMMAND": "CHECK",
           "CNI_CONTAINERID": "c1", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=c1"}
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "coil-test", "type": "coil",
                        "socket": cluster.coild.socket, "prevResult": res})
    r = subprocess.run(["ip", "netns", "exec", cluster.node.name,
                        os.path.join(cluster.cni.bin, "coil")],
                       input=stdin, capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0
    err = json.loads(r.stdout)
    assert err["code"] == 104 and "c1" in err["msg"]


def test_del_when_netns_is_already_gone(cluster):
    start_holding(cluster, "10.45.0.0/24")
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    ip, host = pod_ip(res), res["interfaces"][0]["name"]
    path = pod.path
    subprocess.run(["ip", "netns", "del", pod.name], check=True)
    assert not os.path.exists(path)
    assert cluster.cni.call("del", path, "c1", "default", "c1") == (0, None)
    assert etcd_ips(cluster.store) == {}
    assert routes_to(cluster.node, ip) == [] and host not in cluster.node.links()
    assert cluster.coild.stop() == 0
    assert cluster.node.links() == ["lo"]
    # a second DEL, and one with no netns at all, succeed
    cluster.coild.start()
    assert cluster.cni.call("del", path, "c1", "default", "c1") == (0, None)
    assert cluster.cni.call("del", "", "c1", "default", "c1") == (0, None)


def test_default_flags_delete_within_the_delay_and_count_the_address_writes(cluster):
    """coild's defaults (batch 16, delay 100ms): two DELs are deleted by the
    delay trigger; the pod that stays keeps its veth. The metrics count the
    group commits of the address writes: one after the other, each write
    went alone."""
    cluster.store.create_pool("default", "10.47.0.0/24", 4)
    cluster.start()
    pods = [cluster.new_pod() for _ in range(3)]
    results = [add(cluster, pod, f"c{i}") for i, pod in enumerate(pods)]
    for i in (0, 1):
        assert cluster.cni.call("del", pods[i], f"c{i}", "default", f"c{i}") == (0, None)
    cluster.node.wait_retired_gone(timeout=30, poll=0.01)
    assert cluster.node.links() == ["lo", results[2]["interfaces"][0]["name"]]
    assert [p.links() for p in pods] == [["lo"], ["lo"], ["lo", "eth0"]]
    status, metrics = cluster.coild.rest("GET", "/metrics")
    assert "coild_teardown_pending 0.0" in metrics and "coild_teardown_retired_total 2.0" in metrics
    for kind, n in (("assign", 3), ("release", 2)):
        assert f'coild_etcd_group_commit_records_total{{kind="{kind}"}} {n}.0' in metrics
        assert f'coild_etcd_group_commits_total{{kind="{kind}"}} {n}.0' in metrics


def test_teardown_batch_zero_deletes_before_answering(cluster):
    cluster.store.create_pool("default", "10.46.0.0/24", 4)
    cluster.coild.extra = ["--teardown-batch", "0", "--teardown-delay", "1h"]
    cluster.start()
    pod = cluster.new_pod()
    res = add(cluster, pod, "c1")
    assert cluster.cni.call("del", pod, "c1", "default", "c1") == (0, None)
    assert cluster.node.retired() == [] and cluster.node.links() == ["lo"]
    assert pod.links() == ["lo"] and pod_ip(res) not in etcd_ips(cluster.store)


@pytest.mark.parametrize("flags, wrong", [
    (["--teardown-delay", "soon"], "--teardown-delay"),
    (["--teardown-delay", "-1s"], "--teardown-delay"),
    (["--teardown-batch", "-1"], "--teardown-batch"),
])
def test_bad_teardown_flags(cluster, flags, wrong):
    r, _ = coild_with_flags(cluster, *flags)
    assert r.returncode != 0
    assert wrong in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
