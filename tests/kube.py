"""A real Kubernetes API server for tests (pytest plugin, see tests/conftest.py).

``kube_apiserver`` (session) starts kube-apiserver 1.20.2, built once by
tools/build-kube-apiserver.sh into /var/cache/coil-kube/ (KUBE_CACHE_DIR), against an etcd of its own,
on a free loopback port, with:

- a static token file: ``admin`` in ``system:masters``;
- a service-account key pair made with ``openssl`` (TokenRequest works: the
  apiserver signs service-account tokens itself, no controller-manager);
- ``--authorization-mode=RBAC``, ``--allow-privileged=true`` (as kubeadm sets it);
- the ServiceAccount admission plugin off (no token controller runs, so
  Pods could not be created otherwise).

It is stopped by PID at the end of the session, also when tests fail.
Helpers: ``kubeconfig(token)``, ``api(token)`` (a kubernetes ApiClient),
``restart()``, ``service_account_token(namespace, name)``, ``apply(objs)``.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request

import pytest

from helpers import REPO, EtcdServer, free_port, stop_process

BUILD_SCRIPT = os.path.join(REPO, "tools", "build-kube-apiserver.sh")
DEFAULT_BINARY = os.path.join(os.environ.get("KUBE_CACHE_DIR", "/var/cache/coil-kube"),
                              "bin", "kube-apiserver")
ADMIN_TOKEN = "coiltest-admin-token"


def apiserver_binary() -> str:
    """The kube-apiserver binary; builds it (once, minutes) when missing."""
    path = os.environ.get("COIL_KUBE_APISERVER") or DEFAULT_BINARY
    if os.access(path, os.X_OK):
        return path
    r = subprocess.run([BUILD_SCRIPT], capture_output=True, text=True, timeout=3600)
    if r.returncode != 0 or not os.access(DEFAULT_BINARY, os.X_OK):
        raise RuntimeError(f"building kube-apiserver failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return DEFAULT_BINARY


class KubeAPIServer:
    def __init__(self, workdir: str, binary: str):
        self.workdir = workdir
        self.binary = binary
        self.port = free_port()
        self.proc = None
        self.etcd = EtcdServer(os.path.join(workdir, "etcd"))
        self.admin_token = ADMIN_TOKEN
        self.log_path = os.path.join(workdir, "kube-apiserver.log")
        # /readyz is polled before the certificate exists: no verification there
        self._ctx = ssl.create_default_context()
        self._ctx.check_hostname = False
        self._ctx.verify_mode = ssl.CERT_NONE

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        """The self-signed serving certificate and its CA (made at first start;
        valid for 127.0.0.1)."""
        return os.path.join(self.workdir, "certs", "apiserver.crt")

    # -- lifecycle --------------------------------------------------------------
    def _keys(self):
        key = os.path.join(self.workdir, "sa.key")
        pub = os.path.join(self.workdir, "sa.pub")
        if not os.path.exists(pub):
            subprocess.run(["openssl", "genrsa", "-out", key, "2048"], check=True,
                           capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", key, "-pubout", "-out", pub], check=True,
                           capture_output=True)
        tokens = os.path.join(self.workdir, "tokens.csv")
        with open(tokens, "w") as f:
            f.write(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')
        return key, pub, tokens

    def start(self, timeout: float = 60):
        if self.etcd.proc is None:
            self.etcd.start()
        key, pub, tokens = self._keys()
        cmd = [self.binary,
               f"--etcd-servers={self.etcd.endpoint}",
               "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
               f"--service-account-key-file={pub}",
               f"--service-account-signing-key-file={key}",
               "--service-cluster-ip-range=10.96.0.0/24",
               f"--secure-port={self.port}",
               "--bind-address=127.0.0.1",
               "--insecure-port=0",
               f"--cert-dir={os.path.join(self.workdir, 'certs')}",
               "--authorization-mode=RBAC",
               f"--token-auth-file={tokens}",
               "--disable-admission-plugins=ServiceAccount",
               "--allow-privileged=true",      # as kubeadm clusters run it
               "--enable-priority-and-fairness=false",
               "--logtostderr=true", "--v=0"]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kube-apiserver exited with {self.proc.returncode}; "
                                   f"see {self.log_path}:\n{self.tail()}")
            if self.ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kube-apiserver not ready within {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        req = urllib.request.Request(f"{self.url}/readyz",
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=2, context=self._ctx) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self):
        """Stop kube-apiserver (by PID); its etcd keeps running."""
        stop_process(self.proc, 20)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def close(self):
        self.stop()
        self.etcd.stop()

    # -- clients ----------------------------------------------------------------
    def kubeconfig(self, token: str | None = None, path: str | None = None) -> str:
        """Write a kubeconfig using ``token`` (default: admin) and return its path."""
        token = token or ADMIN_TOKEN
        if path is None:
            fd, path = tempfile.mkstemp(prefix="kubeconfig-", suffix=".yaml", dir=self.workdir)
            os.close(fd)
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": self.ca_file}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
        }
        with open(path, "w") as f:
            json.dump(doc, f)       # JSON is YAML
        return path

    def api(self, token: str | None = None):
        """A kubernetes ApiClient for ``token`` (default: admin)."""
        from kubernetes import client
        conf = client.Configuration()
        conf.host = self.url
        conf.ssl_ca_cert = self.ca_file
        conf.api_key = {"authorization": f"Bearer {token or ADMIN_TOKEN}"}
        conf.retries = 1
        return client.ApiClient(conf)

    def core(self, token: str | None = None):
        from kubernetes import client
        return client.CoreV1Api(self.api(token))

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """Mint a token for a ServiceAccount with the TokenRequest API."""
        from kubernetes import client
        core = self.core()
        body = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
        resp = core.create_namespaced_service_account_token(name, namespace, body)
        return resp.status.token

    def apply(self, objects: list[dict]):
        """Create (or replace) plain manifest dicts with the admin client."""
        from kubernetes import utils
        api = self.api()
        for obj in objects:
            try:
                utils.create_from_dict(api, obj)
            except utils.FailToCreateError as exc:
                if all(getattr(e, "status", 0) == 409 for e in exc.api_exceptions):
                    continue
                raise
        return api


@pytest.fixture(scope="session")
def kube_apiserver():
    """A running kube-apiserver 1.20 with its own etcd, for the whole session."""
    binary = apiserver_binary()
    workdir = tempfile.mkdtemp(prefix="coil-kube-")
    server = KubeAPIServer(workdir, binary)
    try:
        server.start()
        yield server
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
