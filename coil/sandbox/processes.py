"""The sandbox's processes: etcd (in the fabric namespace), one coild and one
BIRD per node, the pools they serve; each started with ``spawn`` (recorded
with PID and start time in the state, stopped by PID by ``down``), waited
for, stopped and restarted. Mixed into :class:`coil.sandbox.cluster.Sandbox`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from coil.sandbox import bird
from coil.sandbox.config import ETCD_SOCKET, Config, SandboxError
from coil.sandbox.shell import run, tail, tool
from coil.sandbox.state import Proc


class Processes:
    """Starts, waits for, stops and restarts the sandbox's daemons."""

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
            "--http", n["http"], "--scan-interval", cfg.coild_scan_interval,
            "--liveness-ttl", cfg.coild_liveness_ttl],
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
