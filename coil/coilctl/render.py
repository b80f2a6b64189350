"""Human tables and JSON for coilctl. Domain code never prints; this does."""

from __future__ import annotations

import json


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def as_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


def migration(r: dict, prefix: str) -> str:
    """The human report of ``coilctl migrate v1``."""
    steps = r["steps"]
    if not r["v1"]:
        return f"no Coil v1 data under {prefix}: nothing to convert"
    verb = "would convert" if r["dry_run"] else "converted"
    nodes = sorted({b["node"] for b in r["blocks"]})
    lines = [f"Coil v1 store under {prefix}: {verb} {len(r['pools'])} pools, "
             f"{len(r['blocks'])} blocks of {len(nodes)} nodes, {r['addresses']} addresses"]
    if r["pools"]:
        lines += ["", table(["POOL", "BLOCK", "SUBNETS"],
                            [[p["name"], 1 << p["block_size"], ", ".join(p["subnets"])]
                             for p in r["pools"]])]
    if r["blocks"]:
        lines += ["", table(["NODE", "POOL", "BLOCK"],
                            [[b["node"], b["pool"], b["block"]]
                             for b in sorted(r["blocks"], key=lambda b: (b["node"], b["pool"]))])]
    for a in r["legacy_addresses"]:
        lines.append(f"note: {a['address']} ({a['namespace']}/{a['pod']}) was recorded by v1 "
                     f"before 1.0.2 without a container ID; free it with 'coilctl address free' "
                     f"once its pod is gone")
    for a in r["orphan_addresses"]:
        lines.append(f"note: {a['address']} ({a['namespace']}/{a['pod']}) is in block "
                     f"{a['block']}, which no node held in v1; kept as it was")
    for m in r["stray_subnet_markers"]:
        lines.append(f"note: {m} belonged to no pool; removed")
    lines += ["", f"steps: {steps['total']} in all, {steps['already_done']} done by an earlier run, "
                  f"{steps['applied']} applied now, {steps['pending']} pending"
                  + (" (dry run: nothing changed)" if r["dry_run"] else "")]
    return "\n".join(lines)


def ipam_report(r: dict) -> str:
    """The human report of ``coilctl ipam check``."""
    s = r["summary"]
    lines = [f"checked {s['addresses']} addresses, {s['blocks']} blocks, {s['pods']} Pods, "
             f"{s['nodes']} Nodes, {s['coilds']} coilds in {s['seconds']:g}s"]
    sections = [
        ("leaked addresses (held in etcd, no Pod)", r["leaked_addresses"],
         ["ADDRESS", "BLOCK", "POD", "CONTAINER", "CREATED"],
         lambda e: [e["address"], e["block"], f"{e['namespace']}/{e['pod']}",
                    e["container_id"], e["created_at"]]),
        ("addresses used by two Pods", r["duplicate_addresses"], ["ADDRESS", "PODS"],
         lambda e: [e["address"], ", ".join(e["pods"])]),
        ("Pods without a record", r["pods_without_record"], ["ADDRESS", "POD", "NODE"],
         lambda e: [e["address"], f"{e['namespace']}/{e['pod']}", e["node"]]),
        ("blocks of missing nodes", r["blocks_of_missing_nodes"], ["POOL", "BLOCK", "NODE"],
         lambda e: [e["pool"], e["block"], e["node"]]),
        ("blocks whose route is missing", r["blocks_without_route"],
         ["POOL", "BLOCK", "NODE", "ROUTE", "COILD"],
         lambda e: [e["pool"], e["block"], e["node"], e.get("route", ""), e["coild"]]),
        ("coilds not checked", r["coild_errors"], ["COILD", "ERROR"],
         lambda e: [e["url"], e["error"]]),
    ]
    for title, items, headers, row in sections:
        if items:
            lines += ["", f"{title}: {len(items)}", table(headers, [row(e) for e in items])]
    if len(lines) == 1:
        lines.append("no problem found")
    return "\n".join(lines)


def smoke_report(r: dict) -> str:
    """The human report of ``coilctl smoke``."""
    a, b = r["nodes"]
    lines = [f"smoke test {r['run']} in namespace {r['namespace']}: nodes {a} and {b}", ""]
    lines.append(table(["POD", "NODE", "IP", "STATUS", "POOL"],
                       [[p["name"], p["node"], p["ip"] or "-", p["status"],
                         (p["pool"] or "NONE") if r["pool_check"]["checked"] and p["ip"]
                         else "-"] for p in r["pods"]]))
    lines += ["", table(["FROM", "TO", "ADDRESS", "RESULT"],
                        [[d["from_node"], d["to_node"], d["to_ip"] or "-",
                          d["result"] + (f" (exit code {d['exit_code']})"
                                         if d["result"] == "failed" else "")]
                         for d in r["directions"]])]
    pc = r["pool_check"]
    if not pc["checked"]:
        lines.append(f"pool check: {pc['note']}")
    elif pc["outside"]:
        lines.append(f"pool check: {len(pc['outside'])} addresses in no coil pool ({pc['note']})")
    else:
        lines.append(f"pool check: every address is in a coil pool ({pc['note']})")
    for name, events in sorted((r.get("events") or {}).items()):
        if events:
            lines += ["", f"events of {name}:"] + [f"  {e}" for e in events]
    if r["ok"]:
        lines.append("result: ok, both directions")
    else:
        lines += ["", "result: FAILED"] + [f"  {p}" for p in r["problems"]]
        lines += ["next steps:"] + [f"  {i}. {s}" for i, s in enumerate(r["next_steps"], 1)]
    c = r.get("cleanup")
    if c is not None:
        if c["kept"]:
            lines.append(f"Pods kept (--keep); delete them with: kubectl -n {r['namespace']} "
                         f"delete pod -l {c['selector']}")
        elif c["failed"]:
            lines.append(f"could not delete {', '.join(c['failed'])}: {c['error']}; delete them "
                         f"with: kubectl -n {r['namespace']} delete pod -l {c['selector']}")
        else:
            lines.append(f"deleted {len(c['deleted'])} Pods")
    return "\n".join(lines)
