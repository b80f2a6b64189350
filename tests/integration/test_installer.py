"""coil-installer: files into temp directories, IP forwarding only inside a
network namespace made for the test, the bootstrap taint through a real
kube-apiserver with the coild ServiceAccount's token (deploy/rbac.yaml).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest
import yaml

from helpers import REPO, free_port

from coil.cni import protocol
from coil.errors import InvalidArgument

TAINT = "coil.cybozu.com/bootstrap"


@pytest.fixture
def dirs(tmp_path):
    """CNI dirs and a fake /proc/sys tree with forwarding off."""
    bin_dir, etc_dir, proc = tmp_path / "bin", tmp_path / "etc", tmp_path / "proc-sys"
    bin_dir.mkdir()
    etc_dir.mkdir()
    for rel in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        (proc / rel).parent.mkdir(parents=True, exist_ok=True)
        (proc / rel).write_text("0\n")
    return {"bin": bin_dir, "etc": etc_dir, "proc": proc}


def base_env(dirs, **extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "CNI_NETCONF",
                        "CNI_NETCONF_FILE", "COIL_PATH", "COIL_NODE_NAME")}
    env.update(CNI_BIN_DIR=str(dirs["bin"]), CNI_ETC_DIR=str(dirs["etc"]),
               COIL_PROC_SYS=str(dirs["proc"]), COIL_BOOT_TAINT="",
               COIL_INSTALLER_RESCAN_WAIT="0s")   # the wait itself: test_waits_for_the_rescan...
    env.update({k: str(v) for k, v in extra.items()})
    return env


def install(env, netns=None, timeout=60):
    cmd = [sys.executable, "-m", "coil", "coil-installer"]
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def conflist(dirs):
    return dirs["etc"] / "10-coil.conflist"


def leftovers(d):
    return [p.name for p in d.iterdir() if p.name.startswith(".")]


# -- files --------------------------------------------------------------------------------
def test_installs_coil_and_the_default_conflist(dirs):
    from coil.installer.main import DEFAULT_NETCONF
    r = install(base_env(dirs))
    assert r.returncode == 0, r.stderr
    coil = dirs["bin"] / "coil"
    assert coil.stat().st_mode & 0o777 == 0o755
    assert json.loads(conflist(dirs).read_text()) == DEFAULT_NETCONF
    assert DEFAULT_NETCONF["plugins"][0]["socket"] == protocol.DEFAULT_SOCKET
    assert conflist(dirs).stat().st_mode & 0o777 == 0o644
    for rel in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        assert (dirs["proc"] / rel).read_text().strip() == "1"
    # what was installed is the coil CNI plugin
    v = subprocess.run([str(coil)], input="{}", capture_output=True, text=True, timeout=30,
                       env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]})
    assert v.returncode == 0, v.stderr
    assert "1.0.0" in json.loads(v.stdout)["supportedVersions"]
    record = json.loads(r.stderr.strip().splitlines()[-1])
    assert record["msg"] == "coil installed" and record["changed_binary"] is True


def test_rerunning_is_harmless(dirs):
    env = base_env(dirs)
    assert install(env).returncode == 0
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dirs["bin"] / "coil",
                                                                    conflist(dirs))}
    r = install(env)
    assert r.returncode == 0, r.stderr
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before}
    assert before == after                       # nothing rewritten
    assert leftovers(dirs["bin"]) == [] and leftovers(dirs["etc"]) == []
    record = json.loads(r.stderr.strip().splitlines()[-1])
    assert record["changed_binary"] is False and record["changed_conflist"] is False
    assert record["forwarding_enabled"] == []


def test_replaces_existing_files_atomically(dirs, tmp_path):
    src = tmp_path / "hypercoil-new"
    src.write_bytes(b"#!/bin/sh\necho new\n")
    (dirs["bin"] / "coil").write_bytes(b"old binary")
    conflist(dirs).write_text("old conflist")
    old_ino = conflist(dirs).stat().st_ino
    r = install(base_env(dirs, COIL_PATH=src))
    assert r.returncode == 0, r.stderr
    assert (dirs["bin"] / "coil").read_bytes() == src.read_bytes()
    assert conflist(dirs).stat().st_ino != old_ino     # renamed into place
    assert leftovers(dirs["bin"]) == [] and leftovers(dirs["etc"]) == []


def test_readers_never_see_a_partial_file(tmp_path):
    from coil.installer.main import atomic_write
    path = str(tmp_path / "10-coil.conflist")
    a, b = b"A" * 300_000, b"B" * 200_000
    atomic_write(path, a, 0o644)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            with open(path, "rb") as f:
                data = f.read()
            seen.add(data[:1] * len(data) == data and data in (a, b))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(100):
            assert atomic_write(path, b if i % 2 == 0 else a, 0o644)
    finally:
        stop.set()
        t.join()
    assert seen == {True}
    assert [p for p in os.listdir(tmp_path) if p != "10-coil.conflist"] == []


INVALID = [
    ("{", "not JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"cniVersion": "9.9.9", "name": "n", "plugins": [{"type": "coil"}]}', "cniVersion"),
    ('{"cniVersion": "1.0.0", "plugins": [{"type": "coil"}]}', '"name"'),
    ('{"cniVersion": "1.0.0", "name": "n"}', '"plugins" must be a non-empty list'),
    ('{"cniVersion": "1.0.0", "name": "n", "plugins": [{"socket": "/x"}]}',
     'plugins[0] needs a "type"'),
    ('{"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}]}',
     'no plugin of type "coil"'),
]


@pytest.mark.parametrize("netconf, needle", INVALID, ids=[n for _, n in INVALID])
def test_invalid_netconf_is_rejected_and_the_old_file_kept(dirs, netconf, needle):
    env = base_env(dirs)
    assert install(env).returncode == 0
    before = conflist(dirs).read_bytes()
    bin_before = (dirs["bin"] / "coil").stat().st_mtime_ns
    r = install(dict(env, CNI_NETCONF=netconf))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coil-installer: error: invalid CNI_NETCONF")
    assert needle in lines[0]
    assert conflist(dirs).read_bytes() == before
    assert (dirs["bin"] / "coil").stat().st_mtime_ns == bin_before
    assert leftovers(dirs["etc"]) == []


def test_netconf_from_file_and_other_conf_name(dirs, tmp_path):
    doc = {"cniVersion": "1.0.0", "name": "coil-net",
           "plugins": [{"type": "coil", "socket": "/run/coild/coild.sock"}]}
    f = tmp_path / "netconf.json"
    f.write_text(json.dumps(doc))
    r = install(base_env(dirs, CNI_NETCONF_FILE=f, CNI_CONF_NAME="05-coil.conflist"))
    assert r.returncode == 0, r.stderr
    assert json.loads((dirs["etc"] / "05-coil.conflist").read_text()) == doc
    # v1's precedence: CNI_NETCONF, when not empty, wins over CNI_NETCONF_FILE
    inline = dict(doc, name="from-env")
    r = install(base_env(dirs, CNI_NETCONF_FILE=f, CNI_CONF_NAME="05-coil.conflist",
                         CNI_NETCONF=json.dumps(inline)))
    assert r.returncode == 0, r.stderr
    assert json.loads((dirs["etc"] / "05-coil.conflist").read_text()) == inline
    r = install(base_env(dirs, CNI_NETCONF_FILE=f, CNI_CONF_NAME="05-coil.conflist",
                         CNI_NETCONF=" "))
    assert r.returncode == 0, r.stderr
    assert json.loads((dirs["etc"] / "05-coil.conflist").read_text()) == doc
    r = install(base_env(dirs, CNI_NETCONF_FILE=tmp_path / "missing.json"))
    assert r.returncode == 1 and "cannot read CNI_NETCONF_FILE" in r.stderr


def test_default_conflist_is_cni_1_1(dirs):
    """The default conflist offers 1.1.0 (GC, STATUS) in "cniVersions" and
    keeps "cniVersion" 1.0.0 for runtimes whose libcni predates the list."""
    r = install(base_env(dirs))
    assert r.returncode == 0, r.stderr
    doc = json.loads(conflist(dirs).read_text())
    assert doc["cniVersion"] == "1.0.0"
    assert doc["cniVersions"] == ["1.0.0", "1.1.0"]


@pytest.mark.parametrize("doc", [
    {"cniVersions": ["1.0.0", "1.1.0"], "name": "n", "plugins": [{"type": "coil"}]},
    {"cniVersion": "1.1.0", "cniVersions": ["1.1.0"], "name": "n",
     "plugins": [{"type": "coil"}]},
], ids=["list-only", "both"])
def test_cni_1_1_conflists_are_accepted(dirs, doc):
    r = install(base_env(dirs, CNI_NETCONF=json.dumps(doc)))
    assert r.returncode == 0, r.stderr
    assert json.loads(conflist(dirs).read_text()) == doc


@pytest.mark.parametrize("extra, needle", [
    ({"CNI_NETCONF": '{"cniVersion": "1.0.0", "name": "n", "type": "coil"}'},
     "single-plugin .conf configuration is not supported"),
    ({"CNI_CONF_NAME": "05-coil.conf"}, "single-plugin .conf files were removed"),
    ({"CNI_CONF_NAME": "05-coil.json"}, "single-plugin .conf files were removed"),
    ({"CNI_NETCONF": '{"name": "n", "plugins": [{"type": "coil"}]}'},
     'needs "cniVersion" or "cniVersions"'),
    ({"CNI_NETCONF": '{"cniVersions": ["1.0.0", "9.9.9"], "name": "n", '
                     '"plugins": [{"type": "coil"}]}'}, "cniVersions entry '9.9.9'"),
    ({"CNI_NETCONF": '{"cniVersions": [], "name": "n", "plugins": [{"type": "coil"}]}'},
     '"cniVersions" must be a non-empty list'),
], ids=["conf-body", "conf-name", "json-name", "no-version", "bad-list-entry", "empty-list"])
def test_conf_files_and_bad_version_lists_are_refused_in_one_line(dirs, extra, needle):
    env = base_env(dirs)
    assert install(env).returncode == 0
    before = conflist(dirs).read_bytes()
    r = install(dict(env, **extra))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coil-installer: error: invalid"), r.stderr
    assert needle in lines[0], lines[0]
    assert conflist(dirs).read_bytes() == before
    assert leftovers(dirs["etc"]) == []


def test_removes_the_other_cni_configurations_as_v1_did(dirs):
    """A lower-sorting file of another network must not win: v1 removed the
    other files of CNI_ETC_DIR. Files libcni never loads and directories stay."""
    etc = dirs["etc"]
    for name in ("00-flannel.conflist", "05-bridge.conf", "99-loopback.json"):
        (etc / name).write_text('{"cniVersion": "0.4.0", "name": "x", "type": "bridge"}')
    (etc / "01-dangling.conf").symlink_to(etc / "nowhere")
    (etc / "multus.d").mkdir()
    (etc / "multus.d" / "00-x.conf").write_text("{}")
    (etc / "calico-kubeconfig").write_text("kept")
    r = install(base_env(dirs))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in etc.iterdir()) == ["10-coil.conflist", "calico-kubeconfig",
                                                     "multus.d"]
    assert (etc / "multus.d" / "00-x.conf").exists()
    record = json.loads(r.stderr.strip().splitlines()[-1])
    assert record["other_confs_removed"] == ["00-flannel.conflist", "01-dangling.conf",
                                             "05-bridge.conf", "99-loopback.json"]
    # coil's own file is what the kubelet picks now: the first by name
    loaded = sorted(p.name for p in etc.iterdir() if p.name.endswith((".conf", ".conflist", ".json")))
    assert loaded == ["10-coil.conflist"]


def test_bad_netconf_removes_nothing(dirs):
    (dirs["etc"] / "00-other.conflist").write_text("{}")
    r = install(base_env(dirs, CNI_NETCONF="{not json"))
    assert r.returncode == 1
    assert [p.name for p in dirs["etc"].iterdir()] == ["00-other.conflist"]


@pytest.mark.parametrize("extra, needle", [
    ({"CNI_CONF_NAME": "../evil.conflist"}, "invalid CNI_CONF_NAME"),
    ({"CNI_CONF_NAME": "10-coil.txt"}, "invalid CNI_CONF_NAME"),
    ({"CNI_BIN_DIR": "/nonexistent/bin"}, "CNI_BIN_DIR /nonexistent/bin is not a directory"),
    ({"COIL_PATH": "/nonexistent/hypercoil"}, "cannot read COIL_PATH"),
    ({"COIL_BOOT_TAINT": TAINT}, "COIL_NODE_NAME is not set"),
    ({"COIL_NODE_NAME": "Bad_Node"}, "invalid node name 'Bad_Node'"),
    ({"COIL_NODE_NAME": "../../x", "COIL_BOOT_TAINT": TAINT}, "invalid node name"),
    ({"COIL_LOG_LEVEL": "verbose"}, "invalid COIL_LOG_LEVEL 'verbose'"),
])
def test_bad_environment_is_rejected_before_writing(dirs, extra, needle):
    r = install(base_env(dirs, **extra))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert list(dirs["bin"].iterdir()) == [] and list(dirs["etc"].iterdir()) == []


def test_arguments_are_refused():
    r = subprocess.run([sys.executable, "-m", "coil", "coil-installer", "--node", "x"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "environment variables" in r.stderr


# -- IP forwarding, inside a network namespace made for the test --------------------------
def read_sysctls(ns=None):
    out = {}
    for rel in ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"):
        cmd = ["cat", f"/proc/sys/{rel}"]
        if ns:
            cmd = ["ip", "netns", "exec", ns] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        out[rel] = r.stdout.strip() if r.returncode == 0 else None
    return out


@pytest.mark.root
def test_enables_forwarding_in_its_network_namespace(dirs, netns_factory):
    ns = netns_factory()
    root_before = read_sysctls()
    assert read_sysctls(ns.name)["net/ipv4/ip_forward"] == "0"
    env = base_env(dirs)
    env.pop("COIL_PROC_SYS")                          # the real /proc/sys of that netns
    r = install(env, netns=ns.name)
    assert r.returncode == 0, r.stderr
    inside = read_sysctls(ns.name)
    assert inside["net/ipv4/ip_forward"] == "1"
    if inside["net/ipv6/conf/all/forwarding"] is not None:
        assert inside["net/ipv6/conf/all/forwarding"] == "1"
    assert read_sysctls() == root_before              # the root namespace is untouched
    r = install(env, netns=ns.name)                   # again: nothing to change
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["forwarding_enabled"] == []


def test_missing_ipv6_is_a_warning_missing_ipv4_an_error(dirs):
    (dirs["proc"] / "net/ipv6/conf/all/forwarding").unlink()
    r = install(base_env(dirs))
    assert r.returncode == 0, r.stderr
    assert "IPv6 is disabled" in r.stderr
    (dirs["proc"] / "net/ipv4/ip_forward").unlink()
    r = install(base_env(dirs))
    assert r.returncode == 1 and "cannot enable IP forwarding" in r.stderr


# -- the bootstrap taint, through the API server -------------------------------------------
@pytest.fixture(scope="module")
def coild_token(kube_apiserver):
    with open(os.path.join(REPO, "deploy", "rbac.yaml")) as f:
        kube_apiserver.apply([d for d in yaml.safe_load_all(f) if d])
    return kube_apiserver.service_account_token("kube-system", "coild")


@pytest.fixture
def node(kube_apiserver):
    core = kube_apiserver.core()
    name = f"inst-{uuid.uuid4().hex[:8]}"
    core.create_node({"metadata": {"name": name}, "spec": {"taints": [
        {"key": TAINT, "effect": "NoSchedule"},
        {"key": TAINT, "effect": "NoExecute"},
        {"key": "example.com/other", "value": "x", "effect": "NoSchedule"}]}})
    try:
        yield name
    finally:
        core.delete_node(name)


def taint_keys(kube_apiserver, name):
    """(key, effect) of the Node's taints, but the ones the API server adds
    itself (TaintNodesByCondition: node.kubernetes.io/not-ready)."""
    node = kube_apiserver.core().read_node(name)
    return ([(t.key, t.effect) for t in node.spec.taints or []
             if not t.key.startswith("node.kubernetes.io/")], node.metadata.resource_version)


def test_removes_the_bootstrap_taint_with_coilds_rbac(dirs, kube_apiserver, coild_token, node,
                                                      tmp_path):
    kc = kube_apiserver.kubeconfig(coild_token, str(tmp_path / "kc"))
    env = base_env(dirs, KUBECONFIG=kc, COIL_NODE_NAME=node, COIL_BOOT_TAINT=TAINT)
    r = install(env)
    assert r.returncode == 0, r.stderr
    keys, rv = taint_keys(kube_apiserver, node)
    assert keys == [("example.com/other", "NoSchedule")]
    last = json.loads(r.stderr.strip().splitlines()[-1])
    assert last["msg"] == "bootstrap taints" and last["removed"] == [TAINT, TAINT]
    # again: nothing to do, the Node is not written
    r = install(env)
    assert r.returncode == 0, r.stderr
    assert taint_keys(kube_apiserver, node) == (keys, rv)
    # several keys at once; other taints stay
    env["COIL_BOOT_TAINT"] = f"{TAINT}, example.com/other"
    assert install(env).returncode == 0
    assert taint_keys(kube_apiserver, node)[0] == []
    others = kube_apiserver.core().read_node(node).spec.taints or []
    assert {t.key for t in others} <= {"node.kubernetes.io/not-ready"}


def test_waits_for_the_kubelets_rescan_before_removing_the_taint(dirs, kube_apiserver,
                                                                  coild_token, node, tmp_path):
    """v1 slept 6 s (the kubelet rescans CNI_ETC_DIR every 5 s) between writing
    the conflist and removing the taint. A fake clock records the wait: it
    happens after the conflist is in place and while the taint is still on."""
    from coil.installer.main import run
    core = kube_apiserver.core(coild_token)
    env = base_env(dirs, COIL_NODE_NAME=node, COIL_BOOT_TAINT=TAINT)
    del env["COIL_INSTALLER_RESCAN_WAIT"]                 # v1's default: 6 s
    waits = []

    def fake_sleep(seconds):
        waits.append((seconds, conflist(dirs).exists(),
                      (TAINT, "NoSchedule") in taint_keys(kube_apiserver, node)[0]))

    done = run(env, core=core, sleep=fake_sleep)
    assert waits == [(6.0, True, True)]
    assert done["taints_removed"] == [TAINT, TAINT]
    assert taint_keys(kube_apiserver, node)[0] == [("example.com/other", "NoSchedule")]
    # nothing left to remove: no wait at all
    waits.clear()
    assert run(env, core=core, sleep=fake_sleep)["taints_removed"] == []
    assert waits == []
    with pytest.raises(InvalidArgument, match="COIL_INSTALLER_RESCAN_WAIT"):
        run(dict(env, COIL_INSTALLER_RESCAN_WAIT="soon"), core=core, sleep=fake_sleep)


def test_taint_errors_are_clear(dirs, kube_apiserver, coild_token, node, tmp_path):
    kc = kube_apiserver.kubeconfig(coild_token, str(tmp_path / "kc"))
    env = base_env(dirs, KUBECONFIG=kc, COIL_BOOT_TAINT=TAINT)
    r = install(dict(env, COIL_NODE_NAME="no-such-node"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "coil-installer: error: node no-such-node does not exist "
        "(COIL_NODE_NAME must be this node's name (spec.nodeName))")
    # the files are installed before the taint is touched
    assert conflist(dirs).exists()
    # a token without "patch nodes" (coil-controller's): refused, not retried
    ctl_token = kube_apiserver.service_account_token("kube-system", "coil-controller")
    kc2 = kube_apiserver.kubeconfig(ctl_token, str(tmp_path / "kc2"))
    r = install(dict(env, KUBECONFIG=kc2, COIL_NODE_NAME=node))
    assert r.returncode == 1
    assert "HTTP 403" in r.stderr and "RBAC" in r.stderr
    assert "retrying" not in r.stderr
    assert (TAINT, "NoSchedule") in taint_keys(kube_apiserver, node)[0]


def unreachable_kubeconfig(path) -> str:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "x"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u"}}]}))
    return str(path)


def test_api_unreachable_is_retried_then_reported(dirs, tmp_path):
    """The installer as shipped: the unreachable API server is retried (one
    log line per retry, growing pauses), then reported on one line."""
    kc = unreachable_kubeconfig(tmp_path / "kc")
    r = install(base_env(dirs, KUBECONFIG=kc, COIL_NODE_NAME="n1", COIL_BOOT_TAINT=TAINT,
                         COIL_INSTALLER_API_TIMEOUT="3s"))
    assert r.returncode == 1
    records = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    retries = [x for x in records if x["msg"] == "cannot reach the API server; retrying"]
    assert retries, r.stderr
    assert all(b["retry_s"] > a["retry_s"] for a, b in zip(retries, retries[1:]))
    assert r.stderr.strip().splitlines()[-1].startswith(
        "coil-installer: error: removing taints from node n1 (gave up after 3s)")


class FakeClock:
    """time.monotonic and time.sleep for code under test: sleeping advances
    the clock, nothing else does."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def test_api_unreachable_retry_count_with_a_fake_clock(tmp_path, monkeypatch):
    """Exactly the retries that fit in the timeout, pauses doubling, then
    the error: backoff 0.5 s, 1 s, (2 s would end past 3 s) -> 2 retries."""
    from coil import k8s
    from coil.controller import watcher
    from coil.errors import KubernetesError
    from coil.installer.main import remove_taints
    monkeypatch.setattr(watcher.random, "uniform", lambda a, b: 0.0)     # no jitter
    core = k8s.core_api(k8s.api_client(unreachable_kubeconfig(tmp_path / "kc")))
    clock = FakeClock()
    with pytest.raises(KubernetesError) as info:
        remove_taints(core, "n1", [TAINT], 3.0, sleep=clock.sleep, clock=clock.monotonic)
    assert clock.sleeps == [0.5, 1.0]
    assert info.value.one_line().startswith("removing taints from node n1 (gave up after 3s)")
    # a longer timeout buys exactly the pauses that fit in it
    clock = FakeClock()
    with pytest.raises(KubernetesError):
        remove_taints(core, "n1", [TAINT], 20.0, sleep=clock.sleep, clock=clock.monotonic)
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_conflicting_update_is_retried(kube_apiserver, coild_token, node):
    """A Node changed between read and patch (409): read again and retry."""
    from kubernetes.client.exceptions import ApiException

    from coil.installer.main import remove_taints
    core = kube_apiserver.core(coild_token)

    class Racing:
        patches = 0

        def read_node(self, *a, **kw):
            return core.read_node(*a, **kw)

        def patch_node(self, name, body, **kw):
            Racing.patches += 1
            if Racing.patches == 1:
                # someone else changes the Node first: our resourceVersion is stale
                kube_apiserver.core().patch_node(name, {"metadata": {"labels": {"x": "1"}}})
            return core.patch_node(name, body, **kw)

    removed = remove_taints(Racing(), node, [TAINT], timeout=30, sleep=lambda s: None)
    assert removed == [TAINT, TAINT] and Racing.patches == 2
    assert [k for k, _ in taint_keys(kube_apiserver, node)[0]] == ["example.com/other"]
    with pytest.raises(ApiException):
        core.delete_node(node)           # coild's account may not delete Nodes
