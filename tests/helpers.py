"""Small helpers shared by tests and benchmarks (no fixtures here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


_GIVEN_PORTS: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a server a test
    starts later.

    The port is drawn outside the kernel's ephemeral range: a port from
    ``bind(("127.0.0.1", 0))`` is an ephemeral one, and between this check
    and the server's own bind any outgoing connection of the machine (a
    gRPC client of another member, say) may get it as its local port, and
    the server then fails with "address already in use". A port handed out
    once is not handed out again in this process.
    """
    import random
    low, high = _ephemeral_range()
    # below 10000 sit the well-known services a machine may run
    candidates = [(10000, low - 1)] if low > 11000 else []
    if high < 64535:
        candidates.append((high + 1, 65535))
    if not candidates:                          # no room outside the range
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = random.randint(*random.choice(candidates))
        if port in _GIVEN_PORTS:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError("no free TCP port on 127.0.0.1 outside the ephemeral range")


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


@contextlib.contextmanager
def started_in_tmpdir(prefix: str, make, close: str = "stop"):
    """Make a server in a fresh temporary directory (``make(dir)``), start it,
    yield it; stop it (by PID, through its ``close`` method) and remove the
    directory afterwards, also when starting it failed."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    server = make(tmp)
    try:
        server.start()
        yield server
    finally:
        getattr(server, close)()
        shutil.rmtree(tmp, ignore_errors=True)


def etcd_in_tmpdir(prefix: str = "coil-etcd-"):
    """``started_in_tmpdir`` for one etcd member."""
    return started_in_tmpdir(prefix, lambda tmp: EtcdServer(os.path.join(tmp, "data")))


@contextlib.contextmanager
def auth_etcd_in_tmpdir(prefix: str = "coil-etcd-auth-"):
    """One etcd member with authentication enabled: user ``root``, password
    ``rootpw``."""
    with etcd_in_tmpdir(prefix) as server:
        env = dict(os.environ, ETCDCTL_API="3")
        for cmd in (["user", "add", "root:rootpw"], ["auth", "enable"]):
            r = subprocess.run(["etcdctl", "--endpoints", server.endpoint, *cmd],
                               capture_output=True, text=True, env=env, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"etcdctl {' '.join(cmd)} failed: {r.stderr.strip()}")
        yield server


def _first_call_raises(monkeypatch, obj, name, error: Exception, commit: bool):
    """Make obj.name raise ``error`` once: after really doing it
    (commit=True) or without doing it. Returns the list of the failed
    call's arguments."""
    real = getattr(obj, name)
    calls = []

    def wrapped(*args, **kwargs):
        if calls:
            return real(*args, **kwargs)
        calls.append(args)
        if commit:
            real(*args, **kwargs)
        raise error

    monkeypatch.setattr(obj, name, wrapped)
    return calls


def fail_once(monkeypatch, obj, name, commit: bool):
    """Make obj.name raise OutcomeUnknown once: after really doing it
    (commit=True) or without doing it. Returns the list of the failed
    call's arguments."""
    from coil.errors import OutcomeUnknown
    return _first_call_raises(monkeypatch, obj, name, OutcomeUnknown(
        "etcd did not confirm the transaction (injected)"), commit)


def unreachable_once(monkeypatch, obj, name):
    """Make obj.name raise StoreUnavailable once, without doing it."""
    from coil.errors import StoreUnavailable
    return _first_call_raises(monkeypatch, obj, name,
                              StoreUnavailable("cannot reach etcd (injected)"), False)


def hold_first_call(monkeypatch, obj, name):
    """Hold the first call of ``obj.name`` in flight (a pause point inside
    it) until the test lets it go, so that the next callers queue or race
    behind it. Returns (entered, go): events set when it is reached, and
    by the test to let it run."""
    import threading
    entered, go = threading.Event(), threading.Event()
    real = getattr(obj, name)

    def held(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            assert go.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, held)
    return entered, go


def hold_back_first_address_write(monkeypatch, etcd):
    """Hold the first transaction that writes an address record (``ip/``
    key) as a frozen etcd member would: it is not sent, and its caller gets
    OutcomeUnknown. Returns (held, send): ``held`` gets the transaction's
    (compares, success, failure); ``send(*held[0])`` sends it for real, late."""
    from coil.errors import OutcomeUnknown
    send, held = etcd.txn, []

    def txn(compares, success, failure=()):
        if not held and any(op[0] == "put" and op[1].startswith("ip/") for op in success):
            held.append((compares, success, failure))
            raise OutcomeUnknown("etcd did not confirm the transaction (injected)")
        return send(compares, success, failure)
    monkeypatch.setattr(etcd, "txn", txn)
    return held, send


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
    """Skip (a failure under COIL_STRICT=1) unless root and the daemons that
    a sandbox needs are here (it drives plugins with its own CNI executor)."""
    import pytest
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    for tool in ("etcd", "etcdctl", "bird", "birdc", "ping", "ip", *extra_tools):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.skip(f"needs {tool}")


class FakeClock:
    """A clock that moves only when told to (``clock()`` -> seconds)."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float):
        self.now += seconds


class EtcdCluster:
    """A real 3-member (or ``size``-member) etcd cluster on loopback ports.

    Each member also listens on a UNIX socket (``unix_endpoints``), which a
    coild inside a node's network namespace can reach. Members are started
    and stopped by PID; ``close()`` stops every one of them. With ``tls``
    ({"ca", "cert", "key", "client_cert", "client_key"} file paths) clients
    speak https and must show a certificate signed by the CA.
    """

    def __init__(self, base_dir: str, size: int = 3, host: str = "127.0.0.1",
                 tls: dict | None = None):
        self.base_dir = base_dir
        self.host = host
        self.tls = tls
        self.names = [f"m{i}" for i in range(size)]
        self.client_ports = [free_port() for _ in self.names]
        self.peer_ports = [free_port() for _ in self.names]
        self.procs: list = [None] * size
        self.logs: list = [None] * size
        self.token = f"coiltest-{os.getpid()}-{free_port()}"

    def __len__(self):
        return len(self.names)

    def data_dir(self, i: int) -> str:
        return os.path.join(self.base_dir, self.names[i])

    def endpoint(self, i: int) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.client_ports[i]}"

    def _tls_args(self) -> list[str]:
        if not self.tls:
            return []
        return ["--cert-file", self.tls["cert"], "--key-file", self.tls["key"],
                "--trusted-ca-file", self.tls["ca"], "--client-cert-auth"]

    def _etcdctl_tls(self) -> list[str]:
        if not self.tls:
            return []
        return ["--cacert", self.tls["ca"], "--cert", self.tls["client_cert"],
                "--key", self.tls["client_key"]]

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint(i) for i in range(len(self))]

    def unix_endpoint(self, i: int) -> str:
        return f"unix://{self.data_dir(i)}.sock:0"

    @property
    def unix_endpoints(self) -> list[str]:
        return [self.unix_endpoint(i) for i in range(len(self))]

    def _cmd(self, i: int, state: str, extra=()) -> list[str]:
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        initial = ",".join(f"{n}=http://{self.host}:{p}" for n, p in zip(self.names,
                                                                         self.peer_ports))
        return [exe, "--name", self.names[i], "--data-dir", self.data_dir(i),
                "--listen-client-urls",
                f"{self.endpoint(i)},unix://{os.path.basename(self.data_dir(i))}.sock:0",
                "--advertise-client-urls", self.endpoint(i),
                "--listen-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://{self.host}:{self.peer_ports[i]}",
                "--initial-cluster", initial, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token,
                "--log-level", "error", "--logger", "zap", *self._tls_args(), *extra]

    def start_member(self, i: int, state: str = "new", extra=()):
        if self.procs[i] is not None and self.procs[i].poll() is None:
            return
        if self.logs[i] is None:
            self.logs[i] = open(self.data_dir(i) + ".log", "ab")
        try:                    # left behind by a SIGKILLed member: etcd would not bind
            os.unlink(self.data_dir(i) + ".sock:0")
        except FileNotFoundError:
            pass
        self.procs[i] = subprocess.Popen(self._cmd(i, state, extra), stdout=self.logs[i],
                                         stderr=self.logs[i], cwd=self.base_dir,
                                         env=dict(os.environ, ETCD_UNSUPPORTED_ARCH="amd64"))

    def start(self, extra=()):
        try:
            for i in range(len(self)):
                self.start_member(i, extra=extra)
            self.wait_healthy(range(len(self)))
        except BaseException:
            self.close()
            raise
        return self

    def stop_member(self, i: int, sig=None):
        """Stop member ``i`` by PID (SIGTERM, or ``sig``, e.g. SIGKILL)."""
        proc, self.procs[i] = self.procs[i], None
        if proc is None:
            return
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        stop_process(proc, 10)

    def restart_member(self, i: int):
        self.start_member(i, state="existing")
        self.wait_healthy([i])

    def alive(self, i: int) -> bool:
        return self.procs[i] is not None and self.procs[i].poll() is None

    def member_healthy(self, i: int) -> bool:
        import ssl
        import urllib.request
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls["ca"])
            context.load_cert_chain(self.tls["client_cert"], self.tls["client_key"])
        try:
            with urllib.request.urlopen(f"{self.endpoint(i)}/health", timeout=1,
                                        context=context) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def wait_healthy(self, members, timeout: float = 30):
        members = list(members)
        deadline = time.monotonic() + timeout
        while True:
            for i in members:
                if self.procs[i] is None or self.procs[i].poll() is not None:
                    # the log's tail goes into the error: the fixture's
                    # temporary directory, and the log with it, is removed
                    try:
                        with open(self.data_dir(i) + ".log", "rb") as f:
                            tail = f.read()[-2000:].decode("utf-8", "replace")
                    except OSError as exc:
                        tail = f"(no log: {exc})"
                    raise RuntimeError(f"etcd member {self.names[i]} exited; the end of "
                                       f"{self.data_dir(i)}.log:\n{tail}")
            if all(self.member_healthy(i) for i in members):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd members {members} not healthy within {timeout}s")
            time.sleep(0.1)

    def status(self) -> dict:
        """``etcdctl endpoint status`` of the running members: index -> dict
        with ``member_id``, ``leader``, ``raft_term``."""
        import json
        live = [i for i in range(len(self)) if self.alive(i)]
        if not live:
            return {}
        r = subprocess.run(["etcdctl", *self._etcdctl_tls(),
                            "--endpoints", ",".join(self.endpoint(i) for i in live),
                            "endpoint", "status", "-w", "json"], capture_output=True, text=True,
                           env=dict(os.environ, ETCDCTL_API="3"), timeout=30)
        out = {}
        for row in json.loads(r.stdout or "[]"):
            i = self.endpoints.index(row["Endpoint"])
            st = row["Status"]
            out[i] = {"member_id": st["header"]["member_id"], "leader": st.get("leader", 0),
                      "raft_term": st.get("raftTerm", st.get("raft_term"))}
        return out

    def leader(self) -> int | None:
        """Index of the current leader, as the running members see it."""
        for i, st in self.status().items():
            if st["member_id"] == st["leader"]:
                return i
        return None

    def etcdctl(self, *args, user: str | None = None, check=True):
        cmd = ["etcdctl", *self._etcdctl_tls(),
               "--endpoints", ",".join(self.endpoint(i) for i in range(len(self))
                                       if self.alive(i))]
        if user:
            cmd += ["--user", user]
        r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, ETCDCTL_API="3"))
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def close(self):
        for i in range(len(self)):
            self.stop_member(i)
        for f in self.logs:
            if f is not None:
                f.close()
        self.logs = [None] * len(self)
