"""BIRD 2 for the sandbox: the per-node configuration and birdc queries.

The configuration (documented in docs/routing.md, where operators copy it
from) does three things on every node:

1. ``protocol kernel coil_blocks``: *learns* table 119. coild publishes each
   of the node's address blocks there as ``<block> dev lo proto 30``. Those
   routes were not made by BIRD (protocol 30, not ``bird``), so BIRD imports
   them only with ``learn``. ``export none``: BIRD never writes table 119.
2. ``protocol bgp`` to every other node (iBGP full mesh, one private AS):
   exports exactly the routes learned from table 119, with our own fabric
   address as next hop, and imports the other nodes' blocks.
3. ``protocol kernel kernel_main``: installs the BGP routes in the node's
   main table (``<block> via <other node> proto bird``), so that pod traffic
   to another node's block leaves through the fabric.
"""

from __future__ import annotations

import re
import subprocess

from coil.errors import CoilError

DEFAULT_ASN = 64600

CONFIG_TEMPLATE = """\
# BIRD 2 configuration of {node} (coil sandbox; see docs/routing.md).
# Learns coil's address blocks from kernel table {table} and exchanges them
# by iBGP (AS {asn}, full mesh) with the other nodes of the fabric.

log "{log}" {{ info, remote, warning, error, auth, fatal, bug }};
router id {router_id};
timeformat protocol iso long;

# Interfaces: every other protocol needs them.
protocol device {{
  scan time 10;
}}

# coild publishes each block of this node as "<block> dev lo proto {proto}" in
# kernel table {table}. Those routes are foreign to BIRD, so "learn" is
# required to import them; "export none" means BIRD never writes to table
# {table}. A kernel protocol needs a BIRD table of its own (master4 is synced
# with the main table below), hence coil4 and the pipe into master4.
ipv4 table coil4;

protocol kernel coil_blocks {{
  kernel table {table};
  learn;
  scan time {scan};
  ipv4 {{
    table coil4;
    import all;
    export none;
  }};
}}

protocol pipe coil_pipe {{
  table coil4;
  peer table master4;
  import none;
  export all;
}}

# Blocks of the other nodes, learned by BGP, go to the main table
# ("<block> via <node> dev {fabric_if} proto bird").
protocol kernel kernel_main {{
  scan time 10;
  ipv4 {{
    import none;
    export where source = RTS_BGP;
  }};
}}

# One iBGP session per other node. Peers share the fabric subnet: "direct"
# makes the received next hop the gateway without an IGP lookup. Short
# timers so that a restarted peer comes back in seconds, not minutes.
template bgp coil_mesh {{
  local {router_id} as {asn};
  direct;
  connect delay time 1;
  connect retry time 2;
  error wait time 1, 5;
  hold time 9;
  keepalive time 3;
  ipv4 {{
    import all;
    export where proto = "coil_blocks";
    next hop self;
  }};
}}

{peers}
"""

PEER_TEMPLATE = 'protocol bgp {name} from coil_mesh {{\n  neighbor {address} as {asn};\n}}\n'


def render_config(node: str, router_id: str, peers: list[tuple[str, str]], log: str,
                  asn: int = DEFAULT_ASN, table: int = 119, proto: int = 30,
                  scan: int = 1, fabric_if: str = "eth0") -> str:
    """BIRD 2 configuration for ``node``: ``peers`` is [(name, address)] of
    the other nodes. Protocol names must be identifiers: node names with
    dashes become underscores. ``scan`` is the period (s) of the full scan
    of table 119; on Linux BIRD also hears route changes at once through
    netlink notifications, the scan is the safety net."""
    peer_text = "\n".join(PEER_TEMPLATE.format(name=protocol_name(name), address=addr, asn=asn)
                          for name, addr in peers)
    return CONFIG_TEMPLATE.format(node=node, router_id=router_id, asn=asn, table=table,
                                  proto=proto, scan=scan, log=log, peers=peer_text,
                                  fabric_if=fabric_if)


def protocol_name(node: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", node)
    return name if name[:1].isalpha() else f"n_{name}"


# -- birdc ---------------------------------------------------------------------

class BirdError(CoilError):
    """birdc could not talk to BIRD (not running, socket missing)."""


def birdc(ctl: str, *command: str, timeout: float = 5.0) -> str:
    """Run one birdc command against the control socket ``ctl``; its output
    without the banner. Raises BirdError."""
    try:
        r = subprocess.run(["birdc", "-s", ctl, *command], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BirdError(f"birdc {' '.join(command)}: no answer within {timeout:g}s") from None
    except FileNotFoundError:
        raise BirdError("birdc not found (install bird2)") from None
    out = r.stdout
    if r.returncode != 0 or "Unable to connect" in out or "Unable to connect" in r.stderr:
        raise BirdError(f"birdc {' '.join(command)}: "
                        f"{(out + r.stderr).strip().splitlines()[-1:] or ['failed']}")
    lines = [ln for ln in out.splitlines() if not ln.startswith("BIRD ") or "ready" not in ln]
    return "\n".join(lines)


def configure(ctl: str, timeout: float = 10.0) -> str:
    """``birdc configure``: BIRD rereads its configuration file (protocols
    that left it are shut down, new ones start). Raises BirdError when the
    file is rejected."""
    out = birdc(ctl, "configure", timeout=timeout)
    if "Reconfigured" not in out and "Reconfiguration in progress" not in out:
        raise BirdError(f"birdc configure: {out.strip().splitlines()[-1:] or ['no answer']}")
    return out


_PROTO_RE = re.compile(
    r"^(?P<name>\S+)\s+(?P<proto>\S+)\s+(?P<table>\S+)\s+(?P<state>\S+)\s+"
    r"(?P<since>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\S+)\s*(?P<info>.*)$")


def parse_protocols(text: str) -> list[dict]:
    """``show protocols`` -> [{name, proto, table, state, since, info}]."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("Name "):
            continue
        m = _PROTO_RE.match(line.strip())
        if m:
            out.append({k: v.strip() for k, v in m.groupdict().items()})
    return out


def protocols(ctl: str) -> list[dict]:
    return parse_protocols(birdc(ctl, "show", "protocols"))


def bgp_sessions(ctl: str) -> list[dict]:
    """BGP protocols only: [{name, state, info, established}]."""
    return [dict(p, established=p["info"].startswith("Established"))
            for p in protocols(ctl) if p["proto"] == "BGP"]


_ROUTE_RE = re.compile(r"^(?P<prefix>[0-9a-fA-F.:]+/\d+)\s+\S+\s+\[(?P<proto>\S+)")


def parse_routes(text: str) -> dict[str, str]:
    """``show route`` -> {prefix: protocol of the best route}."""
    out = {}
    current = None
    for line in text.splitlines():
        m = _ROUTE_RE.match(line)
        if m:
            current = m.group("prefix")
            out.setdefault(current, m.group("proto"))
            continue
        # further routes for the same prefix start with whitespace + "unicast"
    return out


def routes(ctl: str) -> dict[str, str]:
    """Routes in BIRD's master4 table: {prefix: protocol}."""
    return parse_routes(birdc(ctl, "show", "route"))
