"""The sandbox's network: the fabric namespace with its bridge, one namespace
per node wired to it by a veth, and each node's CNI directory (the ``coil``
plugin and its conflist). Mixed into :class:`coil.sandbox.cluster.Sandbox`.

Nothing here touches the root network namespace: links are created directly
inside the namespaces (``ip -n NS``) and sysctls through ``ip netns exec``.
"""

from __future__ import annotations

import concurrent.futures as futures
import ipaddress
import json
import os
import sys

from coil.sandbox.config import Config, node_name
from coil.sandbox.shell import ip_batch, run


def plugin_path() -> str:
    """What the node's CNI bin dir ``coil`` points at: the native launcher,
    else the Python entry point next to this interpreter."""
    from coil import launcher_path
    native = launcher_path()
    if native and os.environ.get("COIL_PURE_PYTHON", "") in ("", "0"):
        return native
    return os.path.join(os.path.dirname(sys.executable), "hypercoil")


def plan_nodes(cfg: Config, state) -> dict:
    """The nodes' facts (namespace, fabric address, files) for ``cfg``."""
    fabric_net = ipaddress.ip_network(cfg.fabric_subnet)
    nodes = {}
    for i in range(1, cfg.nodes + 1):
        name = node_name(i)
        ndir = state.path_of(name)
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
    return nodes


class Topology:
    """Creates the fabric and the node namespaces (uses ``self.state``)."""

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
