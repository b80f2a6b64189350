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
                called by the built-in CNI executor (coil/sandbox/cniexec.py)

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

import ipaddress
import os
import shutil
import subprocess
import time
from dataclasses import asdict

from coil.sandbox.config import (ETCD_SOCKET, GATEWAY, REFERENCE_PLUGINS,  # noqa: F401 - API
                                 Config, SandboxError, node_name)
from coil.sandbox.pods import Pods
from coil.sandbox.processes import Processes
from coil.sandbox.report import Report
from coil.sandbox.shell import (Progress, ip_batch, netns_exists, run, tail,  # noqa: F401 - API
                                tool)
from coil.sandbox.state import DEFAULT_STATE_DIR, State, stop_processes
from coil.sandbox.topology import Topology, plan_nodes, plugin_path  # noqa: F401 - API


class Sandbox(Topology, Processes, Pods, Report):
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

    def _up(self, cfg: Config, progress):
        st = self.state
        self.progress = progress
        fabric = f"{cfg.name}-fabric"
        st.data["fabric"] = {"netns": fabric, "bridge": "br0",
                             "subnet": str(ipaddress.ip_network(cfg.fabric_subnet))}
        nodes = plan_nodes(cfg, st)
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
