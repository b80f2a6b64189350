"""The timeouts of the CNI path nest: coild's request deadline < the
plugin's connect + answer timeouts < the runtime's 120 s (docs/cni.md)."""

from __future__ import annotations

import os
import re

import pytest

from coil.cni import plugin
from coil.cni import service as cniservice

RUNTIME_LIMIT = 120.0      # kubelet/containerd: one CNI call
LAUNCHER = os.path.join(os.path.dirname(cniservice.__file__), "..", "_fast", "launcher.c")


def _define(name: str) -> float:
    with open(LAUNCHER) as f:
        m = re.search(rf"#define {name} (\d+)", f.read())
    assert m, name
    return int(m.group(1)) / 1000


def test_python_plugin_timeouts_nest():
    total = plugin.CONNECT_TIMEOUT + plugin.RELAY_TIMEOUT
    assert cniservice.REQUEST_TIMEOUT < plugin.RELAY_TIMEOUT
    assert cniservice.REQUEST_TIMEOUT < total < RUNTIME_LIMIT


def test_launcher_timeouts_nest_and_match_the_python_plugin():
    connect, answer = _define("COIL_CONNECT_TIMEOUT_MS"), _define("COIL_RELAY_TIMEOUT_MS")
    assert (connect, answer) == (plugin.CONNECT_TIMEOUT, plugin.RELAY_TIMEOUT)
    assert cniservice.REQUEST_TIMEOUT < answer
    assert cniservice.REQUEST_TIMEOUT < connect + answer < RUNTIME_LIMIT


def _full_listener(path: str):
    """A UNIX socket whose listen queue is full (nobody accepts): a
    connect() to it blocks. Returns the sockets to close."""
    import socket
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    held = [server]
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.setblocking(False)
        held.append(c)
        try:
            c.connect(path)
        except BlockingIOError:
            return held


@pytest.mark.parametrize("kind", ["c", "python"])
def test_connect_to_a_stuck_coild_gives_up(kind, tmp_path):
    """coild alive but not accepting (its listen queue full): the plugin
    stops waiting after its connect timeout and answers error 11."""
    import json
    import subprocess
    import sys
    from test_launcher import _compile
    path = str(tmp_path / "s.sock")
    held = _full_listener(path)
    try:
        if kind == "c":
            exe = str(tmp_path / "coil")
            _compile(exe, sys.executable, "-DCOIL_CONNECT_TIMEOUT_MS=300")
            argv = [exe]
        else:
            argv = [sys.executable, "-c", "import sys, coil.cni.plugin as p; "
                    "p.CONNECT_TIMEOUT = 0.3; sys.exit(p.main([]))"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env["CNI_COMMAND"] = "ADD"
        conf = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "coil", "socket": path})
        proc = subprocess.run(argv, input=conf.encode(), env=env, capture_output=True,
                              timeout=60)       # a hang guard only: it must not block
    finally:
        for s in held:
            s.close()
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 11 and err["msg"].startswith(f"coild is not reachable at {path}: ")
