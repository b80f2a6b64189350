"""Integration fixtures: throw-away network namespaces.

``netns_factory`` creates namespaces named ``coiltest-<random>`` with
``ip netns add`` and deletes every one of them at teardown, also when the
test fails. Tests must do all their network changes inside those
namespaces, never in the root namespace.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

import pytest


class NetNS:
    """A named network namespace made by ``ip netns add``."""

    def __init__(self, name: str):
        self.name = name
        self.path = f"/run/netns/{name}"

    def run(self, *cmd: str, check: bool = False, timeout: float = 20):
        """Run a command inside the namespace (``ip netns exec``)."""
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd],
                              capture_output=True, text=True, check=check,
                              timeout=timeout)

    def __repr__(self) -> str:
        return f"NetNS({self.name!r})"


def _need_netns():
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")


@pytest.fixture
def netns_factory():
    """``make(lo_up=False) -> NetNS``; all namespaces are removed at teardown."""
    _need_netns()
    created: list[NetNS] = []

    def make(lo_up: bool = False) -> NetNS:
        ns = NetNS(f"coiltest-{uuid.uuid4().hex[:10]}")
        subprocess.run(["ip", "netns", "add", ns.name], check=True,
                       capture_output=True, timeout=20)
        created.append(ns)
        if lo_up:
            ns.run("ip", "link", "set", "lo", "up", check=True)
        return ns

    try:
        yield make
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns.name],
                           capture_output=True, timeout=20)
