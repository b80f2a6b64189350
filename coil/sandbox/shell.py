"""Running commands for the sandbox: ``run`` (one command, its error as a
SandboxError), ``ip_batch`` (many ``ip`` lines in one process), namespace
existence, where a tool is, the tail of a log, and ``Progress`` lines."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from coil.sandbox.config import SandboxError


def tool(name: str, hint: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)
    if not path:
        raise SandboxError(f"{name} not found: {hint}")
    return path


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


def tail(path: str | None, lines: int = 15) -> str:
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"
