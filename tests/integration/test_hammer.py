"""The chaos hammer (issue 8): three coild on a three-member etcd cluster,
parallel CNI traffic through the native launcher, coild SIGKILLed and etcd
members (the leader too) stopped at random moments.

What runs together, for ``COIL_HAMMER_SECONDS`` (15 s in ``make test``,
10 minutes in ``make chaos``):

- a real 3-member etcd cluster on loopback ports (each member also listens
  on a UNIX socket, which coild reaches from its node namespace);
- three nodes, each a network namespace running its own coild, and
  ``COIL_HAMMER_SLOTS`` pods per node, each pod a namespace of its own;
- ``COIL_HAMMER_WORKERS`` runtime threads calling ADD/DEL/CHECK through the
  libcni client (tests/cniclient/cnitool) and the native launcher. They
  behave like kubelet: a failed ADD is followed by DEL until DEL succeeds, a
  failed DEL is repeated until it succeeds. Container IDs repeat: a
  container is ADDed again while it is up, a DELeted container ID comes
  back, and ADD/ADD, ADD/DEL, ADD/CHECK, DEL/DEL and DEL/CHECK of one
  container are raced against each other;
- a fault thread (``COIL_HAMMER_FAULTS`` picks the kinds): SIGKILL of a
  random coild, or SIGTERM (it must drain and exit 0), restarted after a
  random pause; stops of a random etcd member or of the current leader
  (SIGKILL or SIGTERM, back after a random pause), and freezes of a member
  (SIGSTOP/SIGCONT: calls to it run into their deadline); never two faults
  at once.

Errors of CNI calls while faults are injected are allowed (the runtime
retries); each is recorded by (command, CNI code, message). Definite
violations are collected during the run and asserted at the end:

- every answer is a CNI result or a CNI error object (code, msg);
- a CHECK of an up container fails only with "try again" (11);
- a repeated ADD of an up container returns the address it already has;
- after each race, the container's etcd records and its pod interface
  agree (both present with the same address, or both absent);
- no address is held by two pods at once: for two holds of one address,
  one was released (a DEL had started) before the other's ADD returned;
- once the run is over and every coild and member is back: every address
  record in etcd belongs to exactly one up pod whose interface carries it,
  in a block of that pod's node, and every up pod's address is in etcd;
  each node has exactly the host veths and /32 routes of its up pods, and
  table 119 holds exactly the node's blocks;
- after a final DEL of every container: no address record, no host veth,
  no pod route, no pod interface; the emptied blocks go back to the pool.

The seed is printed with every failure; ``COIL_HAMMER_SEED=N`` replays the
same choices (thread timing still varies). ``COIL_HAMMER_REPORT=FILE``
writes the figures (operations, faults, errors, checks) as JSON.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import traceback
import uuid

import pytest

from coil.coild.podnet import RETIRED_GROUP
from harness import CNI, Coild, Netns, coil_conflist, plugin_binary
from helpers import EtcdCluster, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SECONDS = float(os.environ.get("COIL_HAMMER_SECONDS", "15"))
WORKERS = int(os.environ.get("COIL_HAMMER_WORKERS", "6"))
SLOTS = int(os.environ.get("COIL_HAMMER_SLOTS", "8"))        # pods per node
NODES = 3
# the pairs of calls raced on one container; COIL_HAMMER_RACES="" runs none
RACES = tuple(tuple(r.split("+")) for r in os.environ.get(
    "COIL_HAMMER_RACES", "add+add,add+del,add+check,del+del,del+check").split(",") if r)
SCAN = os.environ.get("COIL_HAMMER_SCAN", "2s")     # coild's --scan-interval
# the faults injected, and how often each is chosen
FAULT_WEIGHTS = {"coild-kill": 4, "coild-term": 2, "etcd-member": 2, "etcd-leader": 2,
                 "etcd-freeze": 2}
# etcd-freeze (a frozen member: unknown outcomes, late commits) is in the default since
# coild fences the read-back of an unknown address write (docs/design.md)
DEFAULT_FAULTS = "coild-kill,coild-term,etcd-member,etcd-leader,etcd-freeze"
FAULTS = tuple(f for f in os.environ.get("COIL_HAMMER_FAULTS", DEFAULT_FAULTS).split(",") if f)
REPORT = os.environ.get("COIL_HAMMER_REPORT", "")
# blocks of 4; "blue" has 4 blocks for 12 pods on 3 nodes: nodes fight over them and
# run out (an ADD then fails with "pool exhausted", and the runtime DELs)
POOLS = {"default": ("10.66.0.0/22", 2), "blue": ("10.67.0.0/28", 2)}
NAMESPACES = ("default", "blue")
TRY_AGAIN = 11
GATEWAY = "169.254.1.1"
RECOVERY = 120.0      # seconds after the run for every DEL to succeed


# -- etcd -----------------------------------------------------------------------------

class EtcdReader:
    """Reads under the test prefix from whichever member answers."""

    def __init__(self, cluster: EtcdCluster, prefix: str):
        from coil.config import EtcdConfig
        from coil.store.etcd import Etcd
        self.clients = [Etcd(EtcdConfig(endpoints=(ep,), prefix=prefix, timeout=3.0))
                        for ep in cluster.endpoints]
        self.cluster = cluster

    def get_prefix(self, key: str):
        from coil.errors import StoreUnavailable
        last = None
        for attempt in range(20):
            for i, client in enumerate(self.clients):
                if not self.cluster.alive(i):
                    continue
                try:
                    return client.get_prefix(key)[0]
                except StoreUnavailable as exc:
                    last = exc
            time.sleep(0.25)
        raise AssertionError(f"no etcd member answered: {last}")

    def addresses(self) -> dict:
        """address -> record dict (+ "block")."""
        from coil.store import keys
        out = {}
        for kv in self.get_prefix(keys.IP):
            cidr, offset = keys.parse_ip_key(kv.key)
            addr = str(ipaddress.ip_network(cidr).network_address + offset)
            rec = json.loads(kv.value)
            rec["block"] = cidr
            out[addr] = rec
        return out

    def blocks(self) -> dict:
        """block cidr -> node."""
        from coil.store import keys
        return {keys.parse_block_key(kv.key)[1]: json.loads(kv.value)["node"]
                for kv in self.get_prefix(keys.BLOCK)}

    def close(self):
        for c in self.clients:
            c.close()


# -- kernel state, read with iproute2 -----------------------------------------------

def ip_json(netns: str, *args) -> list:
    r = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"ip -n {netns} {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else []


# a DEL puts the pair in this link group; coild's deletion queue removes it soon
RETIRED = str(RETIRED_GROUP)


def pod_interfaces(netns: str, retired: bool = False) -> dict:
    """ifname -> sorted IPv4 addresses (lo, and unless ``retired`` the pairs a
    DEL retired, left out)."""
    out = {}
    for link in ip_json(netns, "addr", "show"):
        if link["ifname"] == "lo" or (not retired and link.get("group") == RETIRED):
            continue
        out[link["ifname"]] = sorted(a["local"] for a in link.get("addr_info", [])
                                     if a.get("family") == "inet")
    return out


# -- the run ------------------------------------------------------------------------

class Op:
    __slots__ = ("kind", "cid", "start", "done", "ok", "code", "msg", "address", "host_if")

    def __init__(self, kind, cid, start):
        self.kind, self.cid, self.start = kind, cid, start
        self.done = None
        self.ok = False
        self.code = None
        self.msg = ""
        self.address = None
        self.host_if = None


class Slot:
    """One pod: a namespace of its own on one node; its container ID changes
    when the runtime makes a new sandbox, and is reused otherwise."""

    def __init__(self, node, index: int, netns: Netns):
        self.node = node
        self.index = index
        self.namespace = NAMESPACES[index % len(NAMESPACES)]
        self.pod = f"p{node.index}-{index}"
        self.netns = netns
        self.lock = threading.Lock()
        self.gen = 0
        self.live = None          # the address the runtime believes the pod has
        self.host_if = None
        self.hold = None          # the open Hold of self.live
        # a DEL raced an ADD and the container ended up: the DEL's libcni may
        # have removed the cached ADD result after the ADD's libcni wrote it,
        # so a CHECK may go without prevResult (a runtime never races its own
        # calls; the next sequential ADD or DEL makes the cache right again)
        self.cache_lost = False
        self.history = collections.deque(maxlen=12)   # the last calls, for failure reports

    @property
    def cid(self) -> str:
        return f"hc{self.node.index}-{self.index}-{self.gen}"

    def __repr__(self):
        return f"{self.namespace}/{self.pod} ({self.cid} on {self.node.name})"


class Hold:
    """An address a pod was told it has: from when its ADD returned until
    (at the earliest) a DEL of its container started."""

    __slots__ = ("address", "slot", "cid", "add_done", "released")

    def __init__(self, address, slot, cid, add_done):
        self.address, self.slot, self.cid, self.add_done = address, slot, cid, add_done
        self.released = None


class Node:
    def __init__(self, index: int, workdir: str, endpoints: str, prefix: str):
        self.index = index
        self.name = f"hammer-{index}"
        self.netns = Netns("node")
        os.makedirs(workdir, exist_ok=True)
        self.coild = Coild(self.netns, workdir, endpoints, prefix, node_name=self.name,
                           extra=["--scan-interval", SCAN, "--etcd-timeout", "2s"])
        self.workdir = workdir
        self.cni = None

    def start(self):
        self.coild.start(wait=False)

    def wait_ready(self, timeout=60):
        self.coild.wait_ready(timeout)
        if self.cni is None:
            self.cni = CNI(self.netns, self.workdir, coil_conflist(self.coild.socket),
                           plugin_binary())

    def close(self):
        self.coild.stop()
        self.netns.delete()


def serves(path: str) -> bool:
    """coild accepts on its plugin socket (it installs its SIGTERM handler first)."""
    import socket
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def _short(msg: str) -> str:
    """An error message with the variable parts (numbers, ids, paths) masked,
    for counting errors by kind."""
    msg = re.sub(r"/[\w./:-]+", "PATH", msg or "")
    msg = re.sub(r"\b(?:hc)?[\d.-]+(?:/\d+)?\b", "N", msg)
    return msg[:90]


class Hammer:
    def __init__(self, seed: int, cluster: EtcdCluster, nodes: list, reader: EtcdReader,
                 pods: list, seconds: float):
        self.seed = seed
        self.cluster = cluster
        self.nodes = nodes
        self.reader = reader
        self.seconds = seconds
        self.slots = [Slot(n, i, pods[n.index * SLOTS + i]) for n in nodes for i in range(SLOTS)]
        self.ops = collections.Counter()
        self.errors = collections.Counter()
        self.faults = collections.Counter()
        self.checks = collections.Counter()
        self.violations: list[str] = []
        self.holds: list[Hold] = []
        self._mu = threading.Lock()
        self.stop = threading.Event()
        self.chaos_end = 0.0
        self.hard_end = 0.0
        self.hung = 0

    # -- bookkeeping ------------------------------------------------------------
    def violation(self, text: str, slot: Slot | None = None):
        if slot is not None:
            text += f"\n    believed: {slot.live}; last calls of {slot.pod}:\n      " + \
                "\n      ".join(slot.history)
            try:
                with open(slot.node.coild.log_path, encoding="utf-8", errors="replace") as f:
                    lines = [line for line in f if f'"{slot.cid}"' in line]
            except OSError:
                lines = []
            if lines:
                text += "\n    coild log:\n      " + "\n      ".join(l[:300] for l in lines[-8:])
        with self._mu:
            self.violations.append(f"[{time.monotonic() - self.t0:7.2f}s] {text}")

    def check(self, what: str, ok: bool, text: str = "", slot: Slot | None = None) -> bool:
        with self._mu:
            self.checks[what] += 1
        if not ok:
            self.violation(f"{what}: {text}", slot)
        return ok

    # -- one CNI call -------------------------------------------------------------
    def cni(self, slot: Slot, kind: str, cid: str | None = None) -> Op:
        op = Op(kind, cid or slot.cid, time.monotonic())
        try:
            rc, out = slot.node.cni.call(kind, slot.netns, op.cid, slot.namespace, slot.pod)
        except subprocess.TimeoutExpired:
            rc, out = -1, {"code": -1, "msg": "the CNI call did not return within 60 s"}
            self.violation(f"{kind} of {slot} hung for 60 s")
        op.done = time.monotonic()
        op.ok = rc == 0
        with self._mu:
            self.ops[(kind, "ok" if op.ok else "error")] += 1
        if op.ok:
            if kind == "add":
                self._parse_result(slot, op, out)
            slot.history.append(f"{op.start - self.t0:7.2f}-{op.done - self.t0:7.2f}s "
                                f"{kind} {op.cid} ok {op.address or ''}")
            return op
        slot.history.append(f"{op.start - self.t0:7.2f}-{op.done - self.t0:7.2f}s "
                            f"{kind} {op.cid} error {str(out)[:160]}")
        well_formed = isinstance(out, dict) and isinstance(out.get("code"), int) and \
            isinstance(out.get("msg"), str) and out["msg"]
        self.check("error is a CNI error object", well_formed,
                   f"{kind} of {slot} answered {out!r}")
        if well_formed:
            op.code, op.msg = out["code"], out["msg"]
            with self._mu:
                self.errors[(kind, op.code, _short(op.msg))] += 1
        return op

    def _parse_result(self, slot: Slot, op: Op, out):
        try:
            ips = out["ips"]
            op.address = str(ipaddress.ip_interface(ips[0]["address"]).ip)
            op.host_if = out["interfaces"][0]["name"]
            ok = len(ips) == 1 and ipaddress.ip_address(op.address) in \
                ipaddress.ip_network(POOLS[slot.namespace][0])
        except (KeyError, IndexError, TypeError, ValueError):
            ok = False
        self.check("ADD result is an address of the pod's pool", ok,
                   f"ADD of {slot} answered {out!r}")

    # -- the runtime's semantics --------------------------------------------------
    def release_holds(self, slot: Slot, when: float):
        """A DEL of the slot's container started at ``when``: its hold may end."""
        if slot.hold is not None and slot.hold.released is None:
            slot.hold.released = when

    def new_hold(self, slot: Slot, address: str, host_if: str, add_done: float):
        slot.live, slot.host_if = address, host_if
        slot.hold = Hold(address, slot, slot.cid, add_done)
        with self._mu:
            self.holds.append(slot.hold)

    def runtime_add(self, slot: Slot, rnd):
        op = self.cni(slot, "add")
        if not op.ok:
            self.runtime_del(slot, rnd)          # kubelet: a failed ADD is DELeted
            return
        if op.address is None:
            return self.runtime_del(slot, rnd)
        slot.cache_lost = False                   # libcni cached this ADD's result
        if slot.live is not None:
            self.check("repeated ADD returns the address held", op.address == slot.live,
                       f"{slot} holds {slot.live}, a repeated ADD returned {op.address}", slot)
            if op.address == slot.live:
                return
        self.new_hold(slot, op.address, op.host_if, op.done)

    def runtime_del(self, slot: Slot, rnd):
        """DEL until it succeeds (kubelet retries a failed teardown)."""
        while True:
            started = time.monotonic()
            self.release_holds(slot, started)
            op = self.cni(slot, "del")
            if op.ok:
                break
            if time.monotonic() > self.hard_end:
                self.violation(f"DEL of {slot} still fails {RECOVERY:.0f} s after the run: "
                               f"{op.code} {op.msg}", slot)
                return
            time.sleep(rnd.uniform(0.05, 0.3))
        slot.live = slot.host_if = slot.hold = None
        slot.cache_lost = False
        if rnd.random() < 0.5:
            slot.gen += 1                         # a new sandbox; else the ID comes back

    def runtime_check(self, slot: Slot):
        op = self.cni(slot, "check")
        if not op.ok:
            no_cache = slot.cache_lost and op.code == 7 and "prevResult" in (op.msg or "")
            self.check("CHECK of an up container fails only with try-again",
                       op.code == TRY_AGAIN or no_cache, f"CHECK of {slot} holding "
                                                         f"{slot.live}: {op.code} {op.msg}",
                       slot)

    def race(self, slot: Slot, kinds: tuple, rnd):
        """Two calls for one container at once; then the runtime settles."""
        barrier = threading.Barrier(len(kinds))
        results: list = [None] * len(kinds)

        def call(i, kind):
            try:
                barrier.wait(10)
            except threading.BrokenBarrierError:
                pass
            results[i] = self.cni(slot, kind)

        threads = [threading.Thread(target=call, args=(i, k)) for i, k in enumerate(kinds)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with self._mu:
            self.ops[("race", "+".join(kinds))] += 1
        adds = [r for r in results if r.kind == "add"]
        dels = [r for r in results if r.kind == "del"]
        if dels:
            self.release_holds(slot, min(d.start for d in dels))
        if any(not r.ok or r.address is None for r in adds) or any(not r.ok for r in dels):
            return self.runtime_del(slot, rnd)   # something failed: the runtime tears down
        # every ADD and DEL succeeded: the container is up or gone, never half
        addresses = {r.address for r in adds}
        self.check("racing ADDs of one container return one address", len(addresses) <= 1,
                   f"{slot}: ADDs returned {sorted(addresses)}", slot)
        records = {a: r for a, r in self.reader.addresses().items()
                   if r["container_id"] == slot.cid}
        ifaces = pod_interfaces(slot.netns.name)
        on_pod = sorted(a for addrs in ifaces.values() for a in addrs)
        consistent = (not records and not ifaces) or \
            (len(records) == 1 and on_pod == sorted(records) and list(ifaces) == ["eth0"])
        if not self.check("after a race, etcd and the pod agree", consistent,
                          f"{'+'.join(kinds)} of {slot}: etcd holds {sorted(records)}, "
                          f"the pod has {ifaces}", slot):
            return self.runtime_del(slot, rnd)
        if not dels:
            self.check("ADDs without a DEL leave the container up", bool(records),
                       f"{'+'.join(kinds)} of {slot} succeeded and the pod has nothing", slot)
        if records:
            if dels:
                slot.cache_lost = True
            address = next(iter(records))
            self.check("the racing ADD's address is the one held",
                       not adds or address in addresses,
                       f"{slot}: etcd holds {address}, ADDs returned {sorted(addresses)}", slot)
            if slot.hold is not None and slot.hold.address == address:
                slot.hold.released = None            # the DEL ran before: still held
            else:
                done = min((r.done for r in adds if r.address == address), default=None)
                if done is None:
                    self.violation(f"{slot} holds {address} that no ADD returned", slot)
                    return self.runtime_del(slot, rnd)
                host_if = next(r.host_if for r in adds if r.address == address)
                self.new_hold(slot, address, host_if, done)
        else:
            slot.live = slot.host_if = slot.hold = None

    def step(self, slot: Slot, rnd):
        r = rnd.random()
        if r < 0.15:
            # a container that is down is raced by an ADD; one that is up, by anything
            kinds = [k for k in RACES if slot.live is not None or "add" in k]
            if kinds:
                return self.race(slot, rnd.choice(kinds), rnd)
        if slot.live is None:
            if r < 0.9:
                return self.runtime_add(slot, rnd)
            return self.runtime_del(slot, rnd)    # DEL of nothing is fine
        if r < 0.55:
            return self.runtime_del(slot, rnd)
        if r < 0.88:
            return self.runtime_check(slot)
        return self.runtime_add(slot, rnd)       # the same container ADDed again

    def worker(self, wid: int):
        rnd = random.Random(f"{self.seed}-worker-{wid}")
        try:
            while time.monotonic() < self.chaos_end:
                slot = rnd.choice(self.slots)
                if not slot.lock.acquire(timeout=0.1):
                    continue
                try:
                    self.step(slot, rnd)
                finally:
                    slot.lock.release()
        except Exception:
            self.violation(f"runtime worker {wid} crashed:\n{traceback.format_exc()}")

    # -- faults ---------------------------------------------------------------
    def fault_loop(self):
        rnd = random.Random(f"{self.seed}-faults")
        try:
            while not self.stop.wait(rnd.uniform(0.3, 1.5)):
                if time.monotonic() >= self.chaos_end:
                    break
                if not FAULTS:
                    continue
                kind = rnd.choices(FAULTS, [FAULT_WEIGHTS[f] for f in FAULTS])[0]
                if kind in ("coild-kill", "coild-term"):
                    node = rnd.choice(self.nodes)
                    self._expect_running(node)
                    if kind == "coild-kill":
                        node.coild.stop(signal.SIGKILL)
                        self.faults["coild SIGKILL"] += 1
                    else:
                        # once serving, a graceful stop drains the calls in flight and
                        # exits 0; before that, SIGTERM's default action may end it
                        pid = node.coild.proc.pid
                        serving = serves(node.coild.socket)
                        code = node.coild.stop(signal.SIGTERM, timeout=60)
                        if serving:
                            self.faults["coild SIGTERM"] += 1
                            self.check("coild exits 0 on SIGTERM", code == 0,
                                       f"coild of {node.name} (pid {pid}) exited with {code}:\n"
                                       f"{node.coild.log()[-1500:]}")
                        else:
                            self.faults["coild SIGTERM while starting"] += 1
                    self.stop.wait(rnd.uniform(0.0, 1.0))
                    node.coild.start(wait=False)
                elif kind == "etcd-freeze":
                    # a member that stops answering without closing anything:
                    # calls to it run into their deadline (outcome unknown)
                    i = self.cluster.leader() if rnd.random() < 0.5 else None
                    i = rnd.randrange(len(self.cluster)) if i is None else i
                    proc = self.cluster.procs[i]
                    proc.send_signal(signal.SIGSTOP)
                    self.faults["etcd member SIGSTOP"] += 1
                    try:
                        self.stop.wait(rnd.uniform(0.5, 4.0))
                    finally:
                        proc.send_signal(signal.SIGCONT)
                    self.cluster.wait_healthy([i])
                else:
                    i = self.cluster.leader() if kind == "etcd-leader" else None
                    if i is None:
                        kind, i = "etcd-member", rnd.randrange(len(self.cluster))
                    sig = rnd.choice([signal.SIGKILL, signal.SIGTERM])
                    self.cluster.stop_member(i, sig)
                    self.faults[f"{kind.replace('-', ' ')} {signal.Signals(sig).name}"] += 1
                    self.stop.wait(rnd.uniform(0.5, 3.0))
                    self.cluster.restart_member(i)
        except Exception:
            self.violation(f"fault thread crashed:\n{traceback.format_exc()}")
        finally:
            self.restore()

    def _expect_running(self, node: Node):
        p = node.coild.proc
        if p is not None and p.poll() is not None:
            self.violation(f"coild of {node.name} exited by itself with {p.returncode}:\n"
                           f"{node.coild.log()[-1500:]}")
            node.coild.stop()
            node.coild.start(wait=False)

    def restore(self):
        """Every member and every coild back, healthy and ready."""
        for i in range(len(self.cluster)):
            if not self.cluster.alive(i):
                self.cluster.start_member(i, state="existing")
        self.cluster.wait_healthy(range(len(self.cluster)))
        for node in self.nodes:
            self._expect_running(node)
            if node.coild.proc is None:
                node.coild.start(wait=False)
        for node in self.nodes:
            node.wait_ready()

    # -- checks -----------------------------------------------------------------
    def check_holds(self):
        """No address was held by two pods at once: of two holds of one
        address, one must have been released before the other's ADD returned."""
        by_address = collections.defaultdict(list)
        for h in self.holds:
            by_address[h.address].append(h)
        for address, holds in by_address.items():
            for a_i, a in enumerate(holds):
                for b in holds[a_i + 1:]:
                    a_rel = a.released if a.released is not None else float("inf")
                    b_rel = b.released if b.released is not None else float("inf")
                    overlap = a_rel > b.add_done and b_rel > a.add_done
                    self.check("no address has two owners", not overlap,
                               f"{address} held by {a.slot} ({a.cid}) and {b.slot} ({b.cid}) "
                               f"at once")

    def check_retired_gone(self):
        """The pairs DEL retired are deleted soon after (coild's deletion queue)."""
        def gone():
            left = [(ns, name) for ns in [n.netns.name for n in self.nodes] +
                    [s.netns.name for s in self.slots]
                    for name, group in ((link["ifname"], link.get("group"))
                                        for link in ip_json(ns, "link", "show"))
                    if group == RETIRED]
            self.retired_left = left
            return not left
        try:
            wait_for(gone, 30, 0.2, "the retired veths to be deleted")
            self.check("retired veths are deleted", True)
        except AssertionError:
            self.check("retired veths are deleted", False, f"left: {self.retired_left}")

    def check_state(self, final: bool):
        """etcd, the pods and the nodes agree with what the runtime was told."""
        records = self.reader.addresses()
        blocks = self.reader.blocks()
        up = {s.live: s for s in self.slots if s.live is not None}
        by_pod = {(s.namespace, s.pod): s for s in self.slots}
        what = "after the final DEL" if final else "at rest"
        for address, rec in records.items():
            slot = up.get(address)
            self.check(f"every etcd address belongs to an up pod ({what})", slot is not None,
                       f"etcd holds {address} for {rec['namespace']}/{rec['pod']} "
                       f"{rec['container_id']}, which no up pod has (leaked)",
                       by_pod.get((rec["namespace"], rec["pod"])))
            if slot is None:
                continue
            self.check("the record names the pod's container",
                       (rec["namespace"], rec["pod"], rec["container_id"]) ==
                       (slot.namespace, slot.pod, slot.cid), f"{address}: {rec} vs {slot}", slot)
            self.check("the address lies in a block of the pod's node",
                       blocks.get(rec["block"]) == slot.node.name,
                       f"{address} of {slot} is in block {rec['block']} of "
                       f"{blocks.get(rec['block'])}")
        for address, slot in up.items():
            self.check(f"every up pod's address is in etcd ({what})", address in records,
                       f"{slot} uses {address}, which etcd does not hold", slot)
        seen = {}
        self.check_retired_gone()
        for slot in self.slots:
            ifaces = pod_interfaces(slot.netns.name, retired=True)
            want = {"eth0": [slot.live]} if slot.live else {}
            self.check(f"the pod's interfaces match ({what})", ifaces == want,
                       f"{slot}: has {ifaces}, the runtime was told {want}", slot)
            for addrs in ifaces.values():
                for a in addrs:
                    self.check("no address on two pods", a not in seen,
                               f"{a} is on {slot} and on {seen.get(a)}")
                    seen[a] = slot
            if slot.live:
                routes = {(r.get("dst"), r.get("gateway"), r.get("dev"))
                          for r in ip_json(slot.netns.name, "route", "show")}
                self.check("the pod's routes are in place",
                           {("default", GATEWAY, "eth0"), (GATEWAY, None, "eth0")} <= routes,
                           f"{slot}: routes {sorted(map(str, routes))}")
        for node in self.nodes:
            mine = {s.host_if: s.live for s in self.slots if s.node is node and s.live}
            veths = {link["ifname"] for link in ip_json(node.netns.name, "link", "show",
                                                        "type", "veth")}
            self.check(f"the node has exactly the host veths of its up pods ({what})",
                       veths == set(mine), f"{node.name}: veths {sorted(veths)}, "
                                           f"up pods' {sorted(mine)}")
            routes = {r["dst"]: r.get("dev") for r in ip_json(node.netns.name, "route", "show")
                      if "/" not in r["dst"] and r["dst"] != "default"}
            self.check(f"the node routes exactly its up pods' addresses ({what})",
                       routes == {a: dev for dev, a in mine.items()},
                       f"{node.name}: routes {routes}, up pods {mine}")

    def check_table_119(self):
        """Table 119 of each node holds exactly its blocks (a scan in flight
        may lag for a moment: wait for agreement)."""
        def agree():
            blocks = self.reader.blocks()
            for node in self.nodes:
                routes = {r["dst"] for r in ip_json(node.netns.name, "route", "show",
                                                    "table", "119")}
                if routes != {b for b, n in blocks.items() if n == node.name}:
                    return False
            return True
        try:
            wait_for(agree, 30, 0.5, "table 119 to match the blocks in etcd")
            self.check("table 119 holds exactly the node's blocks", True)
        except AssertionError as exc:
            self.check("table 119 holds exactly the node's blocks", False, str(exc))

    def coild_tracebacks(self) -> list[str]:
        out = []
        for node in self.nodes:
            text = node.coild.log(tail=None)
            for m in re.finditer(r"Traceback \(most recent call last\)", text):
                out.append(f"{node.name}: {text[max(0, m.start() - 300):m.start() + 1500]}")
        return out

    def log_counts(self, *messages: str) -> dict:
        """How often each message appears in the coild logs (figures only)."""
        counts = dict.fromkeys(messages, 0)
        for node in self.nodes:
            text = node.coild.log(tail=None)
            for m in messages:
                counts[m] += text.count(m)
        return counts

    # -- the whole run ----------------------------------------------------------
    def run(self):
        self.t0 = time.monotonic()
        self.chaos_end = self.t0 + self.seconds
        self.hard_end = self.chaos_end + RECOVERY
        workers = [threading.Thread(target=self.worker, args=(w,), name=f"runtime-{w}")
                   for w in range(WORKERS)]
        faults = threading.Thread(target=self.fault_loop, name="faults")
        for t in workers + [faults]:
            t.start()
        faults.join()
        for t in workers:
            t.join(max(self.hard_end - time.monotonic(), 1) + 70)
            if t.is_alive():
                self.violation(f"{t.name} did not finish")
        self.stop.set()
        self.run_seconds = time.monotonic() - self.t0

        # at rest: every coild and member up, no call in flight
        self.check_holds()
        self.check_state(final=False)
        self.check_table_119()

        # the final DEL of everything, every coild up
        self.final_retries = 0
        for slot in self.slots:
            self.release_holds(slot, time.monotonic())
            for attempt in range(5):
                op = self.cni(slot, "del")
                if op.ok or op.code != TRY_AGAIN:
                    break
                self.final_retries += 1
                time.sleep(0.5)
            if self.check("the final DEL succeeds", op.ok, f"DEL of {slot}: {op.code} {op.msg}"):
                slot.live = slot.host_if = slot.hold = None
        self.check_state(final=True)
        try:
            wait_for(lambda: not self.reader.blocks(), 30, 0.5,
                     "the emptied blocks to go back to the pool")
            self.check("emptied blocks go back to the pool", True)
        except AssertionError as exc:
            self.check("emptied blocks go back to the pool", False,
                       f"{exc}: {self.reader.blocks()}")
        self.check_table_119()
        for tb in self.coild_tracebacks():
            self.violation(f"traceback in coild's log:\n{tb}")

    def figures(self) -> dict:
        return {"seed": self.seed, "seconds": round(self.run_seconds, 1),
                "nodes": len(self.nodes), "pods": len(self.slots), "workers": WORKERS,
                "operations": {f"{k[0]} {k[1]}": v for k, v in sorted(self.ops.items())},
                "operations_total": sum(v for k, v in self.ops.items() if k[0] != "race"),
                "faults": dict(sorted(self.faults.items())),
                "faults_total": sum(self.faults.values()),
                "errors": {f"{k[0]} code {k[1]}: {k[2]}": v
                           for k, v in sorted(self.errors.items(), key=str)},
                "errors_total": sum(self.errors.values()),
                "checks": dict(sorted(self.checks.items())),
                "checks_total": sum(self.checks.values()),
                "final_del_retries": self.final_retries,
                "violations": len(self.violations)}


@pytest.fixture
def hammer_env(tmp_path):
    base = tempfile.mkdtemp(prefix="coil-hammer-")   # short: UNIX socket paths
    cluster = EtcdCluster(base, 3)
    nodes, pods, reader = [], [], None
    prefix = f"/coilhammer-{uuid.uuid4().hex[:8]}/"
    try:
        cluster.start()
        from coil.config import EtcdConfig
        from coil.store import IPAMStore
        from coil.store.etcd import Etcd
        store = IPAMStore(Etcd(EtcdConfig(endpoints=(cluster.endpoint(0),), prefix=prefix,
                                          timeout=5.0)))
        try:
            for name, (subnet, size) in POOLS.items():
                store.create_pool(name, subnet, size)
        finally:
            store.close()
        endpoints = ",".join(cluster.unix_endpoints)
        for i in range(NODES):
            nodes.append(Node(i, str(tmp_path / f"node{i}"), endpoints, prefix))
        for n in nodes:
            n.start()
        for n in nodes:
            n.wait_ready()
        for _ in range(NODES * SLOTS):
            pods.append(Netns("pod"))
        reader = EtcdReader(cluster, prefix)
        yield cluster, nodes, pods, reader
    finally:
        if reader is not None:
            reader.close()
        for p in pods:
            p.delete()
        for n in nodes:
            n.close()
        cluster.close()
        shutil.rmtree(base, ignore_errors=True)


def test_hammer(hammer_env):
    cluster, nodes, pods, reader = hammer_env
    seed = int(os.environ.get("COIL_HAMMER_SEED") or int.from_bytes(os.urandom(4), "big"))
    print(f"hammer seed {seed}")
    hammer = Hammer(seed, cluster, nodes, reader, pods, SECONDS)
    hammer.run()
    fig = hammer.figures()
    # how often coild met an unknown outcome and fenced it (or could not yet)
    fig["coild_log"] = hammer.log_counts("address write fenced", "slot quarantined",
                                         "block lost, reloading")
    print("\nhammer figures:\n" + json.dumps(fig, indent=1))
    if REPORT:
        with open(REPORT, "w") as f:
            json.dump(fig, f, indent=1)
    replay = f"(seed {seed}; replay with COIL_HAMMER_SEED={seed} COIL_HAMMER_SECONDS={SECONDS:g})"
    if hammer.violations:
        # keep the logs for the post-mortem: the test's own directories go away
        keep = tempfile.mkdtemp(prefix=f"coil-hammer-{seed}-")
        for node in nodes:
            shutil.copy(node.coild.log_path, os.path.join(keep, f"{node.name}.log"))
        replay += f"; coild logs in {keep}"
    # the run did what it claims: traffic, faults of every kind, races
    assert fig["operations_total"] >= 50, f"too little traffic {replay}"
    assert hammer.faults or not FAULTS, f"no fault was injected {replay}"
    assert not RACES or any(k[0] == "race" for k in hammer.ops), f"no race ran {replay}"
    assert not hammer.violations, \
        f"{len(hammer.violations)} violations {replay}:\n" + "\n".join(hammer.violations[:30])
