"""``--etcd-endpoints @NAME``: the etcd addresses come from the Endpoints
object kube-system/NAME of a real kube-apiserver (1.20).

The API server refuses loopback addresses in Endpoints, so the end-to-end
tests run an etcd on this machine's first global IPv4 address (read from
``ip addr``; nothing in the network configuration is changed).
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

from helpers import REPO, EtcdServer, free_port, hypercoil

pytestmark = [pytest.mark.etcd]


def host_ipv4() -> str | None:
    r = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                       capture_output=True, text=True)
    for line in r.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


@pytest.fixture(scope="module")
def host_etcd():
    ip = host_ipv4()
    if ip is None:
        pytest.skip("no global IPv4 address to run an etcd on (Endpoints refuse loopback)")
    tmp = tempfile.mkdtemp(prefix="coil-etcd-host-")
    server = EtcdServer(os.path.join(tmp, "data"), host=ip)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


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


def test_coilctl_reaches_etcd_through_endpoints(kube_apiserver, endpoints, host_etcd, tmp_path):
    name = endpoints([{"addresses": [{"ip": host_etcd.host}],
                       "ports": [{"port": host_etcd.client_port}]}])
    kc = kube_apiserver.kubeconfig(path=str(tmp_path / "kubeconfig"))
    prefix = f"/coiltest-{uuid.uuid4().hex[:8]}/"
    env = {"KUBECONFIG": kc}
    args = ["coilctl", "--etcd-endpoints", f"@{name}", "--etcd-prefix", prefix]
    r = hypercoil(*args, "pool", "create", "default", "10.70.0.0/24", "4", env=env)
    assert r.returncode == 0, r.stderr
    r = hypercoil(*args, "-o", "json", "pool", "list", env=env)
    assert r.returncode == 0, r.stderr
    assert "10.70.0.0/24" in r.stdout
    # the environment variable works the same
    r = hypercoil("coilctl", "--etcd-prefix", prefix, "pool", "list",
                  env=dict(env, COILCTL_ETCD_ENDPOINTS=f"@{name}"))
    assert r.returncode == 0 and "default" in r.stdout, r.stderr


def test_controller_uses_endpoints_with_its_own_rbac(kube_apiserver, endpoints, host_etcd,
                                                     tmp_path):
    """coil-controller, with the coil-controller ServiceAccount's token and
    deploy/rbac.yaml only, reads kube-system/coil-etcd and works on that etcd."""
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    with open(os.path.join(REPO, "deploy", "rbac.yaml")) as f:
        kube_apiserver.apply([d for d in yaml.safe_load_all(f) if d])
    token = kube_apiserver.service_account_token("kube-system", "coil-controller")
    admin = kube_apiserver.core()
    try:
        admin.delete_namespaced_endpoints("coil-etcd", "kube-system")
    except Exception:   # noqa: BLE001 - not there
        pass
    endpoints([{"addresses": [{"ip": host_etcd.host}],
                "ports": [{"name": "etcd", "port": host_etcd.client_port}]}], name="coil-etcd")
    prefix = f"/coiltest-{uuid.uuid4().hex[:8]}/"
    store = IPAMStore(Etcd(EtcdConfig(endpoints=(host_etcd.endpoint,), prefix=prefix)))
    store.create_pool("default", "10.71.0.0/24", 4)
    store.acquire_block("default", "node-that-is-gone")
    kc = kube_apiserver.kubeconfig(token, str(tmp_path / "kubeconfig"))
    log = open(tmp_path / "controller.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coil", "coil-controller", "--etcd-endpoints", "@coil-etcd",
         "--etcd-prefix", prefix, "--kubeconfig", kc, "--metrics-addr", "",
         "--scan-interval", "1h"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 30
        while store.all_blocks() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert store.all_blocks() == [], (tmp_path / "controller.log").read_text()
    finally:
        proc.terminate()
        proc.wait(15)
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
