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

The recipe (command line, credentials, readiness, kubeconfig, TokenRequest,
applying manifests) is coil.sandbox.kube's, the same that ``hypercoil
sandbox up --kubernetes`` uses; only the process handling is here.

It is stopped by PID at the end of the session, also when tests fail.
Helpers: ``kubeconfig(token)``, ``api(token)`` (a kubernetes ApiClient),
``restart()``, ``service_account_token(namespace, name)``, ``apply(objs)``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from coil.sandbox import kube as recipe
from helpers import REPO, EtcdServer, free_port, started_in_tmpdir, stop_process

BUILD_SCRIPT = os.path.join(REPO, "tools", "build-kube-apiserver.sh")
DEFAULT_BINARY = recipe.DEFAULT_BINARY
ADMIN_TOKEN = "coiltest-admin-token"


def apiserver_binary() -> str:
    """The kube-apiserver binary; builds it (once, minutes) when missing."""
    path = recipe.find_binary()
    if path:
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

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> str:
        """The self-signed serving certificate and its CA (made at first start;
        valid for 127.0.0.1)."""
        return recipe.ca_file(self.workdir)

    # -- lifecycle --------------------------------------------------------------
    def start(self, timeout: float = 60):
        if self.etcd.proc is None:
            self.etcd.start()
        creds = recipe.make_credentials(self.workdir, ADMIN_TOKEN)
        cmd = recipe.apiserver_argv(self.binary, etcd_servers=self.etcd.endpoint,
                                    workdir=self.workdir, port=self.port, creds=creds)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL, cwd=self.workdir)
        try:
            recipe.wait_ready(self.ready, lambda: self.proc.poll() is None, self.log_path,
                              timeout=timeout)
        except recipe.KubeError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None
        return self

    def tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        return recipe.readyz(self.url, ADMIN_TOKEN)

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
        if path is None:
            fd, path = tempfile.mkstemp(prefix="kubeconfig-", suffix=".yaml", dir=self.workdir)
            os.close(fd)
        return recipe.write_kubeconfig(path, self.url, self.ca_file, token or ADMIN_TOKEN,
                                       name="test")

    def api(self, token: str | None = None):
        """A kubernetes ApiClient for ``token`` (default: admin)."""
        return recipe.api_client(self.url, self.ca_file, token or ADMIN_TOKEN)

    def core(self, token: str | None = None):
        from kubernetes import client
        return client.CoreV1Api(self.api(token))

    def service_account_token(self, namespace: str, name: str, seconds: int = 3600) -> str:
        """Mint a token for a ServiceAccount with the TokenRequest API."""
        return recipe.service_account_token(self.core(), namespace, name, seconds)

    def apply(self, objects: list[dict]):
        """Create (or replace) plain manifest dicts with the admin client."""
        return recipe.apply(self.api(), objects)


@pytest.fixture(scope="session")
def kube_apiserver():
    """A running kube-apiserver 1.20 with its own etcd, for the whole session."""
    binary = apiserver_binary()
    with started_in_tmpdir("coil-kube-", lambda workdir: KubeAPIServer(workdir, binary),
                           close="close") as server:
        yield server
