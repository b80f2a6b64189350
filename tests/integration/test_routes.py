"""RouteExporter in a throw-away namespace: the export table and the main
table's unreachable routes reconciled together; foreign routes untouched.
The backend is the default one (COIL_PURE_PYTHON=1 runs the fallback)."""

from __future__ import annotations

from coil.coild.routes import RouteExporter


def routes(ns, *args):
    out = ns.run("ip", *args).stdout
    return sorted(" ".join(line.split()) for line in out.splitlines() if line.strip())


def test_block_routes_export_and_unreachable(netns_factory):
    ns = netns_factory(lo_up=True)
    ex = RouteExporter(119, 30, netns=ns.path)
    ex.add("10.80.0.0/27")
    ex.add("fd00:80::/120")
    assert routes(ns, "route", "show", "table", "119") == ["10.80.0.0/27 dev lo proto 30"]
    assert routes(ns, "route", "show", "proto", "30") == ["unreachable 10.80.0.0/27"]
    assert "unreachable fd00:80::/120" in " ".join(routes(ns, "-6", "route", "show",
                                                         "proto", "30"))
    assert ex.current_unreachable() == {"10.80.0.0/27", "fd00:80::/120"}
    ex.add("10.80.0.0/27")                          # idempotent
    # someone else's unreachable route, and a pod /32 inside the block
    ns.run("ip", "route", "add", "unreachable", "10.81.0.0/27", check=True)
    ns.run("ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1", check=True)
    ns.run("ip", "link", "set", "d0", "up", check=True)
    ns.run("ip", "route", "add", "10.80.0.5/32", "dev", "d0", check=True)
    # lost by hand: sync puts it back, and removes ours that are not wanted
    ns.run("ip", "route", "del", "unreachable", "10.80.0.0/27", check=True)
    ns.run("ip", "route", "add", "unreachable", "10.82.0.0/27", "proto", "30", check=True)
    added, removed = ex.sync(["10.80.0.0/27", "fd00:80::/120"])
    assert (added, removed) == (set(), set())
    assert ex.current_unreachable() == {"10.80.0.0/27", "fd00:80::/120"}
    main = routes(ns, "route", "show")
    assert "unreachable 10.81.0.0/27" in main                 # not ours: kept
    assert any(r.startswith("10.80.0.5 dev d0") for r in main)   # more specific: kept
    ex.remove("10.80.0.0/27")
    ex.remove("10.80.0.0/27")                       # idempotent
    assert ex.current() == {"fd00:80::/120"}
    assert ex.current_unreachable() == {"fd00:80::/120"}
    assert "unreachable 10.81.0.0/27" in routes(ns, "route", "show")
    ex.sync([])
    assert ex.current() == set() and ex.current_unreachable() == set()
