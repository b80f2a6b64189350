"""The timeouts of the CNI path nest: coild's request deadline < the
plugin's connect + answer timeouts < the runtime's 120 s (docs/cni.md)."""

from __future__ import annotations

import os
import re

from coil.cni import plugin
from coil.coild import cniservice

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
