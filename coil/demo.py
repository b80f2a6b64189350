"""``python -m coil.demo``: a short scripted tour of coil's address management.

Starts a throw-away etcd (temporary data directory, free loopback ports),
creates pools with ``coilctl``, lets three simulated nodes take address
blocks and give addresses to pods through ``IPAMStore`` (what coild does on
every node), and shows the result with ``coilctl``. etcd is always stopped
(by its process id) and its data removed. Exits non-zero on any failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

PREFIX = "/coil/"
NODES = ("node-1", "node-2", "node-3")


class DemoFailed(Exception):
    pass


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say()
    say(f"==> {text}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThrowawayEtcd:
    """One etcd member on loopback, data in a temporary directory."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="coil-demo-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.proc = None

    def start(self, timeout: float = 20.0) -> None:
        exe = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(exe):
            raise DemoFailed("etcd is not installed (Debian: apt-get install etcd-server)")
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [exe, "--name", "demo", "--data-dir", os.path.join(self.tmp, "data"),
               "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"demo={peer}", "--log-level", "error", "--logger", "zap"]
        self.log = open(os.path.join(self.tmp, "etcd.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, ETCD_UNSUPPORTED_ARCH="amd64"))
        from coil.config import EtcdConfig
        from coil.errors import StoreUnavailable
        from coil.store.etcd import Etcd
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DemoFailed(f"etcd exited with code {self.proc.returncode}: "
                                 f"{self.log_tail()}")
            try:
                client = Etcd(EtcdConfig(endpoints=(self.endpoint,), prefix=PREFIX, timeout=1.0))
                try:
                    client.get("ready-check")
                    return
                finally:
                    client.close()
            except StoreUnavailable:
                if time.time() > deadline:
                    raise DemoFailed(f"etcd did not answer within {timeout:g}s") from None
                time.sleep(0.1)

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.tmp, "etcd.log"), "rb") as f:
                return " ".join(f.read()[-400:].decode(errors="replace").split())
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def coilctl(endpoint: str, *args: str, expect_failure: bool = False) -> str:
    """Run ``hypercoil coilctl ARGS`` against the demo etcd, print and return its output."""
    shown = " ".join(shlex.quote(a) for a in args)
    say(f"$ coilctl {shown}")
    r = subprocess.run([sys.executable, "-m", "coil", "coilctl", "--etcd-endpoints", endpoint,
                        "--etcd-prefix", PREFIX, *args], capture_output=True, text=True,
                       timeout=60)
    for line in (r.stdout + r.stderr).rstrip("\n").splitlines():
        say(f"  {line}")
    if expect_failure:
        if r.returncode == 0:
            raise DemoFailed(f"coilctl {shown} should have been rejected")
    elif r.returncode != 0:
        raise DemoFailed(f"coilctl {shown} failed with exit code {r.returncode}")
    return r.stdout


def simulate_nodes(store) -> None:
    """What coild does: take a block when needed, record one address per pod."""
    pods = {
        "node-1": [("default", "web-0"), ("default", "web-1"), ("global", "lb-0")],
        "node-2": [("default", "db-0"), ("global", "lb-1")],
        "node-3": [("kube-system", "dns-0"), ("default", "web-2"), ("default", "web-3")],
    }
    for node in NODES:
        step(f"{node}: address blocks and pod addresses (IPAMStore, as coild does it)")
        held = {}     # (pool, version) -> [Block, next free offset]
        for n, (namespace, pod) in enumerate(pods[node]):
            pool = store.pool_for_namespace(namespace)
            versions = sorted({s.version for s in pool.subnets})
            for version in versions:
                entry = held.get((pool.name, version))
                if entry is None or entry[1] >= entry[0].size:
                    block = store.acquire_block(pool.name, node, version=version)
                    say(f"  took block {block.cidr} of pool {pool.name!r}")
                    entry = held[(pool.name, version)] = [block, 0]
                block, offset = entry
                container_id = f"{node}-{pod}-{n:04d}"
                addr = store.assign_address(block, offset, namespace, pod, container_id)
                if addr is None:
                    raise DemoFailed(f"offset {offset} of fresh block {block.cidr} is taken")
                entry[1] += 1
                say(f"  pod {namespace}/{pod}: {addr.address} (block {block.cidr})")


def run(etcd: ThrowawayEtcd) -> None:
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd

    ep = etcd.endpoint
    step("address pools (coilctl)")
    coilctl(ep, "pool", "create", "default", "10.100.0.0/16", "5")
    coilctl(ep, "pool", "create", "global", "192.168.100.0/24", "3")
    coilctl(ep, "pool", "add-subnet", "global", "fd00:100::/112")
    coilctl(ep, "pool", "list")

    step("bad input is rejected with one line and changes nothing")
    coilctl(ep, "pool", "add-subnet", "global", "10.100.128.0/20", expect_failure=True)
    coilctl(ep, "pool", "create", "team-a", "10.200.0.1/24", "5", expect_failure=True)

    store = IPAMStore(Etcd(EtcdConfig(endpoints=(ep,), prefix=PREFIX)))
    try:
        simulate_nodes(store)
        step("node-3's pod web-3 is deleted: its address is released")
        for a in store.all_addresses()[0]:
            if a.pod == "web-3":
                if not store.release_address(a.block, a.offset, a.revision):
                    raise DemoFailed(f"could not release {a.address}")
                say(f"  released {a.address}")
    finally:
        store.close()

    step("what coilctl shows")
    coilctl(ep, "pool", "show", "default")
    coilctl(ep, "pool", "show", "global")
    for node in NODES:
        coilctl(ep, "node", "blocks", node)
    coilctl(ep, "address", "info", "10.100.0.0")
    coilctl(ep, "-o", "json", "address", "info", "fd00:100::")


def main(argv: list[str] | None = None) -> int:
    etcd = ThrowawayEtcd()
    try:
        step(f"starting a throw-away etcd at {etcd.endpoint} (data in {etcd.tmp})")
        etcd.start()
        say("  etcd is ready")
        run(etcd)
        step("done")
        return 0
    except KeyboardInterrupt:
        say("demo: interrupted")
        return 130
    except Exception as exc:  # one line, like every coil program
        from coil.errors import CoilError
        text = exc.one_line() if isinstance(exc, CoilError) else str(exc)
        sys.stderr.write(f"demo: error: {text}\n")
        return 1
    finally:
        etcd.stop()
        say(f"  stopped etcd and removed {etcd.tmp}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
