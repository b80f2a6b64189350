"""The BIRD templates of deploy/bird (docs/install.md), rendered by
deploy/bird/render.sh, run in network namespaces: two nodes of one rack
(one AS) peer by eBGP with a top-of-rack BIRD, exchange the blocks coild
would publish in table 119, reject a prefix outside coil's pools, and a
ping crosses from one node to an address of the other node's block; and
two nodes peer by iBGP with two route reflectors (the reflector
configuration of docs/install.md)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "deploy" / "bird" / "render.sh"
POOLS = "10.64.0.0/14{14,32}"


def render(template, **values):
    env = dict(os.environ, **values)
    r = subprocess.run([str(RENDER), template], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def birds(tmp_path):
    """start(ns, conf_text) -> control socket path; every BIRD is stopped by PID."""
    procs = []

    def start(ns, conf_text):
        d = tmp_path / ns.name
        d.mkdir()
        # the test's BIRDs log to a file of their own, not to the host's syslog
        conf_text = conf_text.replace("log syslog {", f'log "{d}/bird.log" {{')
        (d / "bird.conf").write_text(conf_text)
        p = subprocess.Popen(["ip", "netns", "exec", ns.name, "bird", "-f", "-c",
                              str(d / "bird.conf"), "-s", str(d / "bird.ctl")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        ns.ctl = str(d / "bird.ctl")
        return ns.ctl

    if shutil.which("bird") is None:
        pytest.skip("needs bird2")
    try:
        yield start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


def fabric(netns_factory, n_nodes):
    """A switch namespace (bridge, 10.69.0.1/24, forwarding) and n node
    namespaces plugged into it (10.69.0.11, .12, ...)."""
    sw = netns_factory(lo_up=True)
    sw.run("ip", "link", "add", "br0", "type", "bridge", check=True)
    sw.run("ip", "addr", "add", "10.69.0.1/24", "dev", "br0", check=True)
    sw.run("ip", "link", "set", "br0", "up", check=True)
    sw.run("sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
    nodes = []
    for i in range(n_nodes):
        ns = netns_factory(lo_up=True)
        sw.run("ip", "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0",
               "netns", ns.name, check=True)
        sw.run("ip", "link", "set", f"p{i}", "master", "br0", "up", check=True)
        ns.run("ip", "addr", "add", f"10.69.0.{11 + i}/24", "dev", "eth0", check=True)
        ns.run("ip", "link", "set", "eth0", "up", check=True)
        nodes.append(ns)
    return sw, nodes


def publish_block(ns, block, address):
    """What coild does for a block: its route in table 119 (dev lo, proto 30);
    and one address of it held on the node, as a pod would be."""
    ns.run("ip", "route", "add", block, "dev", "lo", "proto", "30", "table", "119", check=True)
    ns.run("ip", "addr", "add", f"{address}/32", "dev", "lo", check=True)


def wait_for(predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def birdc(ns, command):
    return ns.run("birdc", "-s", ns.ctl, *command.split()).stdout


def bird_routes(ns):
    return ns.run("ip", "route", "show", "proto", "bird").stdout


def test_top_of_rack_template(netns_factory, birds):
    tor, (n1, n2) = fabric(netns_factory, 2)
    publish_block(n1, "10.64.0.0/27", "10.64.0.1")
    publish_block(n2, "10.64.0.32/27", "10.64.0.33")
    birds(tor, """
router id 10.69.0.1;
log syslog { info, remote, warning, error, auth, fatal, bug };
protocol device { }
protocol static { ipv4; route 198.51.100.0/24 blackhole; }
protocol kernel { ipv4 { import none; export where source = RTS_BGP; }; }
template bgp node { local 10.69.0.1 as 65001; connect retry time 2;
  ipv4 { import all; export all; }; }
protocol bgp n1 from node { neighbor 10.69.0.11 as 64601; }
protocol bgp n2 from node { neighbor 10.69.0.12 as 64601; }
""")
    for i, ns in enumerate((n1, n2)):
        birds(ns, render("bird-tor.conf.tmpl", NODE_ADDRESS=f"10.69.0.{11 + i}",
                         NODE_AS="64601", TOR_ADDRESS="10.69.0.1", TOR_AS="65001",
                         POOL_PREFIXES=POOLS))
    # each node learns the other's block: same rack, same AS, so this needs
    # the template's "allow local as 1"
    wait_for(lambda: "10.64.0.32/27 via 10.69.0.1" in bird_routes(n1), "n1 to learn n2's block")
    wait_for(lambda: "10.64.0.0/27 via 10.69.0.1" in bird_routes(n2), "n2 to learn n1's block")
    # the switch announces a prefix outside the pools: the import filter drops it
    assert "198.51.100.0/24" in birdc(tor, "show route export n1")
    assert "198.51.100.0/24" not in n1.run("ip", "route", "show").stdout
    # nothing was written to table 119 by BIRD: it is coild's
    assert n1.run("ip", "route", "show", "table", "119").stdout.split("\n")[0].startswith(
        "10.64.0.0/27 dev lo proto 30")
    assert "bird" not in n1.run("ip", "route", "show", "table", "119").stdout
    r = n1.run("ping", "-c", "2", "-W", "2", "-I", "10.69.0.11", "10.64.0.33")
    assert r.returncode == 0, r.stdout + r.stderr


def test_route_reflector_template(netns_factory, birds):
    sw, (rr1, rr2, n1, n2) = fabric(netns_factory, 4)      # .11 .12 reflectors, .13 .14 nodes
    publish_block(n1, "10.64.0.0/27", "10.64.0.1")
    publish_block(n2, "10.64.0.32/27", "10.64.0.33")
    for i, rr in enumerate((rr1, rr2)):
        address = f"10.69.0.{11 + i}"
        # the reflector of docs/install.md: one dynamic session for the whole
        # segment (the other reflector never connects: both only listen)
        birds(rr, f"""
router id {address};
log syslog {{ info, remote, warning, error, auth, fatal, bug }};
protocol device {{ }}
protocol bgp nodes {{
  local {address} as 64600;
  neighbor range 10.69.0.0/24 as 64600;
  rr client;
  direct;
  hold time 9;
  keepalive time 3;
  ipv4 {{
    import where net ~ [ {POOLS} ];
    export all;
  }};
}}
""")
    for i, ns in enumerate((n1, n2)):
        birds(ns, render("bird-rr.conf.tmpl", NODE_ADDRESS=f"10.69.0.{13 + i}",
                         CLUSTER_AS="64600", RR1_ADDRESS="10.69.0.11",
                         RR2_ADDRESS="10.69.0.12", POOL_PREFIXES=POOLS))
    # a reflected route keeps its owner as next hop
    wait_for(lambda: "10.64.0.32/27 via 10.69.0.14" in bird_routes(n1), "n1 to learn n2's block")
    wait_for(lambda: "10.64.0.0/27 via 10.69.0.13" in bird_routes(n2), "n2 to learn n1's block")
    r = n1.run("ping", "-c", "2", "-W", "2", "-I", "10.69.0.13", "10.64.0.33")
    assert r.returncode == 0, r.stdout + r.stderr
