"""Every manifest in deploy/ is valid Kubernetes, and the pieces agree.

Schemas: kubernetes-validate's offline, strict schemas (no unknown fields).
Its oldest bundled version is 1.25, the closest to the 1.20 API server the
integration tests use (tests/integration/test_k8s_endpoints.py also creates
the objects on that server with dry-run); the newest is checked as well.
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
MANIFESTS = sorted(p for p in glob.glob(os.path.join(DEPLOY, "*.yaml"))
                   if os.path.basename(p) != "kustomization.yaml")   # kustomize, not an object


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def all_objects():
    return [obj for path in MANIFESTS for obj in load(path)]


def by_kind(kind):
    return [o for o in all_objects() if o["kind"] == kind]


def schema_versions():
    import kubernetes_validate.utils as kv
    versions = sorted(kv.all_versions(), key=lambda v: tuple(int(x) for x in v.split(".")))
    return sorted({versions[0], versions[-1]})


def test_there_are_manifests():
    names = {os.path.basename(p) for p in MANIFESTS}
    assert {"rbac.yaml", "coild.yaml", "coil-controller.yaml", "coil-config.yaml",
            "etcd-endpoints.yaml"} <= names
    assert os.path.exists(os.path.join(DEPLOY, "Dockerfile"))


@pytest.mark.parametrize("version", schema_versions())
@pytest.mark.parametrize("path", MANIFESTS, ids=os.path.basename)
def test_manifest_validates(path, version):
    import kubernetes_validate
    docs = load(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
        assert doc["metadata"].get("namespace", "kube-system") == "kube-system"


def test_validator_rejects_a_broken_manifest():
    import kubernetes_validate
    ds = json.loads(json.dumps(by_kind("DaemonSet")[0]))
    ds["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, schema_versions()[0], strict=True)
    ds = json.loads(json.dumps(by_kind("DaemonSet")[0]))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True      # unknown field: strict
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, schema_versions()[0], strict=True)


def _container(obj, name, init=False):
    spec = obj["spec"]["template"]["spec"]
    for c in spec.get("initContainers" if init else "containers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def _arg(container, flag):
    for a in container["command"] + container.get("args", []):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def test_coild_daemonset_is_consistent():
    (ds,) = by_kind("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["serviceAccountName"] == "coild"
    coild = _container(ds, "coild")
    installer = _container(ds, "coil-installer", init=True)
    assert coild["command"][:2] == ["hypercoil", "coild"]
    assert installer["command"] == ["hypercoil", "coil-installer"]
    # the plugin socket: coild's flag, the mounted host directory, the conflist
    socket = _arg(coild, "--socket")
    from coil.cni.protocol import DEFAULT_SOCKET
    assert socket == DEFAULT_SOCKET
    mounts = {m["mountPath"]: m["name"] for m in coild["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/run/coild"]]["hostPath"]["path"] == "/run/coild"
    assert volumes[mounts["/run/netns"]]["hostPath"]["path"] == "/run/netns"
    (cm,) = by_kind("ConfigMap")
    conf = json.loads(cm["data"]["cni_netconf"])
    assert conf["plugins"][0] == {"type": "coil", "socket": socket}
    from coil.installer.main import DEFAULT_NETCONF, validate_netconf
    assert DEFAULT_NETCONF["plugins"][0]["socket"] == socket
    validate_netconf(cm["data"]["cni_netconf"], "10-coil.conflist", "ConfigMap")
    # installer mounts: the host's CNI directories at the default env paths
    imounts = {m["mountPath"]: m["name"] for m in installer["volumeMounts"]}
    assert volumes[imounts["/host/opt/cni/bin"]]["hostPath"]["path"] == "/opt/cni/bin"
    assert volumes[imounts["/host/etc/cni/net.d"]]["hostPath"]["path"] == "/etc/cni/net.d"
    env = {e["name"]: e for e in installer["env"]}
    assert env["COIL_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["CNI_NETCONF"]["valueFrom"]["configMapKeyRef"]["name"] == cm["metadata"]["name"]
    # privileges only where needed
    assert installer["securityContext"]["privileged"] is True
    assert coild["securityContext"].get("privileged") is False
    assert set(coild["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN",
                                                                    "SYS_PTRACE"}
    # as v1: the host's PID namespace, so /proc/<pid>/ns/net paths can be opened
    assert spec["hostPID"] is True
    # probes on coild's REST endpoint
    http = _arg(coild, "--http")
    host, port = http.rsplit(":", 1)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = coild[probe]["httpGet"]
        assert (get["host"], str(get["port"]), get["path"]) == (host, port, path)


def test_controller_deployment_is_consistent():
    (dep,) = by_kind("Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert spec["serviceAccountName"] == "coil-controller"
    c = _container(dep, "coil-controller")
    assert c["command"][:2] == ["hypercoil", "coil-controller"]
    port = _arg(c, "--metrics-addr").rsplit(":", 1)[1]
    assert str(c["livenessProbe"]["httpGet"]["port"]) == port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True
    # the options parse
    from coil.controller.main import cli
    ctx = cli.make_context("coil-controller", c["command"][2:])
    assert ctx.params["etcd_endpoints"] == "@coil-etcd"


def test_etcd_endpoints_name_matches_rbac_and_flags():
    (ep,) = by_kind("Endpoints")
    name = ep["metadata"]["name"]
    (role,) = by_kind("Role")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["endpoints"],
                              "resourceNames": [name], "verbs": ["get"]}]
    for obj in by_kind("DaemonSet") + by_kind("Deployment"):
        for c in obj["spec"]["template"]["spec"]["containers"]:
            assert _arg(c, "--etcd-endpoints") == f"@{name}"
    from coil.k8s import parse_etcd_endpoints_object
    urls = parse_etcd_endpoints_object(ep, name, secure=False)
    assert urls and all(u.startswith("http://") and u.endswith(":2379") for u in urls)


def test_rbac_is_least_privilege():
    rules = {r["metadata"]["name"]: r["rules"] for r in by_kind("ClusterRole")}
    assert rules["coil:coild"] == [{"apiGroups": [""], "resources": ["nodes"],
                                    "verbs": ["get", "patch"]}]
    assert rules["coil:coil-controller"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]
    for rule in [r for rs in rules.values() for r in rs]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    sas = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in by_kind("ServiceAccount")}
    for binding in by_kind("ClusterRoleBinding") + by_kind("RoleBinding"):
        for subject in binding["subjects"]:
            assert (subject["namespace"], subject["name"]) in sas


def test_dockerfile_builds_from_this_repo():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        text = f.read()
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in src.split():
            assert os.path.exists(os.path.join(REPO, item)), item
    assert "hypercoil" in text and "launcher.c" in text
    images = {c["image"] for o in by_kind("DaemonSet") + by_kind("Deployment")
              for c in (o["spec"]["template"]["spec"]["containers"]
                        + o["spec"]["template"]["spec"].get("initContainers", []))}
    assert len(images) == 1
    assert images.pop() in text      # the build command in the header names the tag


SECURE = "#etcd-secure "


def _secure_variant(name):
    """The manifest with its "#etcd-secure " lines switched on (what
    docs/security.md tells operators to do with sed)."""
    with open(os.path.join(DEPLOY, name)) as f:
        text = f.read()
    assert SECURE in text, f"{name} shows no etcd TLS/auth settings"
    return [d for d in yaml.safe_load_all(text.replace(SECURE, "")) if d]


@pytest.mark.parametrize("version", schema_versions())
def test_etcd_tls_and_auth_can_be_switched_on(version):
    import kubernetes_validate
    from coil.controller.main import cli as controller_cli
    from coil.coild.main import cli as coild_cli
    secrets = set()
    for name, kind, container, cli, role in (
            ("coild.yaml", "DaemonSet", "coild", coild_cli, "coild"),
            ("coil-controller.yaml", "Deployment", "coil-controller", controller_cli,
             "coil-controller")):
        (obj,) = [d for d in _secure_variant(name) if d["kind"] == kind]
        kubernetes_validate.validate(obj, version, strict=True)
        c = _container(obj, container)
        params = cli.make_context(role, c["command"][2:]).params
        assert params["etcd_username"] and params["etcd_password"] is None
        files = [params[k] for k in ("etcd_tls_ca", "etcd_tls_cert", "etcd_tls_key",
                                     "etcd_password_file")]
        assert all(files)
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        for path in files:
            mount = next(m for m in c["volumeMounts"]
                         if path.startswith(m["mountPath"].rstrip("/") + "/"))
            assert mount.get("readOnly") is True
            secrets.add(volumes[mount["name"]]["secret"]["secretName"])
        if role == "coil-controller":    # runs as nobody: the files must be group-readable
            spec = obj["spec"]["template"]["spec"]
            assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]
            assert volumes[mount["name"]]["secret"]["defaultMode"] & 0o040
    assert len(secrets) == 1
    # nothing secret is ever on a command line, switched on or not
    for obj in all_objects():
        for c in obj.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            assert not any(a.startswith("--etcd-password=") for a in c.get("command", []))


def test_coild_serves_changes_only_on_its_api_socket():
    (ds,) = by_kind("DaemonSet")
    coild = _container(ds, "coild")
    api = _arg(coild, "--api-socket")
    assert api and api.startswith("/run/coild/") and api != _arg(coild, "--socket")
    assert _arg(coild, "--http").startswith("127.0.0.1:")


# -- kustomize: the base and the etcd Endpoints name parameter ------------------------------

KUSTOMIZATION = os.path.join(DEPLOY, "kustomization.yaml")
COMPONENT = os.path.join(DEPLOY, "components", "etcd-endpoints-name", "kustomization.yaml")
RENAME = """apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
patches:
  - target:
      kind: Endpoints
      name: coil-etcd
    patch: |-
      - op: replace
        path: /metadata/name
        value: my-etcd
"""


def _key(obj):
    return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])


def test_kustomization_lists_every_manifest():
    with open(KUSTOMIZATION) as f:
        k = yaml.safe_load(f)
    assert sorted(k["resources"]) == sorted(os.path.basename(p) for p in MANIFESTS)
    assert k["components"] == ["components/etcd-endpoints-name"]


def _build(directory):
    """``kubectl kustomize`` (kustomize v5) when kubectl is installed, else
    our reading of the same kustomization (resources, JSON6902 name patch,
    the component's replacements)."""
    import shutil
    import subprocess
    if shutil.which("kubectl"):
        r = subprocess.run(["kubectl", "kustomize", directory], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return [d for d in yaml.safe_load_all(r.stdout) if d]
    return _build_by_hand(directory)


def _build_by_hand(directory):
    import copy
    with open(os.path.join(directory, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    objs = []
    for res in k.get("resources", []):
        path = os.path.normpath(os.path.join(directory, res))
        objs += _build_by_hand(path) if os.path.isdir(path) else copy.deepcopy(load(path))
    for comp in k.get("components", []):
        with open(os.path.join(directory, comp, "kustomization.yaml")) as f:
            c = yaml.safe_load(f)
        for patch in c.get("patches", []):
            for o in objs:
                if (o["kind"], o["metadata"]["name"]) == (patch["target"]["kind"],
                                                          patch["target"]["name"]):
                    for op in yaml.safe_load(patch["patch"]):
                        assert (op["op"], op["path"]) == ("replace", "/metadata/name")
                        o["metadata"]["name"] = op["value"]
        for rep in c.get("replacements", []):
            (src,) = [o for o in objs if o["kind"] == rep["source"]["kind"]]
            value = src["metadata"]["name"]
            for t in rep["targets"]:
                (obj,) = [o for o in objs if (o["kind"], o["metadata"]["name"]) ==
                          (t["select"]["kind"], t["select"]["name"])]
                for fp in t["fieldPaths"]:
                    if fp == "rules.0.resourceNames.0":
                        obj["rules"][0]["resourceNames"][0] = value
                        continue
                    cname = re.search(r"\[name=([^]]+)\]", fp).group(1)
                    old = re.search(r"command\.\[=([^]]+)\]", fp).group(1)
                    (cont,) = [x for x in obj["spec"]["template"]["spec"]["containers"]
                               if x["name"] == cname]
                    i = cont["command"].index(old)
                    parts = cont["command"][i].split(t["options"]["delimiter"])
                    parts[t["options"]["index"]] = value
                    cont["command"][i] = t["options"]["delimiter"].join(parts)
    return objs


def _endpoints_name_everywhere(objs):
    (ep,) = [o for o in objs if o["kind"] == "Endpoints"]
    (role,) = [o for o in objs if o["kind"] == "Role"]
    flags = [_arg(c, "--etcd-endpoints") for o in objs if o["kind"] in ("DaemonSet", "Deployment")
             for c in o["spec"]["template"]["spec"]["containers"]]
    return ep["metadata"]["name"], role["rules"][0]["resourceNames"], flags


def test_kustomize_base_is_the_plain_manifests():
    built = _build(DEPLOY)
    assert {_key(o): o for o in built} == {_key(o): o for o in all_objects()}


def test_etcd_endpoints_name_is_a_kustomize_parameter(tmp_path):
    """The overlay of docs/deploy.md: rename the Endpoints, and the RBAC
    resourceNames and both --etcd-endpoints=@NAME flags follow."""
    overlay = tmp_path / "overlay"
    (overlay / "rename").mkdir(parents=True)
    rel = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}\ncomponents:\n  - rename\n"
        f"  - {rel}/components/etcd-endpoints-name\n")
    (overlay / "rename" / "kustomization.yaml").write_text(RENAME)
    built = _build(str(overlay))
    assert _endpoints_name_everywhere(built) == ("my-etcd", ["my-etcd"],
                                                 ["@my-etcd", "@my-etcd"])
    assert _endpoints_name_everywhere(all_objects()) == ("coil-etcd", ["coil-etcd"],
                                                         ["@coil-etcd", "@coil-etcd"])
    # the overlay example in docs/deploy.md is this one
    with open(os.path.join(REPO, "docs", "deploy.md")) as f:
        doc = f.read()
    assert "components/etcd-endpoints-name" in doc and "value: my-etcd" in doc
    # the hand evaluator agrees with kustomize where both exist
    assert _endpoints_name_everywhere(_build_by_hand(str(overlay))) == \
        _endpoints_name_everywhere(built)
