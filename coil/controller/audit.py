"""``coilctl ipam check`` and ``ipam release --from-report``: etcd's records
joined with Kubernetes' Pods and Nodes and, optionally, each coild's
``/status``.

The join is the leak scan's (``coil.controller.scan``): one paged read of
the blocks and address records, one paged list of Pods and of Nodes, then
set lookups only, so it stays linear in the number of records (seconds at
150,000). It reports:

- ``leaked_addresses``: a record that no Pod reports (``status.podIPs``)
  and whose Pod (namespace/name of the record) does not exist, assigned
  more than ``min_age`` seconds before the check;
- ``duplicate_addresses``: one address reported by two running or pending
  Pods;
- ``pods_without_record``: an address of a running or pending Pod, inside
  one of coil's pools, that etcd does not hold;
- ``blocks_of_missing_nodes``: a block held by a node that has no Node
  object;
- ``blocks_without_route``: a block of a node whose coild was asked
  (``--coild URL``) and whose export table does not carry it
  (``"route": "export"``), or whose unreachable route in the main table is
  missing (``"route": "unreachable"``).

A report is read only; ``release_from_report`` frees the leaked addresses
it lists, each with one transaction guarded by the mod revision the report
saw, after a fresh Pod list shows the address is still used by no Pod.
"""

from __future__ import annotations

import json
import time
import urllib.request

from coil import k8s
from coil.controller.scan import find_leaks, find_unknown, pod_ips_from_items
from coil.controller.watcher import collect_pages, iter_pages
from coil.errors import InvalidArgument

REPORT_VERSION = 1
STATUS_TIMEOUT = 5.0
PAGE_SIZE = 500


def _list_pods(core, page_size: int = PAGE_SIZE):
    from coil.controller.scan import PodIPs
    out = PodIPs()
    by_ip: dict[str, list] = {}

    def take(items):
        pod_ips_from_items(items, out)

    try:
        collect_pages(iter_pages(core.list_pod_for_all_namespaces, page_size), take)
    except k8s.transient_errors() as exc:
        raise k8s.to_coil_error(exc, "listing Pods") from None
    for pa in out.active:
        by_ip.setdefault(pa.ip, []).append(pa)
    return out, by_ip


def _list_nodes(core, page_size: int = PAGE_SIZE) -> set:
    names: set = set()

    def take(items):
        names.update((n.get("metadata") or {}).get("name", "") for n in items)

    try:
        collect_pages(iter_pages(core.list_node, page_size), take)
    except k8s.transient_errors() as exc:
        raise k8s.to_coil_error(exc, "listing Nodes") from None
    return names


def fetch_status(url: str, timeout: float = STATUS_TIMEOUT) -> dict:
    """GET ``<url>/status`` of a coild (its read-only TCP API). Raises
    InvalidArgument for a bad URL, OSError/ValueError when unreachable or
    malformed."""
    base = url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise InvalidArgument(f"invalid coild URL {url!r}: expected http://HOST:PORT")
    with urllib.request.urlopen(base + "/status", timeout=timeout) as resp:
        body = json.loads(resp.read())
    if not isinstance(body, dict) or "node" not in body:
        raise ValueError("not a coild /status answer")
    return body


def check(store, core, coild_urls=(), *, min_age: float = 60.0, clock=time.time,
          status_fetch=fetch_status) -> dict:
    """Run the join; returns the report (a JSON-able dict). Raises
    StoreUnavailable, KubernetesError. An unreachable coild is listed under
    ``coild_errors`` and its blocks are not judged."""
    t0 = time.monotonic()
    # etcd first, then Kubernetes: a Pod that got its address before the
    # etcd read is in the Pod list (as in the leak scan)
    pools = store.list_pools()
    blocks = store.all_blocks()
    addresses, revision = store.all_addresses_paged()
    pods, by_ip = _list_pods(core)
    nodes = _list_nodes(core)
    now = clock()

    leaked = []
    for leak in find_leaks(addresses, pods.held, now, min_age):
        a = leak.address
        if (a.namespace, a.pod) in pods.names:
            continue            # its Pod exists (its status may lag): not ours to judge
        leaked.append({"address": a.address, "block": a.block, "offset": a.offset,
                       "namespace": a.namespace, "pod": a.pod,
                       "container_id": a.container_id, "created_at": a.created_at,
                       "mod_revision": a.revision,
                       "age_s": round(leak.age) if leak.age is not None else None})
    duplicates = [{"address": ip, "pods": sorted(f"{p.namespace}/{p.name}" for p in ps)}
                  for ip, ps in sorted(by_ip.items())
                  if len({(p.namespace, p.name) for p in ps}) > 1]
    etcd_ips = {a.address for a in addresses}
    networks = [n for p in pools for n in p.subnets]
    unknown = [{"address": u.ip, "namespace": u.namespace, "pod": u.name, "node": u.node}
               for u in find_unknown(pods.active, etcd_ips, networks)]
    missing_nodes = [{"pool": b.pool, "block": b.cidr, "node": b.node}
                     for b in blocks if b.node not in nodes]

    no_route, coild_errors, coilds = [], [], []
    blocks_by_node: dict[str, list] = {}
    for b in blocks:
        blocks_by_node.setdefault(b.node, []).append(b)
    for url in coild_urls:
        try:
            st = status_fetch(url)
        except InvalidArgument:
            raise
        except (OSError, ValueError) as exc:
            coild_errors.append({"url": url, "error": " ".join(str(exc).split()) or
                                 exc.__class__.__name__})
            continue
        node = str(st.get("node", ""))
        routes = st.get("table-routes")
        coilds.append({"url": url, "node": node})
        if not isinstance(routes, list):
            coild_errors.append({"url": url, "error": "its /status lists no table routes "
                                                      "(coild older than this coilctl)"})
            continue
        have = set(routes)
        unreachable = st.get("unreachable-routes")
        for b in blocks_by_node.get(node, []):
            if b.cidr not in have:
                no_route.append({"pool": b.pool, "block": b.cidr, "node": node, "coild": url,
                                 "route": "export"})
            if isinstance(unreachable, list) and b.cidr not in unreachable:
                no_route.append({"pool": b.pool, "block": b.cidr, "node": node, "coild": url,
                                 "route": "unreachable"})

    return {
        "version": REPORT_VERSION,
        "prefix": store.etcd.prefix,
        "etcd_revision": revision,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "min_age_s": min_age,
        "summary": {"addresses": len(addresses), "blocks": len(blocks), "pods": pods.pods,
                    "nodes": len(nodes), "coilds": len(coilds),
                    "leaked_addresses": len(leaked), "duplicate_addresses": len(duplicates),
                    "pods_without_record": len(unknown),
                    "blocks_of_missing_nodes": len(missing_nodes),
                    "blocks_without_route": len(no_route),
                    "coild_errors": len(coild_errors),
                    "seconds": round(time.monotonic() - t0, 3)},
        "leaked_addresses": leaked,
        "duplicate_addresses": duplicates,
        "pods_without_record": unknown,
        "blocks_of_missing_nodes": missing_nodes,
        "blocks_without_route": no_route,
        "coilds": coilds,
        "coild_errors": coild_errors,
    }


def problems(report: dict) -> int:
    s = report["summary"]
    return sum(s[k] for k in ("leaked_addresses", "duplicate_addresses", "pods_without_record",
                              "blocks_of_missing_nodes", "blocks_without_route", "coild_errors"))


def load_report(path: str, prefix: str) -> list[dict]:
    """The leaked entries of a report file. Raises InvalidArgument naming the
    file for anything that is not a report of this prefix."""
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except OSError as exc:
        raise InvalidArgument(f"cannot read report {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise InvalidArgument(f"invalid report {path}: not JSON "
                              f"(write one with 'coilctl -o json ipam check > FILE')") from None
    if not isinstance(report, dict) or report.get("version") != REPORT_VERSION or \
            not isinstance(report.get("leaked_addresses"), list):
        raise InvalidArgument(f"invalid report {path}: not a report of 'coilctl ipam check' "
                              f"(version {REPORT_VERSION})")
    if report.get("prefix") != prefix:
        raise InvalidArgument(f"report {path} was made for etcd prefix "
                              f"{report.get('prefix')!r}, not {prefix!r}")
    out = []
    for i, e in enumerate(report["leaked_addresses"]):
        try:
            entry = {"address": str(e["address"]), "block": str(e["block"]),
                     "offset": int(e["offset"]), "namespace": str(e["namespace"]),
                     "pod": str(e["pod"]), "mod_revision": int(e["mod_revision"])}
        except (KeyError, TypeError, ValueError):
            raise InvalidArgument(f"invalid report {path}: leaked_addresses[{i}] lacks "
                                  f"address/block/offset/namespace/pod/mod_revision") from None
        if entry["mod_revision"] <= 0:
            raise InvalidArgument(f"invalid report {path}: leaked_addresses[{i}] has "
                                  f"mod_revision {entry['mod_revision']}")
        out.append(entry)
    return out


def release_from_report(store, core, entries) -> dict:
    """Free each listed address that is still leaked: a fresh Pod list must
    show neither a Pod reporting the address nor the record's Pod, and one
    transaction guarded by the report's mod revision deletes the record (a
    record changed since the report is kept). Safe to repeat. Returns
    ``{"released": [...], "kept": [{"address", "reason"}]}``."""
    pods, _ = _list_pods(core)
    released, kept = [], []
    for e in entries:
        if e["address"] in pods.held:
            kept.append({"address": e["address"], "reason": "a Pod reports this address now"})
            continue
        if (e["namespace"], e["pod"]) in pods.names:
            kept.append({"address": e["address"],
                         "reason": f"Pod {e['namespace']}/{e['pod']} exists now"})
            continue
        if store.release_address(e["block"], e["offset"], e["mod_revision"]):
            released.append(e["address"])
        else:
            kept.append({"address": e["address"],
                         "reason": "the record changed or was freed since the report"})
    return {"released": released, "kept": kept}
