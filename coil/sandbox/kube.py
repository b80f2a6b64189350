"""Kubernetes for the sandbox (``up --kubernetes``, ``node-rm``) and the tests.

Two layers:

1. **The kube-apiserver recipe**, the one implementation shared with the
   test fixture (tests/kube.py): where the 1.20.2 binary is (built by
   tools/build-kube-apiserver.sh), the credentials (a service-account key
   pair made with ``openssl``, so that TokenRequest works without a
   controller-manager; a static token file with an ``admin`` in
   ``system:masters``), the command line, the ``/readyz`` wait, kubeconfig
   files, applying manifests and minting ServiceAccount tokens.
2. **The sandbox part**: ``KubernetesPart`` (a ``Sandbox`` extension, see
   coil/sandbox/cluster.py) starts kube-apiserver in the fabric namespace
   against the sandbox's own etcd (its UNIX socket; Kubernetes keeps its
   objects under ``/registry``, coil under ``/coil/``), registers one Node
   object per sandbox node, and starts coil-controller, also in the fabric
   namespace, with a ServiceAccount token bound by deploy/rbac.yaml.
   ``node_rm`` takes a node away the way a dead machine goes and shows
   coil-controller freeing its blocks.

Nothing listens in the root network namespace: kube-apiserver binds to
127.0.0.1 *of the fabric namespace*, coil-controller's metrics too. This
process reaches them through one worker thread that lives in the fabric
namespace (``NetnsThread``: ``setns(2)`` switches only the calling thread,
and a socket stays in the namespace it was made in).
"""

from __future__ import annotations

import concurrent.futures as futures
import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from coil.sandbox.config import SandboxError
from coil.sandbox.shell import Progress, ip_batch, netns_exists, tail

DEFAULT_BINARY = os.path.join(os.environ.get("KUBE_CACHE_DIR", "/var/cache/coil-kube"),
                              "bin", "kube-apiserver")
BUILD_HINT = ("run 'make kube-apiserver' (or 'make build'; tools/build-kube-apiserver.sh "
              "builds 1.20.2 from Debian's source in about 5 minutes), or set "
              "COIL_KUBE_APISERVER to a kube-apiserver 1.20 binary")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/24"

# the sandbox's fixed places inside its own fabric namespace
API_PORT = 6443
CONTROLLER_METRICS = "127.0.0.1:9384"
CONTROLLER_SA = ("kube-system", "coil-controller")
TOKEN_SECONDS = 365 * 86400
# package data: a copy of deploy/rbac.yaml (tests/unit/test_sandbox_data.py keeps them equal)
RBAC_MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "rbac.yaml")


class KubeError(SandboxError):
    """kube-apiserver or coil-controller could not be started or reached."""


# -- the kube-apiserver recipe (shared with tests/kube.py) ------------------------

def binary_path() -> str:
    """Where the kube-apiserver binary is expected."""
    return os.environ.get("COIL_KUBE_APISERVER") or DEFAULT_BINARY


def find_binary() -> str | None:
    """The kube-apiserver binary, or None when it is not there."""
    path = binary_path()
    return path if os.access(path, os.X_OK) else None


def require_binary() -> str:
    path = find_binary()
    if path is None:
        raise KubeError(f"kube-apiserver not found at {binary_path()}: {BUILD_HINT}")
    return path


@dataclass
class Credentials:
    key: str          # service-account signing key (private)
    pub: str          # its public half (verifies tokens)
    tokens: str       # static token file: TOKEN,admin,admin-uid,"system:masters"
    admin_token: str


def make_credentials(workdir: str, admin_token: str) -> Credentials:
    """The service-account key pair (kept when it exists: tokens minted
    before a restart stay valid) and the static token file."""
    os.makedirs(workdir, exist_ok=True)
    key = os.path.join(workdir, "sa.key")
    pub = os.path.join(workdir, "sa.pub")
    if not os.path.exists(pub):
        for cmd in (["openssl", "genrsa", "-out", key, "2048"],
                    ["openssl", "rsa", "-in", key, "-pubout", "-out", pub]):
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                raise KubeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    tokens = os.path.join(workdir, "tokens.csv")
    fd = os.open(tokens, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'{admin_token},admin,admin-uid,"system:masters"\n')
    return Credentials(key, pub, tokens, admin_token)


def ca_file(workdir: str) -> str:
    """kube-apiserver's self-signed serving certificate (made at its first
    start in ``workdir/certs``; valid for 127.0.0.1), used as the CA."""
    return os.path.join(workdir, "certs", "apiserver.crt")


def apiserver_argv(binary: str, *, etcd_servers: str, workdir: str, port: int,
                   creds: Credentials, bind: str = "127.0.0.1") -> list[str]:
    """The command line. ``etcd_servers`` may be ``unix://PATH`` (1.20's
    etcd client accepts it) or ``http://HOST:PORT``. The advertise address
    is the bind address: a namespace without a default route has no other
    to offer, and kube-apiserver refuses to start without one."""
    return [binary,
            f"--etcd-servers={etcd_servers}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={creds.pub}",
            f"--service-account-signing-key-file={creds.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--secure-port={port}",
            f"--bind-address={bind}",
            f"--advertise-address={bind}",
            "--insecure-port=0",
            f"--cert-dir={os.path.join(workdir, 'certs')}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={creds.tokens}",
            # no token controller runs: with this plugin Pods could not be created
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",      # as kubeadm clusters run it
            "--enable-priority-and-fairness=false",
            "--logtostderr=true", "--v=0"]


def _insecure_context() -> ssl.SSLContext:
    # /readyz is polled before the certificate exists: no verification there
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def readyz(url: str, token: str, timeout: float = 2.0) -> bool:
    """True when ``GET url/readyz`` answers 200."""
    req = urllib.request.Request(f"{url}/readyz", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_insecure_context()) as r:
            return r.status == 200
    except (OSError, http.client.HTTPException):
        return False


def wait_ready(probe, alive, log_path: str, timeout: float = 60.0, what="kube-apiserver",
               cancel: threading.Event | None = None) -> float:
    """Poll ``probe()`` until true; fail early when ``alive()`` turns false.
    Returns the seconds waited. Raises KubeError with the log's tail."""
    t0 = time.monotonic()
    while True:
        if probe():
            return time.monotonic() - t0
        if not alive():
            raise KubeError(f"{what} exited during start; its log {log_path}:\n"
                            f"{tail(log_path)}")
        if time.monotonic() - t0 >= timeout:
            raise KubeError(f"{what} not ready within {timeout:g}s; its log {log_path}:\n"
                            f"{tail(log_path)}")
        if cancel is None:
            time.sleep(0.2)
        elif cancel.wait(0.2):
            raise KubeError(f"waiting for {what}: cancelled")


def kubeconfig_doc(url: str, ca: str, token: str, name: str = "coil") -> dict:
    return {"apiVersion": "v1", "kind": "Config", "current-context": name,
            "clusters": [{"name": name, "cluster": {"server": url, "certificate-authority": ca}}],
            "users": [{"name": name, "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}]}


def write_kubeconfig(path: str, url: str, ca: str, token: str, name: str = "coil") -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(kubeconfig_doc(url, ca, token, name), f, indent=1)    # JSON is YAML
    return path


def api_client(url: str, ca: str, token: str):
    """A kubernetes ApiClient for ``token``."""
    from kubernetes import client
    conf = client.Configuration()
    conf.host = url
    conf.ssl_ca_cert = ca
    conf.api_key = {"authorization": f"Bearer {token}"}
    conf.retries = 1
    return client.ApiClient(conf)


def apply(api, objects: list[dict]):
    """Create plain manifest dicts; objects that exist already are kept."""
    from kubernetes import utils
    for obj in objects:
        try:
            utils.create_from_dict(api, obj)
        except utils.FailToCreateError as exc:
            if all(getattr(e, "status", 0) == 409 for e in exc.api_exceptions):
                continue
            raise
    return api


def service_account_token(core, namespace: str, name: str, seconds: int = 3600) -> str:
    """Mint a token for a ServiceAccount with the TokenRequest API."""
    from kubernetes import client
    body = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
    return core.create_namespaced_service_account_token(name, namespace, body).status.token


def load_manifests(path: str) -> list[dict]:
    import yaml
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# -- a thread in another network namespace -------------------------------------------

class NetnsThread:
    """One worker thread that enters a network namespace for good: whatever
    runs through ``call`` opens its sockets there (setns(2) with
    CLONE_NEWNET affects the calling thread only). The rest of the process
    stays where it is."""

    def __init__(self, netns: str):
        self.netns = netns
        self._error = None
        self._pool = futures.ThreadPoolExecutor(1, thread_name_prefix=f"netns-{netns}",
                                                initializer=self._enter)

    def _enter(self):
        from coil.errors import NetlinkError
        from coil.net.ns import enter_netns
        try:
            enter_netns(f"/run/netns/{self.netns}")
        except NetlinkError as exc:
            self._error = str(exc)

    def _run(self, fn, args, kwargs):
        if self._error:
            raise KubeError(self._error)
        return fn(*args, **kwargs)

    def call(self, fn, *args, **kwargs):
        return self._pool.submit(self._run, fn, args, kwargs).result()

    def close(self):
        self._pool.shutdown(wait=True)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a plain GET; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc)


# -- the sandbox part -------------------------------------------------------------

def preflight():
    """Fail early (one line) when something for --kubernetes is missing."""
    require_binary()
    if shutil.which("openssl") is None:
        raise KubeError("openssl not found: install openssl (it makes the service-account keys)")
    import importlib.util
    if importlib.util.find_spec("kubernetes") is None:
        raise KubeError("the Python 'kubernetes' client is not installed "
                        "(a dependency of coil: pip install -e . in the venv)")


class KubernetesPart:
    """The Kubernetes side of one sandbox (``Config.kubernetes``).

    ``on_services``: credentials, kube-apiserver spawned in the fabric
    namespace (recorded, so ``down`` stops it by PID), then a background
    thread waits for /readyz, registers the Nodes, applies deploy/rbac.yaml
    and mints coil-controller's token -- while ``up`` goes on making pods.
    ``on_ready`` (the end of ``up``): joins that thread, then starts
    coil-controller. The controller must never start before every Node is
    registered: its first list would take the nodes' blocks for orphans.

    Recorded in state.json under ``kubernetes``."""

    def __init__(self):
        self._ns: NetnsThread | None = None
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._outcome: dict = {}

    # -- helpers -----------------------------------------------------------
    @staticmethod
    def info(sb) -> dict:
        k = sb.state.data.get("kubernetes")
        if not k:
            raise KubeError("Kubernetes is not enabled in this sandbox "
                            "(start it with 'hypercoil sandbox up --kubernetes')")
        return k

    def netns(self, sb) -> NetnsThread:
        if self._ns is None:
            self._ns = NetnsThread(sb.state.data["fabric"]["netns"])
        return self._ns

    def call(self, sb, fn, *args, **kwargs):
        """Run ``fn`` in the fabric namespace (where kube-apiserver listens)."""
        return self.netns(sb).call(fn, *args, **kwargs)

    def admin(self, sb):
        k = self.info(sb)
        return api_client(k["url"], k["ca"], k["admin_token"])

    def core(self, sb):
        from kubernetes import client
        return client.CoreV1Api(self.admin(sb))

    def node_names(self, sb) -> list[str]:
        """Names of the Node objects (through the API)."""
        core = self.core(sb)

        def names():
            return sorted(n.metadata.name for n in core.list_node(_request_timeout=(3, 10)).items)
        return self.call(sb, names)

    def close(self):
        if self._ns is not None:
            self._ns.close()
            self._ns = None

    # -- up ----------------------------------------------------------------
    def on_services(self, sb):
        st = sb.state
        cfg = sb.config
        progress = getattr(sb, "progress", None) or Progress(quiet=True)
        kdir = st.path_of("kube")
        fabric = st.data["fabric"]["netns"]
        url = f"https://127.0.0.1:{API_PORT}"
        k = {"dir": kdir, "url": url, "netns": fabric, "ca": ca_file(kdir),
             "admin_token": secrets.token_hex(16),
             "admin_kubeconfig": os.path.join(kdir, "admin.kubeconfig"),
             "controller_kubeconfig": os.path.join(kdir, "coil-controller.kubeconfig"),
             "controller_metrics": CONTROLLER_METRICS,
             "controller_credentials": None, "removed": {}}
        st.data["kubernetes"] = k
        st.save()
        creds = make_credentials(kdir, k["admin_token"])
        argv = apiserver_argv(require_binary(), etcd_servers=sb.etcd_endpoint, workdir=kdir,
                              port=API_PORT, creds=creds)
        proc = sb.spawn("kube-apiserver", None, fabric, argv,
                        os.path.join(kdir, "kube-apiserver.log"), cwd=kdir)
        write_kubeconfig(k["admin_kubeconfig"], url, k["ca"], k["admin_token"], "coil-sandbox")
        progress(f"started kube-apiserver (pid {proc['pid']}, {url} in netns {fabric}; "
                 f"etcd {sb.etcd_endpoint}, prefix /registry)")
        nodes = [(n["name"], n["address"]) for n in st.nodes.values()]
        self._cancel.clear()
        self._outcome = {}
        self._thread = threading.Thread(target=self._bring_up, name="kube-bring-up",
                                        args=(sb, dict(k), proc, nodes, cfg.etcd_prefix),
                                        daemon=True)
        self._thread.start()

    def _bring_up(self, sb, k: dict, proc, nodes, etcd_prefix):
        """Background: no writes to the sandbox's state here (up's thread
        owns it); results go to self._outcome."""
        out = self._outcome
        try:
            t0 = time.monotonic()
            out["ready_after"] = wait_ready(
                lambda: self.call(sb, readyz, k["url"], k["admin_token"], 1.0),
                proc.alive, proc["log"], timeout=90, cancel=self._cancel)
            api = api_client(k["url"], k["ca"], k["admin_token"])
            from kubernetes import client
            core = client.CoreV1Api(api)

            def register():
                for name, address in nodes:
                    body = {"apiVersion": "v1", "kind": "Node",
                            "metadata": {"name": name,
                                         "labels": {"kubernetes.io/hostname": name,
                                                    "coil.sandbox/node": "true"}},
                            "status": {"addresses": [{"type": "InternalIP", "address": address},
                                                     {"type": "Hostname", "address": name}]}}
                    try:
                        core.create_node(body, _request_timeout=(3, 10))
                    except client.exceptions.ApiException as exc:
                        if exc.status != 409:
                            raise
            self.call(sb, register)
            out["nodes"] = [n for n, _ in nodes]
            objs = load_manifests(RBAC_MANIFEST)

            def sa_token():
                apply(api, objs)
                return service_account_token(core, *CONTROLLER_SA, seconds=TOKEN_SECONDS)
            token = self.call(sb, sa_token)
            out["credentials"] = (f"ServiceAccount {'/'.join(CONTROLLER_SA)} "
                                  "(TokenRequest; RBAC of deploy/rbac.yaml)")
            write_kubeconfig(k["controller_kubeconfig"], k["url"], k["ca"], token, "coil-sandbox")
            out["seconds"] = time.monotonic() - t0
        except BaseException as exc:   # noqa: BLE001 - reported by on_ready
            out["error"] = exc

    def on_nodes_ready(self, sb):
        """Before the pods: stop at once if kube-apiserver already failed."""
        err = self._outcome.get("error")
        if isinstance(err, SandboxError):
            raise err

    def on_ready(self, sb):
        st = sb.state
        k = self.info(sb)
        cfg = sb.config
        progress = getattr(sb, "progress", None) or Progress(quiet=True)
        if self._thread is not None:
            self._thread.join(120)
            if self._thread.is_alive():
                self._cancel.set()
                raise KubeError("kube-apiserver bring-up did not finish within 120 s")
            self._thread = None
        err = self._outcome.get("error")
        if err is not None:
            if isinstance(err, SandboxError):
                raise err
            from coil import k8s
            raise KubeError(f"Kubernetes bring-up failed: {k8s.describe(err)}") from err
        o = self._outcome
        k["controller_credentials"] = o["credentials"]
        st.save()
        progress(f"kube-apiserver ready {o['ready_after']:.1f}s after start; "
                 f"{len(o['nodes'])} Node objects registered ({', '.join(o['nodes'])}); "
                 f"coil-controller credentials: {o['credentials']}")
        log = os.path.join(k["dir"], "coil-controller.log")
        proc = sb.spawn("coil-controller", None, k["netns"], [
            sys.executable, "-m", "coil", "coil-controller",
            "--etcd-endpoints", sb.etcd_endpoint, "--etcd-prefix", cfg.etcd_prefix,
            "--kubeconfig", k["controller_kubeconfig"],
            "--metrics-addr", k["controller_metrics"],
            "--scan-interval", cfg.controller_scan_interval,
            "--node-grace-period", cfg.controller_node_grace],
            log, env={"PYTHONUNBUFFERED": "1"}, cwd=k["dir"])
        url = f"http://{k['controller_metrics']}/readyz"
        waited = wait_ready(lambda: self.call(sb, http_get, url, 1.0)[0] == 200,
                            proc.alive, log, timeout=60, what="coil-controller")
        progress(f"coil-controller ready after {waited:.1f}s (pid {proc['pid']}, watching "
                 f"Nodes; metrics http://{k['controller_metrics']} in netns {k['netns']})")

    # -- status / down -----------------------------------------------------------
    def on_status(self, sb, data: dict):
        k = sb.state.data.get("kubernetes")
        if not k:
            return
        api = sb.state.process("kube-apiserver", None)
        ctl = sb.state.process("coil-controller", None)
        entry = {"url": k["url"], "netns": k["netns"],
                 "apiserver": {"pid": api and api["pid"], "running": bool(api and api.alive()),
                               "log": api and api["log"]},
                 "controller": {"pid": ctl and ctl["pid"], "running": bool(ctl and ctl.alive()),
                                "log": ctl and ctl["log"], "metrics": k["controller_metrics"],
                                "credentials": k.get("controller_credentials")},
                 "admin_kubeconfig": k["admin_kubeconfig"], "nodes": [],
                 "removed": k.get("removed", {})}
        if entry["apiserver"]["running"]:
            try:
                entry["nodes"] = self.node_names(sb)
            except Exception as exc:      # noqa: BLE001 - show the rest
                from coil import k8s
                entry["error"] = k8s.describe(exc)
        data["kubernetes"] = entry

    def on_down(self, sb):
        self._cancel.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.close()


# -- node-rm ------------------------------------------------------------------

def node_rm(sb, name: str, progress=None, timeout: float = 120.0) -> dict:
    """Take ``name`` away as a dead machine goes, then delete its Node and
    show coil-controller freeing its blocks:

    1. the node's coild and BIRD are stopped (BIRD's shutdown closes its
       BGP sessions, so the other nodes withdraw its routes at once), its
       pods' namespaces and its own namespace are deleted (no CNI DEL: a
       dead machine does not run one);
    2. its Node object is deleted through the API;
    3. wait (bounded by ``timeout``) until coil-controller has freed the
       node's blocks in etcd, with the addresses in them: once the Node has
       been gone for the controller's grace period (1m here) and the
       node's liveness lease (5 s here) has lapsed;
    4. wait until no other node routes those blocks any more (kernel main
       table and BIRD's table);
    5. the other nodes' BIRD configurations drop the peer (``birdc
       configure``), so their sessions are all Established again.

    Raises SandboxError naming what did not happen in time."""
    progress = progress or Progress(quiet=True)
    t0 = time.monotonic()
    with sb.state.locked() as st:
        if st is None or not st.data.get("nodes"):
            raise SandboxError(f"no sandbox in {sb.dir} (run 'hypercoil sandbox up --kubernetes')")
        k = KubernetesPart.info(sb)
        if name in k.get("removed", {}):
            raise SandboxError(f"node {name} was removed already")
        n = sb.node(name)
        for role in ("kube-apiserver", "coil-controller"):
            p = st.process(role, None)
            if p is None or not p.alive():
                raise KubeError(f"{role} is not running"
                                + (f"; its log {p['log']}" if p else "")
                                + " (run 'down' and 'up --kubernetes' again)")
        part = sb.kube
        store = sb.store()
        blocks = sorted(store.node_blocks(name), key=lambda b: (b.pool, b.cidr))
        cidrs = [b.cidr for b in blocks]
        in_blocks = set(cidrs)
        addresses = sum(1 for a in store.all_addresses()[0] if a.block in in_blocks)
        pods = [p for p in st.pods if p["node"] == name]

        # 1. the machine goes away
        sb.stop_process("bird", name)
        sb.stop_process("coild", name)
        gone = [p["netns"] for p in pods] + [n["netns"]]
        present = [ns for ns in gone if netns_exists(ns)]
        if present:
            ip_batch([f"netns del {ns}" for ns in present], check=False)
        st.data["pods"] = [p for p in st.pods if p["node"] != name]
        st.forget_namespaces(gone)
        del st.nodes[name]
        k.setdefault("removed", {})[name] = {"at": time.time(), "blocks": cidrs,
                                             "pods": [p["name"] for p in pods]}
        st.save()
        progress(f"{name} is gone: coild and BIRD stopped, {len(pods)} pods and namespace "
                 f"{n['netns']} deleted; it held {len(blocks)} block(s) "
                 f"{', '.join(cidrs) or '-'} with {addresses} address(es)")

        # 2. the Node object
        core = part.core(sb)

        def delete():
            from kubernetes import client
            try:
                core.delete_node(name, _request_timeout=(3, 10))
                return True
            except client.exceptions.ApiException as exc:
                if exc.status == 404:
                    return False
                raise
        try:
            existed = part.call(sb, delete)
        except SandboxError:
            raise
        except Exception as exc:       # noqa: BLE001
            from coil import k8s
            raise KubeError(f"deleting Node {name}: {k8s.describe(exc)}") from None
        t_del = time.monotonic()
        progress(f"Node {name} deleted through the Kubernetes API ({k['url']})" if existed else
                 f"Node {name} did not exist in the API any more")

        # 3. coil-controller frees the blocks in etcd
        deadline = t_del + timeout
        while True:
            left = store.node_blocks(name)
            if not left:
                break
            if time.monotonic() >= deadline:
                ctl = st.process("coil-controller", None)
                raise SandboxError(
                    f"coil-controller did not free the blocks of {name} within {timeout:g}s "
                    f"(still in etcd: {', '.join(b.cidr for b in left)}); its log "
                    f"{ctl['log']}:\n{tail(ctl['log'])}")
            time.sleep(0.1)
        freed_after = time.monotonic() - t_del
        held = {a.block for a in store.all_addresses()[0]}
        stale = [c for c in cidrs if c in held]
        if stale:
            raise SandboxError(f"blocks of {name} freed but addresses remain in {stale}")
        progress(f"coil-controller freed the {len(cidrs)} block(s) of {name} in etcd "
                 f"{freed_after:.1f}s after the Node was deleted"
                 + (f" ({', '.join(cidrs)}, {addresses} address(es))" if cidrs else "")
                 + f"; coilctl node blocks {name}: nothing")

        # 4. the other nodes' BGP routes
        others = sb.node_names()
        want = set(cidrs)

        def still_routed() -> dict[str, list[str]]:
            left = {}
            for other in others:
                kernel = {r["dst"] for r in sb.bird_routes(other)}
                try:
                    from coil.sandbox import bird
                    in_bird = set(bird.routes(sb.node(other)["bird_ctl"]))
                except Exception:      # noqa: BLE001 - the kernel table decides then
                    in_bird = set()
                hit = sorted((kernel | in_bird) & want)
                if hit:
                    left[other] = hit
            return left
        deadline = time.monotonic() + timeout
        while True:
            left = still_routed() if want else {}
            if not left:
                break
            if time.monotonic() >= deadline:
                raise SandboxError(f"routes to the blocks of {name} still present after "
                                   f"{timeout:g}s: {left}")
            time.sleep(0.1)
        if want and others:
            progress(f"{', '.join(others)}: no BGP route left to {', '.join(cidrs)} (kernel main "
                     f"table and birdc show route; withdrawn when {name}'s BIRD closed its "
                     "sessions)")

        # 5. the others stop calling the dead peer
        for other in others:
            sb.write_bird_config(sb.node(other))
        failed = []
        from coil.sandbox import bird
        for other in others:
            try:
                bird.configure(sb.node(other)["bird_ctl"])
            except bird.BirdError as exc:
                failed.append(f"{other}: {exc}")
        if failed:
            raise SandboxError(f"birdc configure failed: {'; '.join(failed)}")
        if others:
            progress(f"BIRD on {', '.join(others)}: peer {name} removed from the configuration "
                     "(birdc configure)")
        return {"node": name, "blocks": cidrs, "addresses": addresses, "pods": len(pods),
                "freed_after": round(freed_after, 2), "seconds": round(time.monotonic() - t0, 2),
                "remaining": others}
