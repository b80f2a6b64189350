"""``--etcd-endpoints @NAME``: the etcd addresses come from the Endpoints
object kube-system/NAME of a real kube-apiserver (1.20).

The API server refuses loopback addresses in Endpoints, so the end-to-end
tests run their etcd inside a network namespace of their own
(``coiltest-ep-<random>``) on a private address that exists only there
(10.255.77.1/32 on a veth pair with both ends in that namespace). The
clients under test (coilctl, coil-controller) run inside that namespace
too; they reach the kube-apiserver (127.0.0.1 of the root namespace)
through ``tests/nsrelay.NetnsRelay``, a relay from the namespace's loopback
to the root namespace's loopback. The test process itself reads and seeds
that etcd over its UNIX socket. Nothing in the root namespace's network
configuration is changed and no traffic goes to the machine's own
non-loopback addresses.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

from helpers import REPO, EtcdServer, free_port, hypercoil, wait_for
from nsrelay import NetnsRelay

pytestmark = [pytest.mark.etcd]

#: exists only inside the test namespace (on ep0 of a veth pair whose both ends are there)
NS_ETCD_ADDRESS = "10.255.77.1"


class EndpointsNetns:
    """A test network namespace with an etcd on ``NS_ETCD_ADDRESS``."""

    def __init__(self, name: str, etcd: EtcdServer):
        self.name = name
        self.path = f"/run/netns/{name}"
        self.etcd = etcd

    def cmd(self, *args: str) -> list[str]:
        """``ARGS`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def hypercoil(self, *args, env=None, timeout=60):
        """``python -m coil ARGS`` inside the namespace."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        return subprocess.run(self.cmd(sys.executable, "-m", "coil", *args),
                              capture_output=True, text=True, env=full_env, timeout=timeout)


def _ip(*args: str):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def ns_etcd():
    """An etcd listening on http://NS_ETCD_ADDRESS:PORT inside a namespace
    ``coiltest-ep-<random>`` (and on a UNIX socket the test process uses);
    namespace, etcd and files are removed at teardown, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")
    name = f"coiltest-ep-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.mkdtemp(prefix="coil-etcd-ns-")
    server = None
    _ip("netns", "add", name)
    try:
        ns = ["-n", name]
        _ip(*ns, "link", "set", "lo", "up")
        _ip(*ns, "link", "add", "ep0", "type", "veth", "peer", "name", "ep1")
        _ip(*ns, "link", "set", "ep0", "up")
        _ip(*ns, "link", "set", "ep1", "up")
        _ip(*ns, "addr", "add", f"{NS_ETCD_ADDRESS}/32", "dev", "ep0")
        server = EtcdServer(os.path.join(tmp, "data"), netns=name, host=NS_ETCD_ADDRESS)
        server.start()
        yield EndpointsNetns(name, server)
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ns_kubeconfig(kube_apiserver, ns_etcd, tmp_path):
    """``make(token=None) -> path``: a kubeconfig for clients inside the
    namespace, pointing at a relay to the kube-apiserver (the serving
    certificate is for 127.0.0.1, which the relay address also is)."""
    with NetnsRelay(ns_etcd.path, ("127.0.0.1", kube_apiserver.port)) as relay:
        def make(token=None):
            path = str(tmp_path / f"kubeconfig-{uuid.uuid4().hex[:6]}")
            kube_apiserver.kubeconfig(token, path)
            with open(path) as f:
                doc = json.load(f)
            doc["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
            with open(path, "w") as f:
                json.dump(doc, f)
            return path

        make.relay = relay
        yield make


def unix_store(server: EtcdServer, prefix: str):
    """An IPAMStore of the test process on ``server``'s UNIX socket."""
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    return IPAMStore(Etcd(EtcdConfig(endpoints=(server.unix_endpoint,), prefix=prefix)))


@pytest.fixture
def admin(kube_apiserver):
    return kube_apiserver.core()


@pytest.fixture
def endpoints(admin):
    """``make(subsets, name=None) -> name``; deleted afterwards."""
    made = []

    def make(subsets, name=None):
        name = name or f"etcd-{uuid.uuid4().hex[:8]}"
        body = {"metadata": {"name": name, "namespace": "kube-system"}, "subsets": subsets}
        admin.create_namespaced_endpoints("kube-system", body)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            try:
                admin.delete_namespaced_endpoints(name, "kube-system")
            except Exception:   # noqa: BLE001
                pass


def cfg(endpoints, **kw):
    from coil.config import EtcdConfig
    return EtcdConfig(endpoints=(endpoints,), **kw)


def test_resolves_ready_addresses_and_port(kube_apiserver, endpoints):
    from coil.k8s import resolve_etcd_endpoints
    name = endpoints([
        {"addresses": [{"ip": "10.1.0.1"}, {"ip": "10.1.0.2"}],
         "notReadyAddresses": [{"ip": "10.1.0.9"}],
         "ports": [{"name": "peer", "port": 2380}, {"name": "etcd", "port": 2379}]},
        {"addresses": [{"ip": "fd01::5"}], "ports": [{"port": 12379}]},
    ])
    api = kube_apiserver.api()
    out = resolve_etcd_endpoints(cfg(f"@{name}", prefix="/p/"), api)
    assert out.endpoints == ("http://10.1.0.1:2379", "http://10.1.0.2:2379",
                             "http://[fd01::5]:12379")
    assert out.prefix == "/p/"
    ca = os.path.join(REPO, "pyproject.toml")        # any existing file: only the scheme matters
    out = resolve_etcd_endpoints(cfg(f"@{name}", tls_ca=ca), api)
    assert all(u.startswith("https://") for u in out.endpoints)
    # URLs are left alone
    plain = cfg("http://127.0.0.1:2379")
    assert resolve_etcd_endpoints(plain, api) is plain


def test_coilctl_reaches_etcd_through_endpoints(endpoints, ns_etcd, ns_kubeconfig):
    etcd = ns_etcd.etcd
    name = endpoints([{"addresses": [{"ip": etcd.host}],
                       "ports": [{"port": etcd.client_port}]}])
    kc = ns_kubeconfig()
    prefix = f"/coiltest-{uuid.uuid4().hex[:8]}/"
    env = {"KUBECONFIG": kc}
    args = ["coilctl", "--etcd-endpoints", f"@{name}", "--etcd-prefix", prefix]
    r = ns_etcd.hypercoil(*args, "pool", "create", "default", "10.70.0.0/24", "4", env=env)
    assert r.returncode == 0, r.stderr
    r = ns_etcd.hypercoil(*args, "-o", "json", "pool", "list", env=env)
    assert r.returncode == 0, r.stderr
    assert "10.70.0.0/24" in r.stdout
    # the environment variable works the same
    r = ns_etcd.hypercoil("coilctl", "--etcd-prefix", prefix, "pool", "list",
                          env=dict(env, COILCTL_ETCD_ENDPOINTS=f"@{name}"))
    assert r.returncode == 0 and "default" in r.stdout, r.stderr
    # the pool really is in that etcd (read here over its UNIX socket)
    store = unix_store(etcd, prefix)
    try:
        assert [(p.name, [str(n) for n in p.subnets]) for p in store.list_pools()] == \
            [("default", ["10.70.0.0/24"])]
    finally:
        store.close()
    assert ns_kubeconfig.relay.connections >= 3       # the API server was asked each time


def test_controller_uses_endpoints_with_its_own_rbac(kube_apiserver, endpoints, ns_etcd,
                                                     ns_kubeconfig, tmp_path):
    """coil-controller, with the coil-controller ServiceAccount's token and
    deploy/rbac.yaml only, reads kube-system/coil-etcd and works on that etcd:
    it finds the block of a node that has no Node object (read through the
    resolved endpoints) and keeps it for the grace period, and its leak scan
    of that etcd runs, without a warning or an error."""
    etcd = ns_etcd.etcd
    with open(os.path.join(REPO, "deploy", "rbac.yaml")) as f:
        kube_apiserver.apply([d for d in yaml.safe_load_all(f) if d])
    token = kube_apiserver.service_account_token("kube-system", "coil-controller")
    admin = kube_apiserver.core()
    try:
        admin.delete_namespaced_endpoints("coil-etcd", "kube-system")
    except Exception:   # noqa: BLE001 - not there
        pass
    endpoints([{"addresses": [{"ip": etcd.host}],
                "ports": [{"name": "etcd", "port": etcd.client_port}]}], name="coil-etcd")
    prefix = f"/coiltest-{uuid.uuid4().hex[:8]}/"
    store = unix_store(etcd, prefix)
    store.create_pool("default", "10.71.0.0/24", 4)
    store.acquire_block("default", "node-that-is-gone")
    kc = ns_kubeconfig(token)
    log = open(tmp_path / "controller.log", "wb")
    proc = subprocess.Popen(
        ns_etcd.cmd(sys.executable, "-m", "coil", "coil-controller",
                    "--etcd-endpoints", "@coil-etcd", "--etcd-prefix", prefix,
                    "--kubeconfig", kc, "--metrics-addr", "", "--scan-interval", "1h"),
        stdout=log, stderr=log)
    def seen(msg):
        return any(line.startswith("{") and json.loads(line)["msg"] == msg
                   for line in (tmp_path / "controller.log").read_text().splitlines())
    try:
        wait_for(lambda: proc.poll() is not None or (
            seen("node is gone; its blocks are kept for the grace period") and
            seen("leak scan done")), timeout=60, what="the controller to read etcd")
        assert proc.poll() is None, (tmp_path / "controller.log").read_text()
        assert [b.node for b in store.all_blocks()] == ["node-that-is-gone"]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        store.close()
    records = [json.loads(line) for line in (tmp_path / "controller.log").read_text().splitlines()
               if line.startswith("{")]
    assert not [r for r in records if r["level"] in ("warning", "error")], records


@pytest.mark.parametrize("subsets, needle", [
    ([], "no subsets"),
    ([{"notReadyAddresses": [{"ip": "10.2.0.1"}], "ports": [{"port": 2379}]}],
     "no ready address"),
    ([{"addresses": [{"ip": "10.2.0.1"}], "ports": [{"name": "a", "port": 1},
                                                   {"name": "b", "port": 2}]}],
     "name exactly one"),
    ([{"addresses": [{"ip": "10.2.0.1"}], "ports": [{"port": 2379, "protocol": "UDP"}]}],
     "protocol UDP"),
])
def test_invalid_endpoints_content_is_rejected(kube_apiserver, endpoints, subsets, needle):
    from coil.errors import InvalidArgument
    from coil.k8s import resolve_etcd_endpoints
    name = endpoints(subsets)
    with pytest.raises(InvalidArgument) as info:
        resolve_etcd_endpoints(cfg(f"@{name}"), kube_apiserver.api())
    msg = info.value.one_line()
    assert needle in msg and f"kube-system/{name}" in msg and "\n" not in msg


@pytest.mark.parametrize("obj, needle", [
    ({"subsets": [{"addresses": [{"ip": "not-an-ip"}], "ports": [{"port": 2379}]}]},
     "is not an IP address"),
    ({"subsets": [{"addresses": [{}], "ports": [{"port": 2379}]}]}, "is not an IP address"),
    ({"subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 0}]}]}, "1..65535"),
    ({"subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": "2379"}]}]}, "1..65535"),
    ({"subsets": [{"addresses": [{"ip": "10.0.0.1"}]}]}, "has no port"),
    ({"subsets": "x"}, "no subsets"),
    ({"subsets": ["x"]}, "not an object"),
    ([], "not an object"),
])
def test_malformed_content_is_rejected(obj, needle):
    """Content the API server itself would refuse, checked anyway."""
    from coil.errors import InvalidArgument
    from coil.k8s import parse_etcd_endpoints_object
    with pytest.raises(InvalidArgument) as info:
        parse_etcd_endpoints_object(obj, "x", secure=False)
    assert needle in info.value.one_line()


@pytest.mark.parametrize("value", ["@", "@Bad_Name", "@a/b", "@-x", "@" + "a" * 254])
def test_invalid_names_are_rejected_before_any_request(value):
    from coil.errors import InvalidArgument
    from coil.k8s import resolve_etcd_endpoints

    class NoAPI:
        def __getattr__(self, name):
            raise AssertionError("the API must not be contacted")

    from kubernetes import client
    api = client.CoreV1Api(client.ApiClient(client.Configuration()))
    api.api_client = NoAPI()
    with pytest.raises(InvalidArgument) as info:
        resolve_etcd_endpoints(cfg(value), api)
    assert "invalid Endpoints name" in info.value.one_line()


def test_missing_forbidden_and_unreachable(kube_apiserver):
    from kubernetes import client

    from coil.errors import KubernetesError
    from coil.k8s import resolve_etcd_endpoints
    with pytest.raises(KubernetesError) as info:
        resolve_etcd_endpoints(cfg("@no-such-endpoints"), kube_apiserver.api())
    assert "kube-system/no-such-endpoints does not exist" in info.value.one_line()
    # a service account without the permission: 403, with a hint
    admin = kube_apiserver.core()
    try:
        admin.create_namespaced_service_account(
            "kube-system", {"metadata": {"name": "coiltest-nobody"}})
    except Exception:   # noqa: BLE001 - exists
        pass
    token = kube_apiserver.service_account_token("kube-system", "coiltest-nobody")
    with pytest.raises(KubernetesError) as info:
        resolve_etcd_endpoints(cfg("@coil-etcd"), kube_apiserver.api(token))
    assert info.value.status == 403
    assert "403" in info.value.one_line() and "RBAC" in info.value.one_line()
    # nobody listening
    conf = client.Configuration()
    conf.host = f"https://127.0.0.1:{free_port()}"
    conf.retries = 0
    with pytest.raises(KubernetesError) as info:
        resolve_etcd_endpoints(cfg("@coil-etcd"), client.ApiClient(conf))
    assert info.value.status == 0
    assert "reachable" in info.value.one_line()


def test_cli_error_is_one_line(kube_apiserver, tmp_path):
    kc = kube_apiserver.kubeconfig(path=str(tmp_path / "kc"))
    r = hypercoil("coilctl", "--etcd-endpoints", "@no-such-endpoints", "pool", "list",
                  env={"KUBECONFIG": kc})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "coilctl: error: Endpoints kube-system/no-such-endpoints does not exist "
        "(create it with the etcd addresses (see deploy/etcd-endpoints.yaml))"]


def test_deploy_manifests_are_accepted_by_the_1_20_api_server(kube_apiserver):
    """Every object in deploy/ passes the real API server's validation (dry run)."""
    from kubernetes import utils
    api = kube_apiserver.api()
    objects = []
    for path in sorted(glob.glob(os.path.join(REPO, "deploy", "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":      # kustomize's, not an object
            continue
        with open(path) as f:
            objects += [d for d in yaml.safe_load_all(f) if d]
    assert len(objects) >= 10
    for obj in objects:
        try:
            utils.create_from_dict(api, obj, namespace="kube-system", dry_run="All")
        except utils.FailToCreateError as exc:
            statuses = {e.status for e in exc.api_exceptions}
            assert statuses == {409}, f"{obj['kind']} {obj['metadata']['name']}: " \
                                      f"{[e.body for e in exc.api_exceptions]}"
