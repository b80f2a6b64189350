"""One default plugin socket everywhere: coil/cni/protocol.py names it, and
coild's --socket default, the plugin, the installer's default conflist,
the manifests in deploy/ and every page of the docs say the same path.
(The native launcher's is checked in test_launcher.py: it is compiled
from protocol.py.)"""

from __future__ import annotations

import glob
import json
import os
import re

import yaml

from coil.cni import plugin, protocol

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# a path of coild's plugin socket as the docs and manifests spell one
# (the API socket, coild-api.sock or api.sock, is another socket)
PLUGIN_SOCKET = re.compile(r"/run/[\w./-]*coild\.sock")


def test_protocol_default_is_under_the_mounted_directory():
    assert protocol.DEFAULT_SOCKET == "/run/coild/coild.sock"


def test_coild_flag_default():
    from coil.coild.main import cli
    (opt,) = [p for p in cli.params if p.name == "socket_path"]
    assert opt.default == protocol.DEFAULT_SOCKET


def test_plugin_and_installer():
    from coil.installer.main import DEFAULT_NETCONF
    assert plugin.DEFAULT_SOCKET == protocol.DEFAULT_SOCKET
    (coil,) = [p for p in DEFAULT_NETCONF["plugins"] if p["type"] == "coil"]
    assert coil["socket"] == protocol.DEFAULT_SOCKET


def test_deploy_manifests():
    docs = []
    for path in glob.glob(os.path.join(REPO, "deploy", "*.yaml")):
        with open(path) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and "cni_netconf" in d["data"]]
    conf = json.loads(cm["data"]["cni_netconf"])
    assert [p["socket"] for p in conf["plugins"] if p["type"] == "coil"] == \
        [protocol.DEFAULT_SOCKET]
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    (coild,) = [c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "coild"]
    args = coild["command"] + coild.get("args", [])
    assert f"--socket={protocol.DEFAULT_SOCKET}" in args
    assert os.path.dirname(protocol.DEFAULT_SOCKET) in [m["mountPath"]
                                                       for m in coild["volumeMounts"]]


def test_every_mention_in_docs_and_deploy():
    files = (glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
             + glob.glob(os.path.join(REPO, "docs", "img", "*.dot"))
             + glob.glob(os.path.join(REPO, "deploy", "*"))
             + [os.path.join(REPO, "README.md")])
    seen, wrong = 0, []
    for path in files:
        if not os.path.isfile(path):
            continue
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                for m in PLUGIN_SOCKET.finditer(line):
                    seen += 1
                    if m.group(0) != protocol.DEFAULT_SOCKET:
                        wrong.append(f"{os.path.relpath(path, REPO)}:{n}: {m.group(0)}")
    assert wrong == []
    assert seen >= 5         # the pages that name it: coild.md, cni.md, coil-installer.md, ...


# -- the root-only REST socket: one default too ---------------------------------------
API_SOCKET = re.compile(r"/run/[\w./-]*api\.sock")


def test_api_socket_default_is_the_daemonsets():
    from coil.coild import DEFAULT_API_SOCKET
    from coil.coild.main import cli
    (opt,) = [p for p in cli.params if p.name == "api_socket"]
    assert opt.default == DEFAULT_API_SOCKET == "/run/coild/api.sock"
    # next to the plugin socket, in the directory the DaemonSet mounts
    assert os.path.dirname(DEFAULT_API_SOCKET) == os.path.dirname(protocol.DEFAULT_SOCKET)
    wrong = []
    for path in (glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
                 + glob.glob(os.path.join(REPO, "deploy", "*.yaml"))
                 + [os.path.join(REPO, "README.md")]):
        with open(path, errors="replace") as f:
            for n, line in enumerate(f, 1):
                # the sandbox's per-node sockets live in its state directory
                wrong += [f"{os.path.relpath(path, REPO)}:{n}: {m.group(0)}"
                          for m in API_SOCKET.finditer(line) if m.group(0) != DEFAULT_API_SOCKET]
    assert wrong == []
