"""Small helpers shared by tests and benchmarks (no fixtures here)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            if time.time() >= deadline:
                return False
            time.sleep(0.05)


def stop_process(proc, timeout: float):
    """SIGTERM a process we started, SIGKILL it after ``timeout`` seconds."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def hypercoil(*args, env=None, input=None, check=False, timeout=60):
    """Run ``python -m coil ARGS`` and return the CompletedProcess."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "coil", *args], capture_output=True,
                          text=True, env=full_env, input=input, check=check, timeout=timeout)


class EtcdServer:
    """A real etcd (Debian etcd-server) on free loopback ports."""

    def __init__(self, data_dir: str, netns: str | None = None, host: str = "127.0.0.1"):
        self.data_dir = data_dir
        self.netns = netns
        self.host = host
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def unix_endpoint(self) -> str:
        """The same etcd over a UNIX socket: reachable from any network namespace."""
        return f"unix://{self.data_dir}.sock:0"

    def start(self, extra=()):
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        cmd = [exe, "--name", "coiltest", "--data-dir", self.data_dir,
               "--listen-client-urls",
               f"{self.endpoint},unix://{os.path.basename(self.data_dir)}.sock:0",
               "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", f"http://{self.host}:{self.peer_port}",
               "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_port}",
               "--initial-cluster", f"coiltest=http://{self.host}:{self.peer_port}",
               "--log-level", "error", "--logger", "zap", *extra]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        self.log = open(os.path.join(self.data_dir + ".log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     cwd=os.path.dirname(self.data_dir),
                                     env=dict(os.environ, ETCD_UNSUPPORTED_ARCH="amd64"))
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log.name}")
            if self.netns is None and self.healthy():
                break
            if self.netns is not None:
                r = subprocess.run(["ip", "netns", "exec", self.netns, "etcdctl",
                                    "--endpoints", self.endpoint, "endpoint", "health"],
                                   capture_output=True, env=dict(os.environ, ETCDCTL_API="3"))
                if r.returncode == 0:
                    break
            time.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError("etcd did not start within 20 s")
        return self

    def healthy(self) -> bool:
        """etcd answers /health (listening alone is not serving yet)."""
        import urllib.request
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def stop(self):
        stop_process(self.proc, 10)
        self.proc = None


def wait_for(cond, timeout=30.0, interval=0.1, what="condition"):
    """Poll ``cond`` until it returns something true; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def need_sandbox(*extra_tools):
    """Skip (a failure under COIL_STRICT=1) unless root, the daemons and the
    libcni client that a sandbox needs are here."""
    import pytest
    from coil.sandbox.cluster import cnitool_path
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("etcd", "etcdctl", "bird", "birdc", "ping", "ip", *extra_tools):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.skip(f"needs {tool}")
    try:
        cnitool_path()
    except Exception as exc:  # noqa: BLE001 - its message says what is missing
        pytest.skip(str(exc))


class FakeClock:
    """A clock that moves only when told to (``clock()`` -> seconds)."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds
