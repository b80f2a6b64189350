"""The sandbox's pods: one network namespace each, wired to its node by the
coil plugin through the built-in CNI executor (coil/sandbox/cniexec.py),
with static neighbour entries on both ends; removed with CNI DEL. Mixed
into :class:`coil.sandbox.cluster.Sandbox`.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
import subprocess
import uuid

from coil.sandbox import cniexec
from coil.sandbox.config import GATEWAY, REFERENCE_PLUGINS, SandboxError
from coil.sandbox.shell import Progress, ip_batch, netns_exists, run


class Pods:
    """Creates and deletes pods (uses ``self.state`` and ``self.node``)."""

    def add_pods(self, wanted: list[tuple[str, str, int]], progress=None, tag: str | None = None,
                 names: list[str] | None = None) -> list[dict]:
        """Create pods: ``wanted`` is [(node, k8s namespace, count)] (or give
        explicit ``names`` with one entry in ``wanted``). Pods are named
        NODE-TAGnn, TAG "p" for namespace default, else the namespace's first
        letter, unless ``tag`` is given. Each pod is a netns
        wired by the coil plugin through the libcni client, CNI ADDs run
        in parallel. Raises SandboxError naming the pods that failed (those
        stay recorded, so ``down`` still removes them)."""
        progress = progress or Progress(quiet=True)
        st = self.state
        cfg = self.config
        existing = {p["name"] for p in st.pods}
        new = []
        for node, namespace, count in wanted:
            self.node(node)          # raises SandboxError for an unknown node
            if names:
                dup = [x for x in names if x in existing]
                if dup:
                    raise SandboxError(f"pod(s) {', '.join(dup)} exist already")
                pnames = list(names)
            else:
                t = tag or ("p" if namespace == "default" else namespace[:1])
                pnames, i = [], 0
                while len(pnames) < count:
                    i += 1
                    if f"{node}-{t}{i:02d}" not in existing:
                        pnames.append(f"{node}-{t}{i:02d}")
            for pname in pnames:
                existing.add(pname)
                new.append({"name": pname, "namespace": namespace, "node": node,
                            "netns": f"{cfg.name}-{pname}",
                            "container_id": f"{cfg.name}-{pname}-{uuid.uuid4().hex[:8]}",
                            "ifname": "eth0", "address": None})
        if not new:
            return []
        taken = [p["netns"] for p in new if netns_exists(p["netns"])]
        if taken:
            raise SandboxError(f"network namespace(s) {', '.join(taken[:5])} already exist")
        st.pods.extend(new)
        st.record_namespaces([p["netns"] for p in new])     # saves
        ip_batch([f"netns add {p['netns']}" for p in new])
        self._loopback_up([p["netns"] for p in new])
        total = len(new)
        done = 0
        failed = []
        parallel = cfg.parallel or 2 * (os.cpu_count() or 2)   # CPU-bound: more is slower
        step = max(1, -(-total // 5))
        with futures.ThreadPoolExecutor(min(parallel, total)) as pool:
            jobs = {pool.submit(self._add_one, p): p for p in new}
            for fut in futures.as_completed(jobs):
                p = jobs[fut]
                rc, out = fut.result()
                done += 1
                if rc == 0:
                    p["address"] = out["ips"][0]["address"].split("/")[0]
                    p["host_veth"] = out["interfaces"][0]["name"]
                    p["mac"] = out["interfaces"][1].get("mac")
                else:
                    failed.append((p["name"], out))
                if done % step == 0 or done == total:
                    progress(f"pods: {done}/{total} created" + (f", {len(failed)} failed"
                                                                 if failed else ""))
        st.save()
        self._static_neighbours([p for p in new if p.get("address")])
        if failed:
            name, out = failed[0]
            raise SandboxError(f"CNI ADD failed for {len(failed)} pod(s), first {name}: "
                               f"{json.dumps(out)}")
        return new

    def _static_neighbours(self, pods: list[dict]):
        """Permanent ARP entries on both ends of each pod's veth.

        The kernel's IPv4 neighbour table is shared by *all* network
        namespaces and the garbage-collection limit (gc_thresh3, 1024 by
        default) can only be raised in the root namespace, which the
        sandbox never touches. Hundreds of pods in one kernel (a real
        cluster spreads them over many) would overflow it ("neighbor table
        overflow", pings lost) -- permanent entries are exempt from that
        limit. Only the sandbox needs this; the wiring is coild's. The pod
        side is done right after each ADD (_add_one), the node side here,
        one ``ip -batch`` per node."""
        by_node: dict[str, list[str]] = {}
        for p in pods:
            if p.get("mac") and p.get("host_veth"):
                by_node.setdefault(p["node"], []).append(
                    f"neigh replace {p['address']} lladdr {p['mac']} dev {p['host_veth']} "
                    "nud permanent")

        for node, lines in by_node.items():
            r = subprocess.run(["ip", "-n", self.node(node)["netns"], "-force", "-batch", "-"],
                               input="\n".join(lines) + "\n", capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                raise SandboxError(f"static neighbours on {node}: {r.stderr.strip()}")

    def _loopback_up(self, netns_names: list[str]):
        """lo up in fresh pod namespaces, in-process (one netlink socket per
        namespace, no fork per pod)."""
        try:
            from coil import net
            for ns in netns_names:
                with net.open_netlink(f"/run/netns/{ns}") as nl:
                    lo = nl.link_get("lo")
                    nl.link_set(lo.index, up=True)
        except Exception:          # noqa: BLE001 - fall back to ip, one per namespace
            for ns in netns_names:
                run("ip", "-n", ns, "link", "set", "lo", "up")

    def _add_one(self, p: dict):
        """CNI ADD, then the pod side of the static neighbour entries (see
        _static_neighbours)."""
        rc, out = self._cni("add", p)
        if rc == 0:
            host_mac = out["interfaces"][0].get("mac")
            if host_mac:
                r = run("ip", "-n", p["netns"], "neigh", "replace", GATEWAY, "lladdr", host_mac,
                        "dev", p["ifname"], "nud", "permanent", check=False)
                if r.returncode != 0:
                    return 1, {"msg": f"static neighbour in {p['netns']}: {r.stderr.strip()}"}
        return rc, out

    def _cni(self, command: str, p: dict):
        """Run the node's conflist for pod ``p`` with the built-in executor
        (plugins run in the node's namespace, as the runtime's would):
        (0, result) or (1, the CNI error object)."""
        n = self.node(p["node"])
        ex = cniexec.Executor([n["cni_bin"], REFERENCE_PLUGINS], n["cni_cache"],
                              wrapper=["ip", "netns", "exec", n["netns"]])
        rt = cniexec.Runtime.for_pod(p["container_id"], f"/run/netns/{p['netns']}",
                                     p["ifname"], p["namespace"], p["name"])
        try:
            conf = ex.load(n["conflist"])
            out = getattr(ex, {"add": "add", "del": "delete", "check": "check"}[command])(conf, rt)
        except cniexec.CNIExecError as exc:
            return 1, exc.to_json()
        return 0, out or {}

    def delete_pod(self, name: str) -> dict:
        """CNI DEL the pod, remove its namespace and its record. Raises
        SandboxError when DEL fails (the pod then stays)."""
        with self.state.locked():
            p = self.pod(name)
            rc, out = self._cni("del", p)
            if rc != 0:
                raise SandboxError(f"CNI DEL {name}: {json.dumps(out)}")
            run("ip", "netns", "del", p["netns"], check=False)
            self.state.data["pods"] = [q for q in self.state.pods if q["name"] != name]
            self.state.forget_namespaces([p["netns"]])
            self.state.save()
        return p

    def create_pods(self, node: str, count: int = 1, namespace: str = "default",
                    tag: str = "x") -> list[dict]:
        """Add ``count`` more pods on ``node`` (locked; for tests and users)."""
        with self.state.locked():
            return self.add_pods([(node, namespace, count)], tag=tag)
