"""The sandbox's CNI executor (coil/sandbox/cniexec.py) against the reference
plugins (/usr/lib/cni) and against Debian's libcni (tests/cniclient/cnitool).

Every plugin runs inside a throw-away "host" namespace (``ip netns exec``),
never in the root one; pods are throw-away namespaces too. The libcni
cross-checks prove the cache is libcni's: what one client ADDs, the other
DELs with the right prevResult.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from coil.sandbox import cniexec
from harness import CNITOOL, REFERENCE_PLUGINS

pytestmark = [pytest.mark.root, pytest.mark.integration]


@pytest.fixture
def setup(netns_factory, tmp_path):
    if not os.access(os.path.join(REFERENCE_PLUGINS, "ptp"), os.X_OK):
        pytest.skip("needs the reference plugins (containernetworking-plugins)")
    host = netns_factory(lo_up=True)
    ipam_dir = tmp_path / "ipam"
    conf = {"cniVersion": "1.0.0", "name": "exectest", "plugins": [
        {"type": "ptp", "ipMasq": False,
         "ipam": {"type": "host-local", "subnet": "10.123.0.0/24", "dataDir": str(ipam_dir)}},
        {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.accept_redirects": "0"},
         "mtu": 1400}]}
    path = tmp_path / "net.conflist"
    path.write_text(json.dumps(conf))
    cache = tmp_path / "cache"
    ex = cniexec.Executor([REFERENCE_PLUGINS], str(cache),
                          wrapper=["ip", "netns", "exec", host.name])
    return host, ex, str(path), ipam_dir, str(cache)


def _reserved(ipam_dir) -> list[str]:
    d = ipam_dir / "exectest"
    if not d.exists():
        return []
    return sorted(n for n in os.listdir(d) if n[0].isdigit())


def _cnitool(host, cache, command, conflist, pod, cid):
    if not os.access(CNITOOL, os.X_OK):
        pytest.skip("needs tests/cniclient/cnitool (make build)")
    env = dict(os.environ, CNI_PATH=REFERENCE_PLUGINS, CNI_CACHE_DIR=cache)
    r = subprocess.run(["ip", "netns", "exec", host.name, CNITOOL, command, conflist,
                        pod.path, cid, "eth0", "default", "p"],
                       capture_output=True, text=True, env=env, timeout=60)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)


def test_chain_add_check_del(setup, netns_factory):
    host, ex, conflist, ipam_dir, _ = setup
    pod = netns_factory()
    conf = ex.load(conflist)
    rt = cniexec.Runtime.for_pod("c1", pod.path, "eth0", "default", "p1")

    result = ex.add(conf, rt)
    # tuning only passes prevResult through: the final result is ptp's, so
    # it got prevResult injected (tuning fails ADD without one)
    assert result["cniVersion"] == "1.0.0"
    assert result["ips"][0]["address"].startswith("10.123.0.")
    assert _reserved(ipam_dir) == [result["ips"][0]["address"].split("/")[0]]
    # tuning ran after ptp, on ptp's interface: the MTU it set is there
    link = pod.run("ip", "-j", "link", "show", "eth0", check=True)
    assert json.loads(link.stdout)[0]["mtu"] == 1400
    # libcni's cache file, libcni's document
    cached = json.loads(open(ex.cache_file("exectest", rt)).read())
    assert cached["kind"] == "cniCacheV1" and cached["result"] == result
    assert ["K8S_POD_NAME", "p1"] in cached["cniArgs"]

    ex.check(conf, rt)
    # CHECK runs ptp against the cached result: remove the address and it fails
    pod.run("ip", "addr", "flush", "dev", "eth0", check=True)
    with pytest.raises(cniexec.CNIExecError):
        ex.check(conf, rt)

    ex.delete(conf, rt)
    assert _reserved(ipam_dir) == []
    assert not os.path.exists(ex.cache_file("exectest", rt))
    assert pod.run("ip", "link", "show", "eth0").returncode != 0
    ex.delete(conf, rt)                       # DEL of nothing succeeds, as the spec asks


def test_del_runs_in_reverse_order_with_cached_prevresult(setup, netns_factory, tmp_path):
    """A tracing plugin first and last in the chain records what it got:
    ADD sees it first without prevResult then last with one; DEL sees the
    last one first, both with the cached ADD result."""
    host, _, _, ipam_dir, cache = setup
    pod = netns_factory()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "trace.log"
    for name in ("tracea", "traceb"):
        p = bindir / name
        p.write_text(f"""#!/bin/sh
in=$(cat)
printf '%s %s %s\\n' "{name}" "$CNI_COMMAND" "$in" >> {log}
if [ "$CNI_COMMAND" = ADD ]; then
  printf '%s' "$in" | python3 -c 'import json,sys; c=json.load(sys.stdin); print(json.dumps(c.get("prevResult") or {{"cniVersion": c["cniVersion"], "ips": []}}))'
fi
""")
        p.chmod(0o755)
    conf = {"cniVersion": "1.0.0", "name": "exectest", "plugins": [
        {"type": "tracea"},
        {"type": "ptp", "ipam": {"type": "host-local", "subnet": "10.123.1.0/24",
                                 "dataDir": str(ipam_dir)}},
        {"type": "traceb"}]}
    path = tmp_path / "trace.conflist"
    path.write_text(json.dumps(conf))
    ex = cniexec.Executor([str(bindir), REFERENCE_PLUGINS], cache,
                          wrapper=["ip", "netns", "exec", host.name])
    rt = cniexec.Runtime("c2", pod.path, "eth0")
    loaded = ex.load(str(path))
    result = ex.add(loaded, rt)
    ex.delete(loaded, rt)
    lines = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert [(n, c) for n, c, _ in lines] == [("tracea", "ADD"), ("traceb", "ADD"),
                                            ("traceb", "DEL"), ("tracea", "DEL")]
    confs = [json.loads(c) for _, _, c in lines]
    assert all(c["name"] == "exectest" and c["cniVersion"] == "1.0.0" for c in confs)
    assert "prevResult" not in confs[0]
    assert confs[1]["prevResult"]["ips"][0]["address"] == result["ips"][0]["address"]
    assert confs[2]["prevResult"] == result and confs[3]["prevResult"] == result


def test_error_object_and_missing_plugin(setup, netns_factory, tmp_path):
    host, ex, _, _, _ = setup
    pod = netns_factory()
    rt = cniexec.Runtime("c3", pod.path, "eth0")
    bad = {"cniVersion": "1.0.0", "name": "exectest",
           "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}]}   # no subnet
    with pytest.raises(cniexec.CNIExecError) as err:
        ex.add(bad, rt)
    # the plugin's own error object (host-local's message), not a client-side one
    assert err.value.msg == "no IP ranges specified"
    assert not os.path.exists(ex.cache_file("exectest", rt))
    missing = {"cniVersion": "1.0.0", "name": "exectest", "plugins": [{"type": "nosuch"}]}
    with pytest.raises(cniexec.CNIExecError) as err:
        ex.add(missing, rt)
    assert err.value.code == cniexec.ERR_INTERNAL and "nosuch" in err.value.msg
    assert "1.0.0" in ex.version("ptp")["supportedVersions"]


@pytest.mark.parametrize("adder", ["executor", "libcni"])
def test_cache_is_libcnis(setup, netns_factory, adder):
    """ADD with one client, CHECK and DEL with the other: each finds the
    other's cached result (the address is released, the veth gone)."""
    host, ex, conflist, ipam_dir, cache = setup
    pod = netns_factory()
    conf = ex.load(conflist)
    rt = cniexec.Runtime.for_pod("c4", pod.path, "eth0", "default", "p")
    if adder == "executor":
        ex.add(conf, rt)
        assert _cnitool(host, cache, "check", conflist, pod, "c4")[0] == 0
        rc, out = _cnitool(host, cache, "del", conflist, pod, "c4")
        assert rc == 0, out
    else:
        rc, out = _cnitool(host, cache, "add", conflist, pod, "c4")
        assert rc == 0, out
        assert ex.cached_result("exectest", rt)["ips"] == out["ips"]
        ex.check(conf, rt)
        ex.delete(conf, rt)
    assert _reserved(ipam_dir) == []
    assert not os.path.exists(ex.cache_file("exectest", rt))
    assert pod.run("ip", "link", "show", "eth0").returncode != 0


# -- against coil itself ------------------------------------------------------

@pytest.fixture
def coil_node(etcd_server, store, etcd_prefix, tmp_path):
    """A node namespace running coild, its conflist (coil + tuning) for both
    clients: the executor and libcni's cnitool, sharing one cache."""
    from harness import CNI, Coild, Netns, coil_conflist, plugin_binary
    node = Netns("node")
    coild = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    pods = []
    try:
        store.create_pool("default", "10.28.0.0/24", 4)
        coild.start()
        cni = CNI(node, str(tmp_path), coil_conflist(coild.socket, chain=[
            {"type": "tuning", "mtu": 1400}]), plugin_binary())
        ex = cniexec.Executor([cni.bin, REFERENCE_PLUGINS], cni.cache,
                              wrapper=["ip", "netns", "exec", node.name])

        def new_pod():
            p = Netns("pod")
            pods.append(p)
            return p
        yield store, cni, ex, new_pod
    finally:
        coild.stop()
        for p in pods:
            p.delete()
        node.delete()


def _held(store) -> dict:
    addrs, _ = store.all_addresses()
    return {a.container_id: a.address for a in addrs}


def test_coil_chain_through_the_executor(coil_node):
    store, cni, ex, new_pod = coil_node
    pod = new_pod()
    conf = ex.load(cni.conf_path)
    rt = cniexec.Runtime.for_pod("e1", pod.path, "eth0", "default", "web")
    result = ex.add(conf, rt)
    ip = result["ips"][0]["address"].split("/")[0]
    assert _held(store) == {"e1": ip}
    # tuning, second in the chain, got coil's result and set the MTU on its interface
    assert "mtu 1400" in pod.exec("ip", "link", "show", "eth0").stdout
    assert ip in pod.exec("ip", "-4", "addr", "show", "eth0").stdout
    ex.check(conf, rt)
    ex.delete(conf, rt)
    assert _held(store) == {}
    assert "eth0" not in pod.links()          # gone, or retired (deleted by the queue)
    ex.delete(conf, rt)                       # idempotent


@pytest.mark.parametrize("adder", ["executor", "libcni"])
def test_coil_cache_shared_with_libcni(coil_node, adder):
    store, cni, ex, new_pod = coil_node
    pod = new_pod()
    conf = ex.load(cni.conf_path)
    rt = cniexec.Runtime.for_pod("e2", pod.path, "eth0", "default", "web")
    if adder == "executor":
        ex.add(conf, rt)
        assert cni.call("check", pod, "e2", "default", "web")[0] == 0
        rc, out = cni.call("del", pod, "e2", "default", "web")
        assert rc == 0, out
    else:
        rc, out = cni.call("add", pod, "e2", "default", "web")
        assert rc == 0, out
        assert ex.cached_result("coil-test", rt)["ips"] == out["ips"]
        ex.check(conf, rt)
        ex.delete(conf, rt)
    assert _held(store) == {}
    assert not os.path.exists(ex.cache_file("coil-test", rt))


def test_coil_error_object_through_the_executor(coil_node):
    """A refused ADD (an interface name longer than Linux allows) comes back
    as coil's own CNI error object, the same code libcni reports."""
    store, cni, ex, new_pod = coil_node
    pod = new_pod()
    conf = ex.load(cni.conf_path)
    rt = cniexec.Runtime.for_pod("e3", pod.path, "this-name-is-far-too-long", "default", "w")
    with pytest.raises(cniexec.CNIExecError) as err:
        ex.add(conf, rt)
    rc, out = cni.call("add", pod, "e4", "default", "w", ifname="this-name-is-far-too-long")
    assert rc != 0 and err.value.code == out["code"] and err.value.msg
    assert _held(store) == {}
