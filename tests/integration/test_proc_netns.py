"""A runtime that passes CNI_NETNS as /proc/<pid>/ns/net (not a /run/netns
path) is served: coild opens the path of a process living in the pod's
namespace. deploy/coild.yaml sets hostPID: true so that the path resolves
inside coild's container, as in v1."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time

import pytest

from harness import CNI, Coild, Netns, coil_conflist, plugin_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


def test_add_and_del_with_a_proc_pid_netns_path(etcd_server, store, etcd_prefix, tmp_path):
    store.create_pool("default", "10.77.0.0/28", 2)
    node = Netns("node")
    pod = Netns("pod")
    holder = None
    coild = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    try:
        # the pod's "pause" process: the only handle on its namespace the runtime passes
        holder = subprocess.Popen(["ip", "netns", "exec", pod.name, "sleep", "600"])
        path = f"/proc/{holder.pid}/ns/net"
        for _ in range(500):               # until `ip netns exec` has entered the namespace
            if os.stat(path).st_ino == os.stat(pod.path).st_ino:
                break
            time.sleep(0.01)
        assert os.stat(path).st_ino == os.stat(pod.path).st_ino
        coild.start()
        cni = CNI(node, str(tmp_path), coil_conflist(coild.socket), plugin_binary())
        rc, res = cni.call("add", path, "proc-c1", "default", "proc-pod")
        assert rc == 0, (res, coild.log())
        ip = str(ipaddress.ip_interface(res["ips"][0]["address"]).ip)
        assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.77.0.0/28")
        # the interface is in the pod's namespace (the one /proc/<pid>/ns/net named)
        assert f"{ip}/32" in pod.exec("ip", "-o", "addr", "show", "dev", "eth0").stdout
        assert cni.call("check", path, "proc-c1", "default", "proc-pod")[0] == 0
        assert cni.call("del", path, "proc-c1", "default", "proc-pod") == (0, None)
        assert "eth0" not in pod.links()
        assert store.all_addresses()[0] == []
    finally:
        coild.stop()
        if holder is not None:
            holder.kill()
            holder.wait()
        pod.delete()
        node.delete()
