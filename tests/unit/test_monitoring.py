"""deploy/monitoring: every metric an alert rule names is one coil exports
(or one of the few named external ones), so the rules cannot drift from the
code; the Grafana dashboard, if shipped, too."""

from __future__ import annotations

import ast
import glob
import json
import os
import re

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MONITORING = os.path.join(REPO, "deploy", "monitoring")
RULES = os.path.join(MONITORING, "prometheus-rules.yaml")
# not coil's: Prometheus' own scrape health and kube-state-metrics
EXTERNAL = {"up", "kube_daemonset_status_number_unavailable"}
PROMQL_WORDS = {"sum", "by", "rate", "time", "or", "and", "unless", "max", "min", "avg",
                "count", "increase", "without", "on", "ignoring", "clamp_min", "histogram_quantile",
                "le"}


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)                 # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)                # ranges
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    return set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)) - PROMQL_WORDS


def controller_names() -> set[str]:
    """What coil-controller's registry exports once every gauge has data."""
    from coil.controller.metrics import ControllerMetrics
    from coil.store.model import Pool
    import ipaddress
    m = ControllerMetrics()
    m.set_blocks([])
    m.set_addresses({"p": 1})
    m.set_capacity([Pool("p", (ipaddress.ip_network("10.0.0.0/24"),), 3)], [], {"p": 1})
    m.scans.labels("ok").inc()
    text = m.render()[0].decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M)) | \
        set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))


def coild_names() -> set[str]:
    """Metric names defined in coil/coild/metrics.py (string literals)."""
    with open(os.path.join(REPO, "coil", "coild", "metrics.py")) as f:
        tree = ast.parse(f.read())
    names = {n.value for n in ast.walk(tree)
             if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and re.fullmatch(r"coild_[a-z0-9_]+", n.value)}
    for call in ast.walk(tree):          # a Histogram's series
        if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Histogram":
            base = call.args[0].value
            names |= {base + "_bucket", base + "_sum", base + "_count"}
    return names


def rules():
    with open(RULES) as f:
        doc = yaml.safe_load(f)
    return [r for g in doc["groups"] for r in g["rules"]]


def test_rules_file_is_well_formed():
    rs = rules()
    names = [r["alert"] for r in rs]
    assert len(names) == len(set(names))
    for r in rs:
        assert r["expr"].strip() and r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"]
    # what issue 15 asks for
    assert {"CoilPoolAlmostFull", "CoildDown", "CoilCNIErrorRate",
            "CoilLeakedAddresses"} <= set(names)


def test_every_metric_in_the_rules_exists():
    known = controller_names() | coild_names() | EXTERNAL
    for r in rules():
        missing = metric_names(r["expr"]) - known
        assert not missing, f"alert {r['alert']} names unknown metrics {sorted(missing)}"


def test_the_checker_catches_a_typo():
    known = controller_names() | coild_names() | EXTERNAL
    assert metric_names("coil_controller_pool_blocks_fre > 0") - known == \
        {"coil_controller_pool_blocks_fre"}
    assert "coil_controller_pool_addresses_free" in known
    assert "coild_cni_requests_total" in known


def test_every_metric_in_the_dashboards_exists():
    known = controller_names() | coild_names() | EXTERNAL
    for path in glob.glob(os.path.join(MONITORING, "*.json")):
        with open(path) as f:
            dash = json.load(f)
        exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
        assert exprs, path
        for e in exprs:
            missing = metric_names(e) - known
            assert not missing, f"{os.path.basename(path)}: unknown metrics {sorted(missing)}"


def test_freed_blocks_leave_the_block_gauge_without_a_reread():
    """The janitor takes freed blocks off the gauge itself (no re-read of
    every block in the cluster after each freed node)."""
    from coil.controller.metrics import ControllerMetrics
    from coil.store.model import Block
    def block(cidr, node):
        return Block("p", cidr, node, 1)
    gone = [block("10.0.0.0/30", "n1"), block("10.0.0.4/30", "n1")]
    kept = block("10.0.0.8/30", "n2")
    m = ControllerMetrics()
    m.set_blocks(gone + [kept])
    m.blocks_released(gone[:1])
    text = m.render()[0].decode()
    assert 'coil_controller_blocks{node="n1",pool="p"} 1.0' in text
    m.blocks_released(gone[1:])
    text = m.render()[0].decode()
    assert 'node="n1"' not in text
    assert 'coil_controller_blocks{node="n2",pool="p"} 1.0' in text
