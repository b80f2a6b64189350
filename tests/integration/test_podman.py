"""A runtime beyond the kubelet: Debian's podman 4.3 with its CNI backend
runs a container on coil. podman passes K8S_POD_NAME but no
K8S_POD_NAMESPACE; the container gets an address of the default pool.

Everything stays inside a node network namespace the test creates: podman
runs under ``nsenter --net=/run/netns/NODE`` (not ``ip netns exec``, whose
private /run/netns mount would hide podman's namespace bind mounts from
coild), with its storage, run and configuration directories under the
test's tmp_path; runc and cgroupfs; the container's root is a busybox-static
tree (no image is pulled).
"""

from __future__ import annotations

import glob
import ipaddress
import json
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

from harness import Coild, Netns, coil_conflist, plugin_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

BUSYBOX = "/bin/busybox"          # Debian's busybox-static


@pytest.fixture
def podman_env(etcd_server, store, etcd_prefix, tmp_path):
    node = Netns("node")
    coild = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    root = tmp_path / "podman"
    dirs = {k: root / k for k in ("bin", "net.d", "storage", "tmp", "rootfs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    # podman refuses a runroot longer than 50 characters
    dirs["run"] = pathlib.Path(tempfile.mkdtemp(prefix="coilpm-", dir="/tmp"))
    os.symlink(plugin_binary(), dirs["bin"] / "coil")
    (dirs["rootfs"] / "bin").mkdir()
    shutil.copy(BUSYBOX, dirs["rootfs"] / "bin" / "busybox")
    for applet in ("sh", "ip", "sleep"):
        os.symlink("busybox", dirs["rootfs"] / "bin" / applet)
    for d in ("proc", "sys", "dev", "etc", "tmp"):
        (dirs["rootfs"] / d).mkdir()
    conf = root / "containers.conf"
    conf.write_text(f"""[containers]
default_ulimits = []

[network]
network_backend = "cni"
cni_plugin_dirs = ["{dirs['bin']}"]
network_config_dir = "{dirs['net.d']}"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
lock_type = "file"
tmp_dir = "{dirs['tmp']}"
""")
    conflist = coil_conflist(coild.socket)
    conflist["name"] = "coilnet"
    (dirs["net.d"] / "coilnet.conflist").write_text(json.dumps(conflist))
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    env.pop("CNI_ARGS", None)

    def podman(*args, check=True):
        cmd = ["nsenter", f"--net={node.path}", "podman", "--root", str(dirs["storage"]),
               "--runroot", str(dirs["run"]), "--storage-driver", "vfs",
               "--runtime", "runc", "--cgroup-manager", "cgroupfs", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        if check:
            assert r.returncode == 0, (cmd, r.stdout, r.stderr, coild.log())
        return r

    class Env:
        pass
    e = Env()
    e.node, e.coild, e.store, e.podman, e.rootfs = node, coild, store, podman, dirs["rootfs"]
    e.cgroup_parent = f"/{node.name}"          # removed afterwards (cgroupfs leaves it)
    try:
        yield e
    finally:
        podman("rm", "-f", "-a", check=False)
        coild.stop()
        node.delete()
        subprocess.run(["umount", "-R", str(dirs["run"])], capture_output=True)
        subprocess.run(["umount", "-R", str(dirs["storage"])], capture_output=True)
        shutil.rmtree(dirs["run"], ignore_errors=True)
        # cgroupfs leaves the container's parent and conmon's libpod_parent/conmon
        # behind; rmdir removes only empty ones (no process of anybody else)
        for top in glob.glob(f"/sys/fs/cgroup/*{e.cgroup_parent}") + \
                glob.glob("/sys/fs/cgroup/*/libpod_parent"):
            for d, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def test_podman_run_gets_a_coil_address(podman_env):
    e = podman_env
    e.store.create_pool("default", "10.38.0.0/24", 4)
    e.store.create_pool("web", "10.39.0.0/24", 4)      # a namespace pool: not podman's
    e.coild.start()
    e.podman("run", "-d", "--name", "web", "--network", "coilnet",
             "--cgroup-parent", e.cgroup_parent, "--rootfs", str(e.rootfs),
             "/bin/sleep", "600")
    addrs, _ = e.store.all_addresses()
    (rec,) = addrs
    assert (rec.namespace, rec.pod) == ("", "web")        # K8S_POD_NAME only: default pool
    assert ipaddress.ip_address(rec.address) in ipaddress.ip_network("10.38.0.0/24")
    r = e.podman("exec", "web", "/bin/ip", "-4", "-o", "addr", "show", "eth0")
    assert f"inet {rec.address}/32" in r.stdout
    r = e.podman("exec", "web", "/bin/ip", "route")
    assert "default via 169.254.1.1 dev eth0" in r.stdout
    assert any(l.startswith("veth") for l in e.node.links())
    e.podman("rm", "-f", "-t", "0", "web")
    addrs, _ = e.store.all_addresses()
    assert addrs == []                                   # podman's DEL freed it
    e.node.wait_retired_gone()
    assert [l for l in e.node.links() if l != "lo"] == []
