"""What the sandbox reports: routes (table 119, BIRD's routes, what is
missing), ``status`` (one JSON-able document) and ``check`` (pings across
nodes and pools, BGP sessions, routes). Read-only. Mixed into
:class:`coil.sandbox.cluster.Sandbox`.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import time

from coil.sandbox import bird
from coil.sandbox.config import SandboxError
from coil.sandbox.shell import Progress, netns_exists, run


class Report:
    """Routes, status and check of a running sandbox."""

    def table119(self, node: str) -> list[str]:
        out = run("ip", "-n", self.node(node)["netns"], "route", "show", "table", "119").stdout
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def bird_routes(self, node: str) -> list[dict]:
        """Routes BIRD installed in the node's main table (proto bird)."""
        out = run("ip", "-j", "-n", self.node(node)["netns"], "route", "show", "proto",
                  "bird").stdout
        return json.loads(out) if out.strip() else []

    def missing_routes(self) -> dict[str, list[str]]:
        """{node: [blocks of other nodes it has no BGP route for]}."""
        blocks = self.store().all_blocks()
        missing = {}
        for node in self.node_names():
            have = {r["dst"] for r in self.bird_routes(node)}
            want = [b.cidr for b in blocks if b.node != node and b.node in self.state.nodes]
            lack = [c for c in want if c not in have]
            if lack:
                missing[node] = lack
        return missing

    def wait_routes(self, timeout: float = 30, progress=None) -> None:
        """Wait until every node has a BGP route to every block of the other
        nodes in its main table. Raises SandboxError naming what is missing."""
        deadline = time.monotonic() + timeout
        while True:
            missing = self.missing_routes()
            if not missing:
                if progress:
                    n = len(self.store().all_blocks())
                    progress(f"routes converged: every node routes the {n} blocks of the others")
                return
            if time.monotonic() >= deadline:
                raise SandboxError(f"routes missing after {timeout:g}s: {missing}")
            time.sleep(0.2)

    def status(self) -> dict:
        """Everything a user wants to see, as one JSON-able document."""
        st = self.state.load()
        if not st.data.get("nodes"):
            raise SandboxError(f"no sandbox in {self.dir} (run 'hypercoil sandbox up')")
        cfg = self.config
        etcd = st.process("etcd", None)
        data = {"name": cfg.name, "state_dir": self.dir, "ready": st.data.get("ready", False),
                "up_seconds": st.data.get("up_seconds"),
                "started_at": st.data.get("started_at"),
                "fabric": st.data.get("fabric"),
                "etcd": {"endpoint": self.etcd_endpoint, "pid": etcd and etcd["pid"],
                         "running": bool(etcd and etcd.alive())},
                "pools": [], "nodes": [], "pods": []}
        blocks, addrs = [], []
        try:
            s = self.store()
            data["pools"] = [p.to_json() for p in s.list_pools()]
            blocks = s.all_blocks()
            addrs, _ = s.all_addresses()
        except Exception as exc:      # noqa: BLE001 - etcd down: show the rest
            data["etcd"]["error"] = str(exc).splitlines()[0]
        used = {}
        for a in addrs:
            used[a.block] = used.get(a.block, 0) + 1
        by_cid = {a.container_id: a for a in addrs}
        for name, n in st.nodes.items():
            coild, b = st.process("coild", name), st.process("bird", name)
            entry = {"name": name, "netns": n["netns"], "address": n["address"],
                     "coild": {"pid": coild and coild["pid"], "running": bool(coild and coild.alive()),
                               "socket": n["coild_socket"], "log": coild and coild["log"]},
                     "bird": {"pid": b and b["pid"], "running": bool(b and b.alive()),
                              "ctl": n["bird_ctl"], "config": n["bird_conf"]},
                     "blocks": [{"pool": blk.pool, "block": blk.cidr, "used": used.get(blk.cidr, 0),
                                 "free": blk.size - used.get(blk.cidr, 0)}
                                for blk in blocks if blk.node == name],
                     "table119": [], "bgp": [], "routes": []}
            if netns_exists(n["netns"]):
                entry["table119"] = self.table119(name)
                entry["routes"] = [f"{r['dst']} via {r.get('gateway', '?')} dev {r.get('dev', '?')}"
                                   for r in self.bird_routes(name)]
            try:
                entry["bgp"] = [{"peer": s["name"], "state": s["state"], "info": s["info"],
                                 "since": s["since"], "established": s["established"]}
                                for s in bird.bgp_sessions(n["bird_ctl"])]
            except bird.BirdError as exc:
                entry["bird"]["error"] = str(exc)
            data["nodes"].append(entry)
        for p in st.pods:
            rec = by_cid.get(p["container_id"])
            data["pods"].append({"name": p["name"], "namespace": p["namespace"],
                                 "node": p["node"], "netns": p["netns"],
                                 "address": rec.address if rec else p.get("address"),
                                 "in_etcd": rec is not None, "container_id": p["container_id"]})
        for ext in self._extensions():
            if hasattr(ext, "on_status"):
                ext.on_status(self, data)
        return data

    def check(self, progress=None, parallel: int = 16) -> dict:
        """Every pod pings one pod on every other node, a pod on every node
        pings each namespace-pool pod; BGP sessions and routes are checked.
        Returns {"ok": bool, "matrix": ..., "failures": [...], ...}."""
        progress = progress or Progress(quiet=True)
        st = self.state.load()
        if not st.data.get("nodes"):
            raise SandboxError(f"no sandbox in {self.dir} (run 'hypercoil sandbox up')")
        nodes = list(st.nodes)
        pods = [p for p in st.pods if p.get("address")]
        default = {n: [p for p in pods if p["node"] == n and p["namespace"] == "default"]
                   for n in nodes}
        special = [p for p in pods if p["namespace"] != "default"]
        target = {n: ps[0] for n, ps in default.items() if ps}
        plan = []
        for p in pods:
            for other in nodes:
                if other != p["node"] and other in target:
                    plan.append((p, target[other], "pod"))
        for sp in special:
            for n in nodes:
                if n in target and target[n] is not sp:
                    plan.append((target[n], sp, sp["namespace"]))
        failures = []

        def ping(job):
            src, dst, _ = job
            for _ in range(2):          # one retry: the first packet may race an ARP reply
                r = run("ip", "netns", "exec", src["netns"], "ping", "-c1", "-W1", "-q",
                        dst["address"], check=False, timeout=10)
                if r.returncode == 0:
                    return True, ""
            return False, (r.stderr.strip() or r.stdout.strip().splitlines()[-1:] or [""])[0]

        matrix = {a: {b: [0, 0] for b in nodes} for a in nodes}
        special_res = {}
        with futures.ThreadPoolExecutor(parallel) as pool:
            for job, (ok, why) in zip(plan, pool.map(ping, plan)):
                src, dst, kind = job
                if kind == "pod":
                    cell = matrix[src["node"]][dst["node"]]
                    cell[1] += 1
                    cell[0] += ok
                else:
                    r = special_res.setdefault(dst["name"], {"pod": dst["name"],
                                                             "namespace": dst["namespace"],
                                                             "address": dst["address"],
                                                             "node": dst["node"],
                                                             "reached_from": [], "failed_from": []})
                    r["reached_from" if ok else "failed_from"].append(src["node"])
                if not ok:
                    failures.append(f"{src['name']} ({src['address']}) -> {dst['name']} "
                                    f"({dst['address']} on {dst['node']}): {why}")
        progress(f"pings: {len(plan) - len(failures)}/{len(plan)} answered")
        bgp = {}
        for n in nodes:
            try:
                sessions = bird.bgp_sessions(st.nodes[n]["bird_ctl"])
            except bird.BirdError as exc:
                failures.append(f"{n}: BIRD: {exc}")
                continue
            bgp[n] = {s["name"]: s["info"] or s["state"] for s in sessions}
            for s in sessions:
                if not s["established"]:
                    failures.append(f"{n}: BGP session {s['name']} is {s['state']} {s['info']}")
            if len(sessions) != len(nodes) - 1:
                failures.append(f"{n}: {len(sessions)} BGP sessions, want {len(nodes) - 1}")
        try:
            missing = self.missing_routes()
        except Exception as exc:     # noqa: BLE001
            missing = {}
            failures.append(f"etcd: {str(exc).splitlines()[0]}")
        for n, lack in missing.items():
            failures.append(f"{n}: no route to block(s) {', '.join(lack)}")
        unwired = [p["name"] for p in st.pods if not p.get("address")]
        for name in unwired:
            failures.append(f"pod {name} has no address")
        if not plan and len(nodes) > 1:
            failures.append("nothing to ping: no pods (up --pods N)")
        return {"ok": not failures, "pings": len(plan), "failures": failures,
                "matrix": matrix, "special": list(special_res.values()), "bgp": bgp,
                "missing_routes": missing}
