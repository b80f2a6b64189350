"""A local multi-node coil cluster in network namespaces.

Nothing here touches the root network namespace: the fabric (a Linux bridge)
and every node and pod are network namespaces created by ``up`` and removed
by ``down``; links are created directly inside them (``ip -n NS ...``);
sysctls are set through ``ip netns exec NODE sysctl``, which only affects that
namespace. Processes (etcd in the fabric namespace, coild and BIRD in each
node namespace) are started by ``up``, recorded with PID and start time in
the state directory, and stopped by PID by ``down``.

Topology (defaults)::

    fabric ns   br0 (no address, no uplink: no route to the outside)
                 |-- n1 ==veth== eth0 10.250.0.11/24  node1 ns: coild, BIRD
                 |-- n2 ==veth== eth0 10.250.0.12/24  node2 ns: coild, BIRD
                 ...
    etcd        in the fabric ns, clients use its UNIX socket (a file, so
                every namespace and the root one reach it without a route)
    pods        one ns each, wired to their node by the coil CNI plugin,
                called by the libcni client (tests/cniclient/cnitool)

Extension point: ``Sandbox.extensions`` is a list of objects whose optional
methods are called at fixed points of the lifecycle -- ``on_services(sb)``
(after etcd, coilds and BIRDs were started: start more processes with
``sb.spawn``), ``on_nodes_ready(sb)`` (coilds answer, before pods are made),
``on_ready(sb)`` (the end of ``up``: pods made, routes converged),
``on_status(sb, data)`` (add to the status document) and ``on_down(sb)``
(before processes are stopped). Processes started through ``sb.spawn`` are
recorded and stopped by ``down`` like the built-in ones. ``sb.progress``
prints a progress line during ``up``. With ``Config.kubernetes`` the
Kubernetes part (coil/sandbox/kube.py: kube-apiserver, Node objects,
coil-controller) is one more extension of that sandbox.
"""

from __future__ import annotations

import concurrent.futures as futures
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from coil.errors import CoilError
from coil.sandbox import bird
from coil.sandbox.state import DEFAULT_STATE_DIR, Proc, State, stop_processes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REFERENCE_PLUGINS = "/usr/lib/cni"
ETCD_SOCKET = "etcd.sock:0"
GATEWAY = "169.254.1.1"               # the pods' gateway: coild's host-side veth address        # etcd names UNIX listeners HOST:PORT; the file is this


class SandboxError(CoilError):
    """Something the sandbox could not do; the message says what and where."""


@dataclass
class Config:
    """What ``up`` builds. Every address is private and lives only inside
    the sandbox's namespaces."""
    nodes: int = 3
    pods: int = 3                        # default-namespace pods per node
    global_pods: int = 1                 # pods of namespace "global" (on node1)
    name: str = "coilsb"                 # prefix of every namespace name
    fabric_subnet: str = "10.250.0.0/24"
    default_subnet: str = "10.100.0.0/16"
    block_size: int = 5                  # 2^5 = 32 addresses per block
    global_subnet: str = "10.200.0.0/24"
    global_block_size: int = 3
    asn: int = bird.DEFAULT_ASN
    etcd_prefix: str = "/coil/"
    parallel: int = 0                    # concurrent CNI ADDs (0: automatic)
    coild_scan_interval: str = "10m"
    kubernetes: bool = False             # kube-apiserver, Node objects, coil-controller
    controller_scan_interval: str = "30s"   # coil-controller's leak scan

    def validate(self):
        if not 1 <= self.nodes <= 200:
            raise SandboxError(f"--nodes {self.nodes}: between 1 and 200")
        if not 0 <= self.pods <= 1000:
            raise SandboxError(f"--pods {self.pods}: between 0 and 1000")
        if not self.name.replace("-", "").isalnum() or len(self.name) > 20:
            raise SandboxError(f"--name {self.name!r}: letters, digits and dashes, at most 20")
        nets = {}
        for what in ("fabric_subnet", "default_subnet", "global_subnet"):
            try:
                net = ipaddress.ip_network(getattr(self, what))
            except ValueError as exc:
                raise SandboxError(f"{what}: {exc}") from None
            if net.version != 4 or not net.is_private:
                raise SandboxError(f"{what} {net}: must be a private IPv4 network")
            for other, onet in nets.items():
                if net.overlaps(onet):
                    raise SandboxError(f"{what} {net} overlaps {other} {onet}")
            nets[what] = net
        if nets["fabric_subnet"].num_addresses < self.nodes + 12:
            raise SandboxError(f"fabric_subnet {nets['fabric_subnet']} too small for "
                               f"{self.nodes} nodes")


def node_name(i: int) -> str:
    return f"node{i}"


def tool(name: str, hint: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if not path:
        raise SandboxError(f"{name} not found: {hint}")
    return path


def cnitool_path() -> str:
    path = os.environ.get("COIL_CNITOOL") or os.path.join(REPO, "tests", "cniclient", "cnitool")
    if not os.access(path, os.X_OK):
        raise SandboxError(f"libcni client {path} not found: run 'make build' "
                           "(or set COIL_CNITOOL)")
    return path


def plugin_path() -> str:
    """What the node's CNI bin dir ``coil`` points at: the native launcher,
    else the Python entry point next to this interpreter."""
    from coil import launcher_path
    native = launcher_path()
    if native and os.environ.get("COIL_PURE_PYTHON", "") in ("", "0"):
        return native
    return os.path.join(os.path.dirname(sys.executable), "hypercoil")


def run(*cmd, check=True, timeout=30, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise SandboxError(f"{' '.join(cmd)}: timed out after {timeout}s") from None
    if check and r.returncode != 0:
        raise SandboxError(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
    return r


def ip_batch(lines: list[str], check=True) -> subprocess.CompletedProcess:
    """Run ``ip -batch -`` (one process for many commands). With ``-force``
    when check is False, so one failing line does not stop the rest."""
    args = ["ip", "-batch", "-"] if check else ["ip", "-force", "-batch", "-"]
    r = subprocess.run(args, input="\n".join(lines) + "\n", capture_output=True, text=True,
                       timeout=120)
    if check and r.returncode != 0:
        raise SandboxError(f"ip -batch: {r.stderr.strip()}")
    return r


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


class Progress:
    """Prints "[  1.2s] message" lines (or nothing when quiet)."""

    def __init__(self, out=None, quiet=False):
        self.t0 = time.monotonic()
        self.out = out or sys.stdout
        self.quiet = quiet

    def __call__(self, msg: str):
        if not self.quiet:
            self.out.write(f"[{time.monotonic() - self.t0:5.1f}s] {msg}\n")
            self.out.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Sandbox:
    """One sandbox, described by its state directory."""

    extensions: list = []

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR):
        self.state = State(state_dir)
        self._children: dict[int, subprocess.Popen] = {}
        self._store = None
        self.phases: dict[str, float] = {}      # seconds per phase of the last up
        self.progress = Progress(quiet=True)    # progress lines of the running up
        self._kube = None

    def _extensions(self) -> list:
        """The global extensions, plus the Kubernetes part when this
        sandbox was made with it."""
        exts = list(self.extensions)
        if self.state.data.get("config", {}).get("kubernetes"):
            exts.append(self.kube)
        return exts

    @property
    def kube(self):
        """The Kubernetes part of this sandbox (coil.sandbox.kube)."""
        if self._kube is None:
            from coil.sandbox.kube import KubernetesPart
            self._kube = KubernetesPart()
        return self._kube

    # -- basic facts -------------------------------------------------------
    @property
    def dir(self) -> str:
        return self.state.dir

    @property
    def config(self) -> Config:
        return Config(**self.state.data.get("config", {}))

    @property
    def etcd_endpoint(self) -> str:
        return f"unix://{self.state.path_of('etcd', ETCD_SOCKET)}"

    def node(self, name: str) -> dict:
        try:
            return self.state.nodes[name]
        except KeyError:
            raise SandboxError(f"no node {name!r} in this sandbox "
                               f"(nodes: {', '.join(self.state.nodes) or 'none'})") from None

    def node_names(self) -> list[str]:
        return list(self.state.nodes)

    def pod(self, name: str) -> dict:
        for p in self.state.pods:
            if p["name"] == name:
                return p
        raise SandboxError(f"no pod {name!r} in this sandbox")

    def node_exec(self, node: str, *cmd, check=True, timeout=30):
        return run("ip", "netns", "exec", self.node(node)["netns"], *cmd, check=check,
                   timeout=timeout)

    def pod_exec(self, pod: str, *cmd, check=True, timeout=30):
        return run("ip", "netns", "exec", self.pod(pod)["netns"], *cmd, check=check,
                   timeout=timeout)

    def store(self):
        """An IPAMStore on the sandbox's etcd (through its UNIX socket)."""
        if self._store is None:
            from coil.config import EtcdConfig
            from coil.store import IPAMStore
            from coil.store.etcd import Etcd
            self._store = IPAMStore(Etcd(EtcdConfig(endpoints=(self.etcd_endpoint,),
                                                    prefix=self.config.etcd_prefix,
                                                    timeout=5.0)))
        return self._store

    def close(self):
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._kube is not None:
            self._kube.close()

    # -- processes ---------------------------------------------------------
    def spawn(self, role: str, node: str | None, netns: str, argv: list[str], log: str,
              env: dict | None = None, cwd: str | None = None) -> Proc:
        """Start ``argv`` inside ``netns`` (``ip netns exec`` execs it, so the
        PID is the program's), detached in its own session, output to
        ``log``; record it in the state at once."""
        with open(log, "ab") as out:
            p = subprocess.Popen(["ip", "netns", "exec", netns, *argv], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                 env=dict(os.environ, **(env or {})), start_new_session=True,
                                 close_fds=True)
        self._children[p.pid] = p
        return self.state.record_process(role, node, p.pid, argv, log)

    def _reap(self, pid: int):
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            del self._children[pid]

    def _wait_for(self, what: str, probe, proc: Proc | None, timeout: float, interval=0.05):
        """Poll ``probe()`` until true; fail early when ``proc`` died."""
        deadline = time.monotonic() + timeout
        while True:
            if probe():
                return
            if proc is not None:
                self._reap(proc["pid"])
                if not proc.alive():
                    raise SandboxError(f"{what} exited during start; its log "
                                       f"{proc['log']}:\n{tail(proc['log'])}")
            if time.monotonic() >= deadline:
                log = f"; its log {proc['log']}:\n{tail(proc['log'])}" if proc else ""
                raise SandboxError(f"{what} not ready within {timeout:g}s{log}")
            time.sleep(interval)

    # -- up ----------------------------------------------------------------
    def up(self, config: Config, progress=None, cleanup_on_failure=True) -> dict:
        """Build the sandbox. On failure everything made so far is removed
        (unless ``cleanup_on_failure`` is False: then ``down`` removes it).
        Raises SandboxError."""
        progress = progress or Progress(quiet=True)
        config.validate()
        self._preflight(config)
        if os.path.isdir(self.dir):
            if State(self.dir).load().data.get("namespaces"):
                raise SandboxError(f"a sandbox already exists in {self.dir} (run "
                                   f"'hypercoil sandbox --state-dir {self.dir} down' first)")
            foreign = set(os.listdir(self.dir)) - {"state.json", "state.lock"}
            if foreign:
                raise SandboxError(f"state directory {self.dir} is not empty "
                                   f"({', '.join(sorted(foreign)[:3])}...): choose a new or empty "
                                   "one, or run 'down' for the sandbox it holds")
        with self.state.locked(create=True) as st:
            if st.data.get("namespaces") or st.data.get("processes"):
                raise SandboxError(f"a sandbox already exists in {self.dir} "
                                   f"(run 'hypercoil sandbox --state-dir {self.dir} down' first)")
            st.data.update(format=1, config=asdict(config), started_at=time.time(),
                           ready=False)
            st.save()
            error = None
            try:
                self._up(config, progress)
            except BaseException as exc:       # also Ctrl-C: never leave half a sandbox
                if not cleanup_on_failure:
                    raise
                progress(f"failed ({exc.__class__.__name__}): removing what was made")
                self._down(Progress(quiet=True))
                error = exc
            else:
                st.data["ready"] = True
                st.data["up_seconds"] = round(progress.elapsed(), 2)
                st.save()
        if error is not None:
            self._remove_dir()
            raise error
        return {"seconds": progress.elapsed(), "nodes": config.nodes,
                "pods": len(self.state.pods), "phases": dict(self.phases)}

    def _preflight(self, cfg: Config | None = None):
        if cfg is not None and cfg.kubernetes:
            from coil.sandbox import kube
            kube.preflight()
        if os.geteuid() != 0:
            raise SandboxError("the sandbox needs root (network namespaces)")
        for name, hint in (("ip", "install iproute2"), ("etcd", "install etcd-server"),
                           ("etcdctl", "install etcd-client"), ("bird", "install bird2"),
                           ("birdc", "install bird2"), ("ping", "install iputils-ping")):
            tool(name, hint)
        cnitool_path()

    def _up(self, cfg: Config, progress):
        st = self.state
        self.progress = progress
        fabric_net = ipaddress.ip_network(cfg.fabric_subnet)
        fabric = f"{cfg.name}-fabric"
        st.data["fabric"] = {"netns": fabric, "bridge": "br0", "subnet": str(fabric_net)}
        nodes = {}
        for i in range(1, cfg.nodes + 1):
            name = node_name(i)
            ndir = st.path_of(name)
            nodes[name] = {
                "name": name, "index": i, "netns": f"{cfg.name}-{name}",
                "address": str(fabric_net.network_address + 10 + i),
                "prefixlen": fabric_net.prefixlen, "fabric_port": f"n{i}", "dir": ndir,
                "coild_socket": os.path.join(ndir, "coild.sock"),
                "api_socket": os.path.join(ndir, "coild-api.sock"),
                "http": "127.0.0.1:9383",
                "bird_ctl": os.path.join(ndir, "bird.ctl"),
                "bird_conf": os.path.join(ndir, "bird.conf"),
                "conflist": os.path.join(ndir, "net.conflist"),
                "cni_bin": os.path.join(ndir, "bin"),
                "cni_cache": os.path.join(ndir, "cni-cache"),
            }
        st.data["nodes"] = nodes
        names = [fabric] + [n["netns"] for n in nodes.values()]
        taken = [n for n in names if netns_exists(n)]
        if taken:
            raise SandboxError(f"network namespace(s) {', '.join(taken)} already exist: "
                               "choose another --name or remove them")
        self.phases = {}
        mark = time.monotonic()

        def phase(name):
            nonlocal mark
            now = time.monotonic()
            self.phases[name] = round(now - mark, 3)
            mark = now
        self._make_network(fabric, nodes, progress)
        phase("network")
        self._start_services(cfg, fabric, nodes, progress)
        for ext in self._extensions():
            if hasattr(ext, "on_nodes_ready"):
                ext.on_nodes_ready(self)
        phase("services")
        wanted = [(n, "default", cfg.pods) for n in nodes]
        if cfg.global_pods:
            wanted.append((node_name(1), "global", cfg.global_pods))
        self.add_pods(wanted, progress)
        phase("pods")
        self.wait_routes(progress=progress)
        phase("routes")
        for ext in self._extensions():
            if hasattr(ext, "on_ready"):
                ext.on_ready(self)
        if cfg.kubernetes:
            phase("kubernetes")

    def _make_network(self, fabric: str, nodes: dict, progress):
        st = self.state
        st.record_namespaces([fabric] + [n["netns"] for n in nodes.values()])
        ip_batch([f"netns add {fabric}"] + [f"netns add {n['netns']}" for n in nodes.values()])
        run("ip", "-n", fabric, "link", "set", "lo", "up")
        run("ip", "-n", fabric, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", fabric, "link", "set", "br0", "up")
        with futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: self._wire_node(fabric, n), nodes.values()))
        progress(f"network: fabric {fabric} (bridge br0, {st.data['fabric']['subnet']}), "
                 f"{len(nodes)} node namespaces")

    def _wire_node(self, fabric: str, n: dict):
        ns = n["netns"]
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", fabric, "link", "add", n["fabric_port"], "type", "veth", "peer", "name",
            "eth0", "netns", ns)
        run("ip", "-n", fabric, "link", "set", n["fabric_port"], "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{n['address']}/{n['prefixlen']}", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        # runs inside the node namespace: its /proc/sys/net is that namespace's only
        run("ip", "netns", "exec", ns, "sysctl", "-qew", "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1")
        for d in (n["dir"], n["cni_bin"], n["cni_cache"]):
            os.makedirs(d, exist_ok=True)
        os.symlink(plugin_path(), os.path.join(n["cni_bin"], "coil"))
        with open(n["conflist"], "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "coil-sandbox",
                       "plugins": [{"type": "coil", "socket": n["coild_socket"]}]}, f, indent=1)

    def _start_services(self, cfg: Config, fabric: str, nodes: dict, progress):
        st = self.state
        etcd_dir = st.path_of("etcd")
        os.makedirs(etcd_dir, exist_ok=True)
        url = "http://127.0.0.1:2379"
        peer = "http://127.0.0.1:2380"
        etcd = self.spawn("etcd", None, fabric, [
            tool("etcd", "install etcd-server"), "--name", "sandbox",
            "--data-dir", os.path.join(etcd_dir, "data"),
            "--listen-client-urls", f"{url},unix://{ETCD_SOCKET}",
            "--advertise-client-urls", url, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"sandbox={peer}",
            # one member, no peers: a short election timeout makes it leader in ~0.1 s
            "--election-timeout", "250", "--heartbeat-interval", "50",
            "--log-level", "warn", "--logger", "zap"],
            os.path.join(etcd_dir, "etcd.log"), env={"ETCD_UNSUPPORTED_ARCH": "amd64"},
            cwd=etcd_dir)
        # BIRDs and coilds start meanwhile: coild waits for etcd by itself
        for n in nodes.values():
            self.write_bird_config(n)
        for n in nodes.values():
            self._start_bird(n)
            self._start_coild(n)
        for ext in self._extensions():
            if hasattr(ext, "on_services"):
                ext.on_services(self)
        progress(f"started etcd, {len(nodes)} coild and {len(nodes)} BIRD (AS {cfg.asn}, "
                 f"iBGP full mesh)")
        self._wait_for("etcd", self._etcd_healthy, etcd, 30)
        self._create_pools(cfg)
        progress(f"etcd ready; pools: default {cfg.default_subnet} "
                 f"(blocks of {1 << cfg.block_size}), global {cfg.global_subnet} "
                 f"(blocks of {1 << cfg.global_block_size})")
        for n in nodes.values():
            self._wait_coild(n["name"])
            self._wait_for(f"BIRD on {n['name']}", lambda n=n: self._bird_up(n),
                           st.process("bird", n["name"]), 20)
        progress(f"{len(nodes)} coild answering, {len(nodes)} BIRD running")

    def write_bird_config(self, n: dict):
        """Write ``n``'s bird.conf: one BGP peer per other node of the state."""
        peers = [(m["name"], m["address"]) for m in self.state.nodes.values()
                 if m["name"] != n["name"]]
        with open(n["bird_conf"], "w") as f:
            f.write(bird.render_config(n["name"], n["address"], peers,
                                       os.path.join(n["dir"], "bird.log"), asn=self.config.asn))

    def _etcd_healthy(self) -> bool:
        sock = self.state.path_of("etcd", ETCD_SOCKET)
        if not os.path.exists(sock):
            return False
        r = run("etcdctl", "--endpoints", self.etcd_endpoint, "--dial-timeout", "1s",
                "--command-timeout", "2s", "endpoint", "health", check=False,
                env=dict(os.environ, ETCDCTL_API="3"))
        return r.returncode == 0

    def _create_pools(self, cfg: Config):
        base = [sys.executable, "-m", "coil", "coilctl", "--etcd-endpoints", self.etcd_endpoint,
                "--etcd-prefix", cfg.etcd_prefix, "pool", "create"]
        jobs = [base + ["default", cfg.default_subnet, str(cfg.block_size)]]
        if cfg.global_pods or cfg.global_subnet:
            jobs.append(base + ["global", cfg.global_subnet, str(cfg.global_block_size)])
        procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for j in jobs]
        for p, j in zip(procs, jobs):
            out, err = p.communicate(timeout=60)
            if p.returncode != 0:
                raise SandboxError(f"coilctl pool create {j[-3]}: {err.strip() or out.strip()}")

    def _start_coild(self, n: dict) -> Proc:
        cfg = self.config
        try:
            os.unlink(n["coild_socket"])
        except FileNotFoundError:
            pass
        return self.spawn("coild", n["name"], n["netns"], [
            sys.executable, "-m", "coil", "coild", "--etcd-endpoints", self.etcd_endpoint,
            "--etcd-prefix", cfg.etcd_prefix, "--socket", n["coild_socket"],
            "--api-socket", n.get("api_socket") or os.path.join(n["dir"], "coild-api.sock"),
            "--http", n["http"], "--scan-interval", cfg.coild_scan_interval],
            os.path.join(n["dir"], "coild.log"), env={"COIL_NODE_NAME": n["name"]})

    def _wait_coild(self, node: str, timeout: float = 30):
        n = self.node(node)

        def answers():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(n["coild_socket"])
                    return True
                except OSError:
                    return False
        self._wait_for(f"coild on {node}", answers, self.state.process("coild", node), timeout)

    def _start_bird(self, n: dict) -> Proc:
        for leftover in (n["bird_ctl"],):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        return self.spawn("bird", n["name"], n["netns"], [
            tool("bird", "install bird2"), "-f", "-c", n["bird_conf"], "-s", n["bird_ctl"],
            "-P", os.path.join(n["dir"], "bird.pid")], os.path.join(n["dir"], "bird.out"))

    def _bird_up(self, n: dict) -> bool:
        if not os.path.exists(n["bird_ctl"]):
            return False
        try:
            bird.birdc(n["bird_ctl"], "show", "status", timeout=2)
            return True
        except bird.BirdError:
            return False

    # -- pods --------------------------------------------------------------
    def add_pods(self, wanted: list[tuple[str, str, int]], progress=None, tag: str | None = None,
                 names: list[str] | None = None) -> list[dict]:
        """Create pods: ``wanted`` is [(node, k8s namespace, count)] (or give
        explicit ``names`` with one entry in ``wanted``). Pods are named
        NODE-TAGnn, TAG "p" for namespace default, else the namespace's first
        letter, unless ``tag`` is given. Each pod is a netns
        wired by the coil plugin through the libcni client, CNI ADDs run
        in parallel. Raises SandboxError naming the pods that failed (those
        stay recorded, so ``down`` still removes them)."""
        progress = progress or Progress(quiet=True)
        st = self.state
        cfg = self.config
        existing = {p["name"] for p in st.pods}
        new = []
        for node, namespace, count in wanted:
            self.node(node)          # raises SandboxError for an unknown node
            if names:
                dup = [x for x in names if x in existing]
                if dup:
                    raise SandboxError(f"pod(s) {', '.join(dup)} exist already")
                pnames = list(names)
            else:
                t = tag or ("p" if namespace == "default" else namespace[:1])
                pnames, i = [], 0
                while len(pnames) < count:
                    i += 1
                    if f"{node}-{t}{i:02d}" not in existing:
                        pnames.append(f"{node}-{t}{i:02d}")
            for pname in pnames:
                existing.add(pname)
                new.append({"name": pname, "namespace": namespace, "node": node,
                            "netns": f"{cfg.name}-{pname}",
                            "container_id": f"{cfg.name}-{pname}-{uuid.uuid4().hex[:8]}",
                            "ifname": "eth0", "address": None})
        if not new:
            return []
        taken = [p["netns"] for p in new if netns_exists(p["netns"])]
        if taken:
            raise SandboxError(f"network namespace(s) {', '.join(taken[:5])} already exist")
        st.pods.extend(new)
        st.record_namespaces([p["netns"] for p in new])     # saves
        ip_batch([f"netns add {p['netns']}" for p in new])
        self._loopback_up([p["netns"] for p in new])
        total = len(new)
        done = 0
        failed = []
        parallel = cfg.parallel or 2 * (os.cpu_count() or 2)   # CPU-bound: more is slower
        step = max(1, -(-total // 5))
        cnitool = cnitool_path()
        with futures.ThreadPoolExecutor(min(parallel, total)) as pool:
            jobs = {pool.submit(self._add_one, cnitool, p): p for p in new}
            for fut in futures.as_completed(jobs):
                p = jobs[fut]
                rc, out = fut.result()
                done += 1
                if rc == 0:
                    p["address"] = out["ips"][0]["address"].split("/")[0]
                    p["host_veth"] = out["interfaces"][0]["name"]
                    p["mac"] = out["interfaces"][1].get("mac")
                else:
                    failed.append((p["name"], out))
                if done % step == 0 or done == total:
                    progress(f"pods: {done}/{total} created" + (f", {len(failed)} failed"
                                                                 if failed else ""))
        st.save()
        self._static_neighbours([p for p in new if p.get("address")])
        if failed:
            name, out = failed[0]
            raise SandboxError(f"CNI ADD failed for {len(failed)} pod(s), first {name}: "
                               f"{json.dumps(out)}")
        return new

    def _static_neighbours(self, pods: list[dict]):
        """Permanent ARP entries on both ends of each pod's veth.

        The kernel's IPv4 neighbour table is shared by *all* network
        namespaces and the garbage-collection limit (gc_thresh3, 1024 by
        default) can only be raised in the root namespace, which the
        sandbox never touches. Hundreds of pods in one kernel (a real
        cluster spreads them over many) would overflow it ("neighbor table
        overflow", pings lost) -- permanent entries are exempt from that
        limit. Only the sandbox needs this; the wiring is coild's. The pod
        side is done right after each ADD (_add_one), the node side here,
        one ``ip -batch`` per node."""
        by_node: dict[str, list[str]] = {}
        for p in pods:
            if p.get("mac") and p.get("host_veth"):
                by_node.setdefault(p["node"], []).append(
                    f"neigh replace {p['address']} lladdr {p['mac']} dev {p['host_veth']} "
                    "nud permanent")

        for node, lines in by_node.items():
            r = subprocess.run(["ip", "-n", self.node(node)["netns"], "-force", "-batch", "-"],
                               input="\n".join(lines) + "\n", capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise SandboxError(f"static neighbours on {node}: {r.stderr.strip()}")

    def _loopback_up(self, netns_names: list[str]):
        """lo up in fresh pod namespaces, in-process (one netlink socket per
        namespace, no fork per pod)."""
        try:
            from coil import netlink
            for ns in netns_names:
                with netlink.open_netlink(f"/run/netns/{ns}") as nl:
                    lo = nl.link_get("lo")
                    nl.link_set(lo.index, up=True)
        except Exception:          # noqa: BLE001 - fall back to ip, one per namespace
            for ns in netns_names:
                run("ip", "-n", ns, "link", "set", "lo", "up")

    def _add_one(self, cnitool: str, p: dict):
        """CNI ADD, then the pod side of the static neighbour entries (see
        _static_neighbours)."""
        rc, out = self._cni(cnitool, "add", p)
        if rc == 0:
            host_mac = out["interfaces"][0].get("mac")
            if host_mac:
                r = run("ip", "-n", p["netns"], "neigh", "replace", GATEWAY, "lladdr", host_mac,
                        "dev", p["ifname"], "nud", "permanent", check=False)
                if r.returncode != 0:
                    return 1, {"msg": f"static neighbour in {p['netns']}: {r.stderr.strip()}"}
        return rc, out

    def _cni(self, cnitool: str, command: str, p: dict):
        n = self.node(p["node"])
        env = dict(os.environ, CNI_PATH=f"{n['cni_bin']}:{REFERENCE_PLUGINS}",
                   CNI_CACHE_DIR=n["cni_cache"])
        try:
            r = subprocess.run(["ip", "netns", "exec", n["netns"], cnitool, command, n["conflist"],
                                f"/run/netns/{p['netns']}", p["container_id"], p["ifname"],
                                p["namespace"], p["name"]],
                               capture_output=True, text=True, env=env, timeout=120)
        except subprocess.TimeoutExpired:
            return 1, {"msg": f"cnitool {command} timed out"}
        try:
            out = json.loads(r.stdout) if r.stdout.strip() else {}
        except ValueError:
            out = {"raw": r.stdout}
        if r.returncode != 0 and not out:
            out = {"stderr": r.stderr.strip()}
        return r.returncode, out

    def delete_pod(self, name: str) -> dict:
        """CNI DEL the pod, remove its namespace and its record. Raises
        SandboxError when DEL fails (the pod then stays)."""
        with self.state.locked():
            p = self.pod(name)
            rc, out = self._cni(cnitool_path(), "del", p)
            if rc != 0:
                raise SandboxError(f"CNI DEL {name}: {json.dumps(out)}")
            run("ip", "netns", "del", p["netns"], check=False)
            self.state.data["pods"] = [q for q in self.state.pods if q["name"] != name]
            self.state.forget_namespaces([p["netns"]])
            self.state.save()
        return p

    def create_pods(self, node: str, count: int = 1, namespace: str = "default",
                    tag: str = "x") -> list[dict]:
        """Add ``count`` more pods on ``node`` (locked; for tests and users)."""
        with self.state.locked():
            return self.add_pods([(node, namespace, count)], tag=tag)

    # -- restarts (tests, exploration) -------------------------------------
    def stop_process(self, role: str, node: str, sig: int = signal.SIGTERM,
                     timeout: float = 10) -> bool:
        """Stop the recorded ``role`` process on ``node`` with ``sig`` (by
        PID); True when it was running."""
        p = self.state.process(role, node)
        if p is None or not p.alive():
            return False
        p.signal(sig)
        deadline = time.monotonic() + timeout
        while p.alive() and time.monotonic() < deadline:
            self._reap(p["pid"])
            time.sleep(0.02)
        if p.alive():
            p.signal(signal.SIGKILL)
        self._reap(p["pid"])
        return True

    def restart(self, role: str, node: str, sig: int = signal.SIGTERM) -> Proc:
        """Stop (with ``sig``) and start again coild or bird on ``node``."""
        if role not in ("coild", "bird"):
            raise SandboxError(f"cannot restart {role!r}: coild or bird")
        with self.state.locked():
            self.stop_process(role, node, sig)
            n = self.node(node)
            if role == "coild":
                proc = self._start_coild(n)
                self._wait_coild(node)
            else:
                proc = self._start_bird(n)
                self._wait_for(f"BIRD on {node}", lambda: self._bird_up(n), proc, 20)
            return proc

    # -- routes ------------------------------------------------------------
    def table119(self, node: str) -> list[str]:
        out = run("ip", "-n", self.node(node)["netns"], "route", "show", "table", "119").stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def bird_routes(self, node: str) -> list[dict]:
        """Routes BIRD installed in the node's main table (proto bird)."""
        out = run("ip", "-j", "-n", self.node(node)["netns"], "route", "show", "proto",
                  "bird").stdout
        return json.loads(out) if out.strip() else []

    def missing_routes(self) -> dict[str, list[str]]:
        """{node: [blocks of other nodes it has no BGP route for]}."""
        blocks = self.store().all_blocks()
        missing = {}
        for node in self.node_names():
            have = {r["dst"] for r in self.bird_routes(node)}
            want = [b.cidr for b in blocks if b.node != node and b.node in self.state.nodes]
            lack = [c for c in want if c not in have]
            if lack:
                missing[node] = lack
        return missing

    def wait_routes(self, timeout: float = 30, progress=None) -> None:
        """Wait until every node has a BGP route to every block of the other
        nodes in its main table. Raises SandboxError naming what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.missing_routes()
            if not missing:
                if progress:
                    n = len(self.store().all_blocks())
                    progress(f"routes converged: every node routes the {n} blocks of the others")
                return
            if time.monotonic() >= deadline:
                raise SandboxError(f"routes missing after {timeout:g}s: {missing}")
            time.sleep(0.2)

    # -- down --------------------------------------------------------------
    def down(self, progress=None) -> dict:
        """Stop every recorded process (by PID), delete every recorded
        namespace and the state directory. Idempotent; safe after a crashed
        ``up``."""
        progress = progress or Progress(quiet=True)
        if not os.path.isdir(self.dir):
            progress(f"nothing to do: {self.dir} does not exist")
            return {"removed": False}
        with self.state.locked() as st:
            if st is None:
                return {"removed": False}
            report = self._down(progress)
        self._remove_dir()
        return report

    def _remove_dir(self):
        """Remove the state directory when it holds nothing but the lock
        (what _down leaves after a complete teardown)."""
        try:
            left = set(os.listdir(self.dir))
        except FileNotFoundError:
            return
        if left <= {"state.lock"}:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _down(self, progress) -> dict:
        st = self.state
        exts = self._extensions()
        self.close()
        for ext in exts:
            if hasattr(ext, "on_down"):
                ext.on_down(self)
        procs = st.processes
        alive = [p for p in procs if p.alive()]
        # coild and BIRD first, etcd last (coild closes its etcd client on exit)
        killed = stop_processes([p for p in alive if p.get("role") != "etcd"], reap=self._reap)
        killed += stop_processes([p for p in alive if p.get("role") == "etcd"], reap=self._reap)
        progress(f"stopped {len(alive)} processes" + (f" ({len(killed)} needed SIGKILL)"
                                                      if killed else ""))
        names = list(st.namespaces)
        strays = {}
        for ns in names:
            if netns_exists(ns):
                pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
                if pids:
                    strays[ns] = pids
        for ns, pids in strays.items():
            progress(f"warning: processes not started by the sandbox still run in {ns}: "
                     f"{', '.join(pids)} (not killed; the namespace lives until they exit)")
        present = [ns for ns in names if netns_exists(ns)]
        # pods first, then nodes, then the fabric (reverse creation order)
        if present:
            ip_batch([f"netns del {ns}" for ns in reversed(present)], check=False)
        left = [ns for ns in present if netns_exists(ns)]
        for ns in left:
            run("ip", "netns", "del", ns, check=False)
        left = [ns for ns in present if netns_exists(ns)]
        progress(f"deleted {len(present) - len(left)} network namespaces"
                 + (f"; could not delete {left}" if left else ""))
        st.data["processes"] = [p for p in procs if p.alive()]
        st.data["namespaces"] = left
        st.data["pods"] = []
        st.save()
        for entry in os.listdir(self.dir):
            if entry in ("state.json", "state.lock"):
                continue
            path = os.path.join(self.dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if not left and not st.data["processes"]:
            os.unlink(st.path)
        return {"removed": True, "processes": len(alive), "killed": len(killed),
                "namespaces": len(present), "left": left}

    # -- status ------------------------------------------------------------
    def status(self) -> dict:
        """Everything a user wants to see, as one JSON-able document."""
        st = self.state.load()
        if not st.data.get("nodes"):
            raise SandboxError(f"no sandbox in {self.dir} (run 'hypercoil sandbox up')")
        cfg = self.config
        etcd = st.process("etcd", None)
        data = {"name": cfg.name, "state_dir": self.dir, "ready": st.data.get("ready", False),
                "up_seconds": st.data.get("up_seconds"),
                "started_at": st.data.get("started_at"),
                "fabric": st.data.get("fabric"),
                "etcd": {"endpoint": self.etcd_endpoint, "pid": etcd and etcd["pid"],
                         "running": bool(etcd and etcd.alive())},
                "pools": [], "nodes": [], "pods": []}
        blocks, addrs = [], []
        try:
            s = self.store()
            data["pools"] = [p.to_json() for p in s.list_pools()]
            blocks = s.all_blocks()
            addrs, _ = s.all_addresses()
        except Exception as exc:      # noqa: BLE001 - etcd down: show the rest
            data["etcd"]["error"] = str(exc).splitlines()[0]
        used = {}
        for a in addrs:
            used[a.block] = used.get(a.block, 0) + 1
        by_cid = {a.container_id: a for a in addrs}
        for name, n in st.nodes.items():
            coild, b = st.process("coild", name), st.process("bird", name)
            entry = {"name": name, "netns": n["netns"], "address": n["address"],
                     "coild": {"pid": coild and coild["pid"], "running": bool(coild and coild.alive()),
                               "socket": n["coild_socket"], "log": coild and coild["log"]},
                     "bird": {"pid": b and b["pid"], "running": bool(b and b.alive()),
                              "ctl": n["bird_ctl"], "config": n["bird_conf"]},
                     "blocks": [{"pool": blk.pool, "block": blk.cidr, "used": used.get(blk.cidr, 0),
                                 "free": blk.size - used.get(blk.cidr, 0)}
                                for blk in blocks if blk.node == name],
                     "table119": [], "bgp": [], "routes": []}
            if netns_exists(n["netns"]):
                entry["table119"] = self.table119(name)
                entry["routes"] = [f"{r['dst']} via {r.get('gateway', '?')} dev {r.get('dev', '?')}"
                                   for r in self.bird_routes(name)]
            try:
                entry["bgp"] = [{"peer": s["name"], "state": s["state"], "info": s["info"],
                                 "since": s["since"], "established": s["established"]}
                                for s in bird.bgp_sessions(n["bird_ctl"])]
            except bird.BirdError as exc:
                entry["bird"]["error"] = str(exc)
            data["nodes"].append(entry)
        for p in st.pods:
            rec = by_cid.get(p["container_id"])
            data["pods"].append({"name": p["name"], "namespace": p["namespace"],
                                 "node": p["node"], "netns": p["netns"],
                                 "address": rec.address if rec else p.get("address"),
                                 "in_etcd": rec is not None, "container_id": p["container_id"]})
        for ext in self._extensions():
            if hasattr(ext, "on_status"):
                ext.on_status(self, data)
        return data

    # -- check -------------------------------------------------------------
    def check(self, progress=None, parallel: int = 16) -> dict:
        """Every pod pings one pod on every other node, a pod on every node
        pings each namespace-pool pod; BGP sessions and routes are checked.
        Returns {"ok": bool, "matrix": ..., "failures": [...], ...}."""
        progress = progress or Progress(quiet=True)
        st = self.state.load()
        if not st.data.get("nodes"):
            raise SandboxError(f"no sandbox in {self.dir} (run 'hypercoil sandbox up')")
        nodes = list(st.nodes)
        pods = [p for p in st.pods if p.get("address")]
        default = {n: [p for p in pods if p["node"] == n and p["namespace"] == "default"]
                   for n in nodes}
        special = [p for p in pods if p["namespace"] != "default"]
        target = {n: ps[0] for n, ps in default.items() if ps}
        plan = []
        for p in pods:
            for other in nodes:
                if other != p["node"] and other in target:
                    plan.append((p, target[other], "pod"))
        for sp in special:
            for n in nodes:
                if n in target and target[n] is not sp:
                    plan.append((target[n], sp, sp["namespace"]))
        failures = []

        def ping(job):
            src, dst, _ = job
            for _ in range(2):          # one retry: the first packet may race an ARP reply
                r = run("ip", "netns", "exec", src["netns"], "ping", "-c1", "-W1", "-q",
                        dst["address"], check=False, timeout=10)
                if r.returncode == 0:
                    return True, ""
            return False, (r.stderr.strip() or r.stdout.strip().splitlines()[-1:] or [""])[0]

        matrix = {a: {b: [0, 0] for b in nodes} for a in nodes}
        special_res = {}
        with futures.ThreadPoolExecutor(parallel) as pool:
            for job, (ok, why) in zip(plan, pool.map(ping, plan)):
                src, dst, kind = job
                if kind == "pod":
                    cell = matrix[src["node"]][dst["node"]]
                    cell[1] += 1
                    cell[0] += ok
                else:
                    r = special_res.setdefault(dst["name"], {"pod": dst["name"],
                                                             "namespace": dst["namespace"],
                                                             "address": dst["address"],
                                                             "node": dst["node"],
                                                             "reached_from": [], "failed_from": []})
                    r["reached_from" if ok else "failed_from"].append(src["node"])
                if not ok:
                    failures.append(f"{src['name']} ({src['address']}) -> {dst['name']} "
                                    f"({dst['address']} on {dst['node']}): {why}")
        progress(f"pings: {len(plan) - len(failures)}/{len(plan)} answered")
        bgp = {}
        for n in nodes:
            try:
                sessions = bird.bgp_sessions(st.nodes[n]["bird_ctl"])
            except bird.BirdError as exc:
                failures.append(f"{n}: BIRD: {exc}")
                continue
            bgp[n] = {s["name"]: s["info"] or s["state"] for s in sessions}
            for s in sessions:
                if not s["established"]:
                    failures.append(f"{n}: BGP session {s['name']} is {s['state']} {s['info']}")
            if len(sessions) != len(nodes) - 1:
                failures.append(f"{n}: {len(sessions)} BGP sessions, want {len(nodes) - 1}")
        try:
            missing = self.missing_routes()
        except Exception as exc:     # noqa: BLE001
            missing = {}
            failures.append(f"etcd: {str(exc).splitlines()[0]}")
        for n, lack in missing.items():
            failures.append(f"{n}: no route to block(s) {', '.join(lack)}")
        unwired = [p["name"] for p in st.pods if not p.get("address")]
        for name in unwired:
            failures.append(f"pod {name} has no address")
        if not plan and len(nodes) > 1:
            failures.append("nothing to ping: no pods (up --pods N)")
        return {"ok": not failures, "pings": len(plan), "failures": failures,
                "matrix": matrix, "special": list(special_res.values()), "bgp": bgp,
                "missing_routes": missing}


def tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
