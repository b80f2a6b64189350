"""The whole design, end to end: several nodes in network namespaces, real
etcd, coild, the coil CNI plugin through libcni, BIRD exchanging table 119
by BGP, pods talking across nodes.

The first group shares one 3-node sandbox (module fixture); each test leaves
it working for the next. The last group builds its own sandboxes to test
the life cycle itself: a crashed ``up``, ``down`` twice, and that the root
network namespace and the process list are exactly as before.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys

from helpers import wait_for

from coil.sandbox import bird
from coil.sandbox.cluster import Config, Sandbox


def wait_until(probe, timeout=15.0, interval=0.1, what="condition"):
    return wait_for(probe, timeout=timeout, interval=interval, what=what)


def ping(sb: Sandbox, pod: str, address: str) -> bool:
    return sb.pod_exec(pod, "ping", "-c1", "-W1", "-q", address, check=False).returncode == 0


def pods_on(sb: Sandbox, node: str, namespace: str = "default") -> list[dict]:
    return [p for p in sb.state.pods if p["node"] == node and p["namespace"] == namespace]


def held_addresses(sb: Sandbox) -> dict:
    addrs, _ = sb.store().all_addresses()
    return {a.address: a for a in addrs}


def published(block: str, table119: list[str]) -> bool:
    """coild's route for ``block`` is in the lines of ``ip route show table 119``."""
    return any(line.startswith(f"{block} dev lo proto 30") for line in table119)


def default_blocks(sb: Sandbox, node: str) -> list[str]:
    return sorted(b.cidr for b in sb.store().node_blocks(node) if b.pool == "default")


# -- one shared sandbox ------------------------------------------------------

def test_cross_node_connectivity(sandbox):
    res = sandbox.check()
    assert res["ok"], res["failures"]
    # every pod (9 default + 1 global) x 2 other nodes, and the global pod from 3 nodes
    assert res["pings"] == 10 * 2 + 3
    for a, row in res["matrix"].items():
        for b, (ok, total) in row.items():
            assert ok == total and (total > 0) == (a != b)
    (glob,) = res["special"]
    assert glob["namespace"] == "global" and not glob["failed_from"]
    assert ipaddress.ip_address(glob["address"]) in ipaddress.ip_network("10.200.0.0/24")
    for node in sandbox.node_names():
        sessions = bird.bgp_sessions(sandbox.node(node)["bird_ctl"])
        assert len(sessions) == 2 and all(s["established"] for s in sessions)
    # traffic really crosses the fabric: node1 -> node3 goes via node3's fabric address
    dst = pods_on(sandbox, "node3")[1]["address"]
    route = sandbox.node_exec("node1", "ip", "route", "get", dst).stdout
    assert f"via {sandbox.node('node3')['address']} dev eth0" in route


def test_status_shows_pools_blocks_pods_routes_and_sessions(sandbox):
    data = sandbox.status()
    assert {p["name"] for p in data["pools"]} == {"default", "global"}
    assert data["etcd"]["running"] and data["ready"]
    assert len(data["pods"]) == len(sandbox.state.pods) and all(p["in_etcd"] for p in data["pods"])
    for n in data["nodes"]:
        assert n["coild"]["running"] and n["bird"]["running"]
        for b in n["blocks"]:
            assert published(b["block"], n["table119"])
        assert {s["peer"] for s in n["bgp"]} == set(sandbox.node_names()) - {n["name"]}
        others = [b["block"] for m in data["nodes"] if m is not n for b in m["blocks"]]
        assert sorted(r.split()[0] for r in n["routes"]) == sorted(others)
    # the same through the command line, human and JSON
    base = [sys.executable, "-m", "coil", "sandbox", "--state-dir", sandbox.dir]
    out = subprocess.run(base + ["status", "-o", "json"], capture_output=True, text=True,
                         check=True).stdout
    assert json.loads(out)["name"] == data["name"]
    human = subprocess.run(base + ["status"], capture_output=True, text=True, check=True).stdout
    assert "table 119" in human and "Established" in human and "node1-g01" in human
    r = subprocess.run(base + ["check"], capture_output=True, text=True)
    assert r.returncode == 0 and "check passed" in r.stdout, r.stdout + r.stderr


def test_deleted_pod_address_is_freed_and_reused(sandbox):
    victim = pods_on(sandbox, "node2")[1]
    address = victim["address"]
    assert address in held_addresses(sandbox)
    sandbox.delete_pod(victim["name"])
    assert address not in held_addresses(sandbox)
    assert not os.path.exists(f"/run/netns/{victim['netns']}")
    (new,) = sandbox.create_pods("node2", 1)
    assert new["address"] == address                  # the hole is taken again
    rec = held_addresses(sandbox)[address]
    assert (rec.pod, rec.container_id) == (new["name"], new["container_id"])
    assert ping(sandbox, pods_on(sandbox, "node1")[0]["name"], address)


def test_block_fills_and_second_block_is_learned_by_the_others(sandbox):
    first = default_blocks(sandbox, "node3")
    assert len(first) == 1                            # 3 pods in a block of 8
    used = len(pods_on(sandbox, "node3"))
    new = sandbox.create_pods("node3", 8 - used + 1)
    blocks = default_blocks(sandbox, "node3")
    assert len(blocks) == 2
    (second,) = set(blocks) - set(first)
    assert published(second, sandbox.table119("node3"))
    # the ADDs ran in parallel: whichever came last got the new block
    (last,) = [p for p in new
               if ipaddress.ip_address(p["address"]) in ipaddress.ip_network(second)]
    for node in ("node1", "node2"):
        ctl = sandbox.node(node)["bird_ctl"]
        wait_until(lambda: bird.routes(ctl).get(second) == "node3", 10,
                   what=f"BIRD on {node} learning {second}")
        wait_until(lambda: second in {r["dst"] for r in sandbox.bird_routes(node)}, 10,
                   what=f"{second} in the main table of {node}")
        assert ping(sandbox, pods_on(sandbox, node)[0]["name"], last["address"])


def test_coild_killed_and_restarted(sandbox):
    node1_pods = pods_on(sandbox, "node1")
    before = held_addresses(sandbox)
    assert sandbox.stop_process("coild", "node1", signal.SIGKILL)
    # the data plane does not need coild: pods keep talking
    remote = pods_on(sandbox, "node2")[0]
    for p in node1_pods:
        assert ping(sandbox, p["name"], remote["address"])
    assert ping(sandbox, remote["name"], node1_pods[0]["address"])
    sandbox.restart("coild", "node1")
    assert held_addresses(sandbox).keys() == before.keys()      # nothing forgotten
    for b in default_blocks(sandbox, "node1"):
        assert published(b, sandbox.table119("node1"))
    (new,) = sandbox.create_pods("node1", 1)
    assert new["address"] not in before
    assert ping(sandbox, remote["name"], new["address"])
    assert ping(sandbox, new["name"], remote["address"])


def test_bird_restarted_routes_come_back(sandbox):
    node2_blocks = default_blocks(sandbox, "node2")
    target = pods_on(sandbox, "node2")[0]
    src = pods_on(sandbox, "node1")[0]
    assert sandbox.stop_process("bird", "node2")
    # BIRD leaving withdraws node2's blocks everywhere; table 119 stays (coild's)
    wait_until(lambda: not set(node2_blocks) & {r["dst"] for r in sandbox.bird_routes("node1")},
               10, what="node2's blocks withdrawn from node1")
    assert not sandbox.bird_routes("node2")
    for b in node2_blocks:
        assert published(b, sandbox.table119("node2"))
    assert not ping(sandbox, src["name"], target["address"])
    res = sandbox.check()
    assert not res["ok"] and any("node2" in f for f in res["failures"])
    sandbox.restart("bird", "node2")
    sandbox.wait_routes(timeout=20)
    assert ping(sandbox, src["name"], target["address"])
    res = sandbox.check()
    assert res["ok"], res["failures"]


# -- life cycle ---------------------------------------------------------------

def root_snapshot(prefix: str) -> dict:
    """The root network namespace and our processes, read only."""
    def out(*cmd):
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    procs = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if prefix in cmd:
                procs.append(cmd)
    # other test suites may create and remove their own namespaces meanwhile
    netns = sorted(line.split()[0] for line in out("ip", "netns", "list").splitlines()
                   if not line.startswith("coiltest-"))
    return {"link": out("ip", "-o", "link"), "addr": out("ip", "-o", "addr"),
            "route": out("ip", "route", "show", "table", "all"),
            "route6": out("ip", "-6", "route", "show", "table", "all"),
            "netns": netns, "procs": sorted(procs),
            "forward": open("/proc/sys/net/ipv4/ip_forward").read()}


def test_root_namespace_untouched_and_down_leaves_nothing(make_sandbox):
    sb = make_sandbox("safe")
    before = root_snapshot(sb.dir)
    sb.up(Config(nodes=2, pods=2, name=sb.test_name))
    during = root_snapshot(sb.dir)
    for key in ("link", "addr", "route", "route6", "forward"):
        assert during[key] == before[key], key
    recorded = [dict(p) for p in sb.state.processes]
    assert {p["role"] for p in recorded} == {"etcd", "coild", "bird"}
    assert len(during["procs"]) == len(recorded)
    # the fabric leads nowhere: no default route, nothing outside is reachable
    for node in sb.node_names():
        routes = sb.node_exec(node, "ip", "route").stdout
        assert "default" not in routes
        assert sb.node_exec(node, "ip", "route", "get", "192.0.2.1", check=False).returncode != 0
    fabric = sb.state.data["fabric"]["netns"]
    assert subprocess.run(["ip", "-n", fabric, "route"], capture_output=True,
                          text=True).stdout.strip() == ""
    sb.down()
    after = root_snapshot(sb.dir)
    assert after == before
    for p in recorded:
        assert not os.path.exists(f"/proc/{p['pid']}") or \
            open(f"/proc/{p['pid']}/cmdline").read().find(sb.dir) < 0
    assert not os.path.exists(sb.dir)
    assert sb.down() == {"removed": False}            # idempotent


def test_down_after_a_crashed_up(make_sandbox):
    sb = make_sandbox("crash")
    before = root_snapshot(sb.dir)
    up = subprocess.Popen([sys.executable, "-m", "coil", "sandbox", "--state-dir", sb.dir, "up",
                           "--nodes", "2", "--pods", "30", "--name", sb.test_name, "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = os.path.join(sb.dir, "state.json")

    def pods_being_made():
        try:
            with open(state_file) as f:
                return len(json.load(f).get("pods", [])) > 0
        except (OSError, ValueError):
            return False
    wait_until(pods_being_made, 30, interval=0.01, what="up creating pods")
    up.send_signal(signal.SIGKILL)                    # crash in the middle of the pods
    up.wait()
    assert root_snapshot(sb.dir)["procs"]             # its daemons run on, orphaned
    r = subprocess.run([sys.executable, "-m", "coil", "sandbox", "--state-dir", sb.dir, "down"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert root_snapshot(sb.dir) == before
    r = subprocess.run([sys.executable, "-m", "coil", "sandbox", "--state-dir", sb.dir, "down"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "no sandbox" in r.stdout


def test_up_refuses_a_busy_state_dir_and_bad_config(make_sandbox, tmp_path):
    import pytest
    from coil.sandbox.cluster import SandboxError
    (tmp_path / "precious.txt").write_text("mine")
    with pytest.raises(SandboxError, match="not empty"):
        Sandbox(str(tmp_path)).up(Config(nodes=1, pods=0))
    assert (tmp_path / "precious.txt").read_text() == "mine"
    sb = make_sandbox("cfg")
    with pytest.raises(SandboxError, match="overlaps"):
        sb.up(Config(nodes=1, name=sb.test_name, default_subnet="10.250.0.0/16"))
    with pytest.raises(SandboxError, match="private"):
        sb.up(Config(nodes=1, name=sb.test_name, default_subnet="8.8.0.0/16"))
    assert not os.path.exists(sb.dir)


def test_docs_show_the_exact_bird_config_and_bird_accepts_it(tmp_path):
    import shutil
    import pytest
    conf = bird.render_config("node1", "10.250.0.11", [("node2", "10.250.0.12"),
                                                       ("node3", "10.250.0.13")],
                              "/run/coil-sandbox/node1/bird.log")
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "docs", "routing.md")
    with open(docs, encoding="utf-8") as f:
        assert conf in f.read(), "docs/routing.md is out of date with coil/sandbox/bird.py"
    if shutil.which("bird") is None and not os.path.exists("/usr/sbin/bird"):
        pytest.skip("needs bird2")
    path = tmp_path / "bird.conf"
    path.write_text(conf)
    r = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
