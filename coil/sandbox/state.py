"""The sandbox's state directory: what ``up`` made, so ``down`` can undo it.

Layout of STATE_DIR (default /run/coil-sandbox)::

    state.json        every namespace, process (PID + start time), pod and file
    state.lock        flock: one up/down/restart at a time
    etcd/             etcd's data dir, log and UNIX socket ``etcd.sock:0``
    node1/            coild.sock, coild.log, bird.conf, bird.ctl, bird.log,
                      net.conflist, bin/coil, cni-cache/, pods.list
    ...

``state.json`` is rewritten atomically (temp file + rename) *before* each
creation step records its intent (namespaces are recorded, then created) and
right after each process is started (its PID is only known then), so a crash
of ``up`` at any point leaves a file that names everything that may exist.
A process is identified by PID *and* its start time in /proc, so ``down``
never signals an unrelated process that reused the PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import time

from coil.errors import CoilError

STATE_FILE = "state.json"
LOCK_FILE = "state.lock"
DEFAULT_STATE_DIR = "/run/coil-sandbox"
FORMAT = 1


class StateError(CoilError):
    """The state directory is unusable (busy, foreign, corrupt)."""


def proc_starttime(pid: int) -> int | None:
    """Start time of PID in clock ticks since boot, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])      # field 22 overall


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


class Proc(dict):
    """A process record: role, node, pid, starttime, argv, log."""

    def alive(self) -> bool:
        """True when the recorded process still runs (same PID *and* start
        time, and not a zombie)."""
        pid = self.get("pid")
        if not pid:
            return False
        if proc_starttime(pid) != self.get("starttime"):
            return False
        return proc_state(pid) not in (None, "Z", "X")

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if the process is still the one we started."""
        if not self.alive():
            return False
        try:
            os.kill(self["pid"], sig)
            return True
        except ProcessLookupError:
            return False


def stop_processes(procs: list[Proc], timeout: float = 5.0, reap=None) -> list[Proc]:
    """SIGTERM every live process of ``procs`` (by PID), wait up to
    ``timeout``, then SIGKILL what is left. ``reap(pid)`` is called while
    waiting so that children of this very process do not stay zombies.
    Returns the records that had to be killed. Safe to repeat."""
    live = [p for p in procs if p.signal(signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    killed = []
    while live:
        for p in live:
            if reap:
                reap(p["pid"])
        live = [p for p in live if p.alive()]
        if not live:
            break
        if time.monotonic() >= deadline:
            for p in live:
                if p.signal(signal.SIGKILL):
                    killed.append(p)
            end = time.monotonic() + 5
            while any(p.alive() for p in live) and time.monotonic() < end:
                for p in live:
                    if reap:
                        reap(p["pid"])
                time.sleep(0.02)
            break
        time.sleep(0.02)
    return killed


class State:
    """state.json of one sandbox, loaded and saved atomically.

    ``data`` keys: format, name, created_dir, started_at, config, fabric,
    namespaces (creation order), nodes ({name: {...}}), processes
    ([Proc]), pods ([{...}]), extra_dirs.
    """

    def __init__(self, directory: str):
        self.dir = os.path.abspath(directory)
        self.path = os.path.join(self.dir, STATE_FILE)
        self.data: dict = {}
        self._lock_fd = None

    # -- files -------------------------------------------------------------
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> "State":
        """Read state.json. Raises StateError when it is corrupt."""
        try:
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)
        except FileNotFoundError:
            self.data = {}
        except ValueError as exc:
            raise StateError(f"{self.path} is corrupt: {exc}") from None
        self.data["processes"] = [Proc(p) for p in self.data.get("processes", [])]
        return self

    def save(self):
        """Write state.json atomically (temp file, fsync, rename)."""
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def path_of(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    # -- locking -----------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, create: bool = False, wait: float = 30.0):
        """Hold the directory's flock (one mutating command at a time).
        With ``create`` the directory is made first (and recorded as ours
        when it did not exist)."""
        created = False
        if create and not os.path.isdir(self.dir):
            os.makedirs(self.dir, mode=0o700)
            created = True
        if not os.path.isdir(self.dir):
            yield None
            return
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StateError(f"{self.dir} is busy (another sandbox command holds "
                                     f"{LOCK_FILE})") from None
                time.sleep(0.1)
        try:
            self.load()
            if created:
                self.data.setdefault("created_dir", True)
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # -- records -----------------------------------------------------------
    @property
    def processes(self) -> list[Proc]:
        return self.data.setdefault("processes", [])

    @property
    def namespaces(self) -> list[str]:
        return self.data.setdefault("namespaces", [])

    @property
    def pods(self) -> list[dict]:
        return self.data.setdefault("pods", [])

    @property
    def nodes(self) -> dict:
        return self.data.setdefault("nodes", {})

    def record_namespaces(self, names, save: bool = True):
        """Record namespaces about to be created (before creating them)."""
        have = set(self.namespaces)
        self.namespaces.extend(n for n in names if n not in have)
        if save:
            self.save()

    def forget_namespaces(self, names):
        gone = set(names)
        self.data["namespaces"] = [n for n in self.namespaces if n not in gone]

    def record_process(self, role: str, node: str | None, pid: int, argv: list[str],
                       log: str | None) -> Proc:
        """Record a process just started (saved at once)."""
        p = Proc(role=role, node=node, pid=pid, starttime=proc_starttime(pid), argv=argv,
                 log=log, started_at=time.time())
        self.processes.append(p)
        self.save()
        return p

    def process(self, role: str, node: str | None = None) -> Proc | None:
        """The newest record of ``role`` on ``node``."""
        for p in reversed(self.processes):
            if p.get("role") == role and p.get("node") == node:
                return p
        return None
