"""Real nodes for integration tests: network namespaces, coild, libcni.

Everything made here is removed by ``close()``/fixture teardown, even on
failure. Nothing touches the root network namespace: a "node" and every
"pod" is a namespace of its own, and coild reaches etcd through its UNIX
socket (a file, so it crosses network namespaces).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNITOOL = os.path.join(REPO, "tests", "cniclient", "cnitool")
REFERENCE_PLUGINS = "/usr/lib/cni"


def run(*cmd, check=True, netns=None, **kw):
    if netns:
        cmd = ("ip", "netns", "exec", netns) + cmd
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


class Netns:
    """A named network namespace with lo up; removed by delete()."""

    def __init__(self, kind: str = "ns"):
        self.name = f"coiltest-{kind}-{uuid.uuid4().hex[:8]}"
        run("ip", "netns", "add", self.name)
        run("ip", "link", "set", "lo", "up", netns=self.name)

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def exec(self, *cmd, check=True, **kw):
        return run(*cmd, netns=self.name, check=check, **kw)

    def delete(self):
        # kill anything still running inside, then remove the namespace
        pids = run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        run("ip", "netns", "delete", self.name, check=False)

    def links(self) -> list[str]:
        """The links in service: those a DEL retired (coild's retired link
        group, deleted by its queue within --teardown-delay) left out."""
        from coil.coild.podnet import RETIRED_GROUP
        return [name for name, group in self._links() if group != str(RETIRED_GROUP)]

    def all_links(self) -> list[str]:
        """Every link, retired ones too."""
        return [name for name, _ in self._links()]

    def _links(self) -> list[tuple[str, str]]:
        out = self.exec("ip", "-o", "link", "show").stdout
        found = []
        for line in out.splitlines():
            words = line.split()
            group = words[words.index("group") + 1] if "group" in words else "default"
            found.append((line.split(":")[1].strip().split("@")[0], group))
        return found

    def routes(self, *args) -> str:
        return self.exec("ip", *args).stdout

    def retired(self) -> list[str]:
        """Links waiting in coild's deletion queue (its retired link group)."""
        from coil.coild.podnet import RETIRED_GROUP
        return [name for name, group in self._links() if group == str(RETIRED_GROUP)]

    def wait_retired_gone(self, timeout: float = 30, poll: float = 0.05) -> None:
        """Wait until coild's deletion queue has deleted every retired link
        (it flushes within --teardown-delay); fails after ``timeout``."""
        deadline = time.time() + timeout
        while self.retired():
            if time.time() > deadline:
                raise AssertionError(f"retired links not deleted: {self.retired()}")
            time.sleep(poll)


class Coild:
    """coild running inside a node namespace, started and stopped by PID."""

    def __init__(self, node: Netns, workdir: str, etcd_endpoint: str, prefix: str,
                 node_name: str = "node1", extra=(), hook_dir: str | None = None):
        self.node = node
        self.workdir = workdir
        self.socket = os.path.join(workdir, "coild.sock")
        self.api_socket = os.path.join(workdir, "coild-api.sock")
        self.etcd_endpoint = etcd_endpoint
        self.prefix = prefix
        self.node_name = node_name
        self.extra = list(extra)
        self.proc = None
        self.log_path = os.path.join(workdir, "coild.log")
        self.http_port = 9383
        self.hook_dir = hook_dir     # run through tests/coild_hooked.py (pause points)

    def start(self, wait=True):
        entry = ([os.path.join(REPO, "tests", "coild_hooked.py"), self.hook_dir]
                 if self.hook_dir else ["-m", "coil", "coild"])
        cmd = ["ip", "netns", "exec", self.node.name, sys.executable, *entry,
               "--etcd-endpoints", self.etcd_endpoint, "--etcd-prefix", self.prefix,
               "--socket", self.socket, "--api-socket", self.api_socket,
               "--http", f"127.0.0.1:{self.http_port}", *self.extra]
        env = dict(os.environ, COIL_NODE_NAME=self.node_name)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=env)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coild exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket)
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"coild did not start:\n{self.log()}")

    def log(self, tail: int | None = 4000) -> str:
        """The end of coild's log (``tail`` characters; None: all of it);
        empty when there is none."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def records(self) -> list[dict]:
        """Every JSON line of coild's log, parsed, oldest first."""
        return [json.loads(line) for line in self.log(None).splitlines() if line.startswith("{")]

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def rest(self, method: str, path: str, body=None, via: str | None = None):
        """Call the REST API; (status, json). POST and DELETE go over the
        root-only API socket (as a local root tool would), the rest over TCP
        inside the node namespace; ``via`` ("tcp" or "unix") forces one."""
        via = via or ("unix" if method in ("POST", "DELETE") else "tcp")
        data = json.dumps(body) if body is not None else ""
        if via == "unix":
            status, text = unix_http(self.api_socket, method, path, data or None)
        else:
            script = ("import http.client,sys;c=http.client.HTTPConnection('127.0.0.1',%d,timeout=10);"
                      "b=sys.argv[3] or None;c.request(sys.argv[1],sys.argv[2],body=b,"
                      "headers={'Content-Type':'application/json'} if b else {});r=c.getresponse();"
                      "print(r.status);print(r.read().decode())" % self.http_port)
            out = self.node.exec(sys.executable, "-c", script, method, path, data).stdout
            status, _, text = out.partition("\n")
            status = int(status)
        if not path.startswith("/metrics"):
            return status, json.loads(text) if text.strip() else None
        return status, text


def unix_http(path: str, method: str, url: str, body: str | bytes | None = None,
              timeout: float = 10) -> tuple[int, str]:
    """One HTTP request over a UNIX socket (what ``curl --unix-socket`` does)."""
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)

    c = Conn("localhost", timeout=timeout)
    try:
        c.request(method, url, body=body,
                  headers={"Content-Type": "application/json"} if body else {})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


class CNI:
    """The libcni client (tests/cniclient/cnitool), run inside a node namespace."""

    def __init__(self, node: Netns, workdir: str, conflist: dict, plugin_path: str):
        self.node = node
        self.workdir = workdir
        self.bin = os.path.join(workdir, "bin")
        os.makedirs(self.bin, exist_ok=True)
        link = os.path.join(self.bin, "coil")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(plugin_path, link)
        self.cache = os.path.join(workdir, "cni-cache")
        self.conf_path = os.path.join(workdir, "net.conflist")
        self.write_conf(conflist)

    def write_conf(self, conflist: dict):
        with open(self.conf_path, "w") as f:
            json.dump(conflist, f)

    def env(self):
        return dict(os.environ, CNI_PATH=f"{self.bin}:{REFERENCE_PLUGINS}",
                    CNI_CACHE_DIR=self.cache)

    def call(self, command: str, pod: Netns | str | None = None, container_id: str = "",
             namespace: str = "default", name: str = "pod", ifname: str = "eth0"):
        netns = pod.path if isinstance(pod, Netns) else (pod or "")
        args = [CNITOOL, command, self.conf_path]
        if command not in ("version", "status"):
            args += [netns, container_id, ifname, namespace, name]
        r = self.node.exec(*args, check=False, env=self.env(), timeout=60)
        try:
            data = json.loads(r.stdout) if r.stdout.strip() else None
        except ValueError:
            data = {"raw": r.stdout, "stderr": r.stderr}
        return r.returncode, data


class CoilNode:
    """A node namespace with its coild (started by ``start``), its CNI client
    and the pod namespaces a test asks for; ``close`` stops coild by PID and
    removes every namespace."""

    def __init__(self, workdir: str, etcd_endpoint: str, prefix: str, **coild_kw):
        self.workdir = workdir
        self.ns = Netns("node")
        self.pods: list[Netns] = []
        self.cni = None
        self.coild = Coild(self.ns, workdir, etcd_endpoint, prefix, **coild_kw)

    def start(self, **conf):
        """Start coild and write a coil conflist with ``conf`` as plugin keys."""
        self.coild.start()
        self.cni = CNI(self.ns, self.workdir, coil_conflist(self.coild.socket, **conf),
                       plugin_binary())
        return self

    def new_pod(self) -> Netns:
        pod = Netns("pod")
        self.pods.append(pod)
        return pod

    def close(self):
        try:
            self.coild.stop()
        finally:
            for pod in self.pods:
                pod.delete()
            self.ns.delete()


def coil_conflist(socket_path: str, chain=(), version="1.0.0", **coil_keys) -> dict:
    plugin = {"type": "coil", "socket": socket_path, **coil_keys}
    return {"cniVersion": version, "name": "coil-test", "plugins": [plugin, *chain]}


def plugin_binary() -> str:
    """What /opt/cni/bin/coil points to: the native launcher, else the Python
    entry point (COIL_PURE_PYTHON=1 forces the latter)."""
    from coil import launcher_path
    native = launcher_path()
    if native and os.environ.get("COIL_PURE_PYTHON", "") in ("", "0"):
        return native
    return os.path.join(os.path.dirname(sys.executable), "hypercoil")
