"""``hypercoil sandbox up|status|check|node-rm|down``: thin commands over
coil.sandbox.cluster (and coil.sandbox.kube for the Kubernetes part)."""

from __future__ import annotations

import json
import os
import sys
import time

import click

from coil.sandbox.state import DEFAULT_STATE_DIR

STATE_DIR_HELP = "state directory of the sandbox [env COIL_SANDBOX_DIR]"


def _sandbox(ctx):
    from coil.sandbox.cluster import Sandbox
    return Sandbox(ctx.obj["state_dir"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--state-dir", default=DEFAULT_STATE_DIR, envvar="COIL_SANDBOX_DIR",
              show_default=True, help=STATE_DIR_HELP)
@click.pass_context
def cli(ctx, state_dir):
    """A local multi-node coil cluster in network namespaces: etcd, coild and
    BIRD per node (iBGP), pods wired by the coil CNI plugin; with
    'up --kubernetes' also kube-apiserver, a Node object per node and
    coil-controller.

    Nothing outside its own namespaces is changed. Needs root."""
    ctx.obj = {"state_dir": os.path.abspath(state_dir)}


@cli.command()
@click.option("--nodes", default=3, show_default=True, help="number of nodes")
@click.option("--pods", default=3, show_default=True, help="default-namespace pods per node")
@click.option("--global-pods", default=1, show_default=True,
              help="pods of the namespace pool 'global' (on node1)")
@click.option("--name", default="coilsb", show_default=True,
              help="prefix of the network namespace names")
@click.option("--block-size", default=5, show_default=True,
              help="block size of the default pool (2^N addresses)")
@click.option("--parallel", default=0, help="concurrent CNI ADDs (0: automatic)")
@click.option("--kubernetes", is_flag=True,
              help="also run kube-apiserver (1.20, built by 'make kube-apiserver'), register "
                   "a Node object per node and run coil-controller (enables node-rm)")
@click.option("--keep-on-failure", is_flag=True,
              help="leave what was made when up fails (remove it with 'down')")
@click.option("-q", "--quiet", is_flag=True, help="no progress lines")
@click.pass_context
def up(ctx, nodes, pods, global_pods, name, block_size, parallel, kubernetes, keep_on_failure,
       quiet):
    """Create the fabric, N nodes, etcd, coild, BIRD and M pods per node."""
    from coil.sandbox.cluster import Config, Progress
    sb = _sandbox(ctx)
    cfg = Config(nodes=nodes, pods=pods, global_pods=global_pods, name=name,
                 block_size=block_size, parallel=parallel, kubernetes=kubernetes)
    progress = Progress(quiet=quiet)
    try:
        res = sb.up(cfg, progress, cleanup_on_failure=not keep_on_failure)
    finally:
        sb.close()
    click.echo(f"sandbox up in {res['seconds']:.1f}s: {res['nodes']} nodes, {res['pods']} pods "
               f"(state {sb.dir})")
    hint = "" if sb.dir == DEFAULT_STATE_DIR else f" --state-dir {sb.dir}"
    click.echo(f"next: hypercoil sandbox{hint} check | status | "
               + ("node-rm NODE | " if kubernetes else "") + "down")


def _report(ctx, method: str, render, output: str) -> dict:
    """Run the sandbox's ``method`` (status or check), print its result as
    JSON or rendered for humans, and return it."""
    sb = _sandbox(ctx)
    try:
        data = getattr(sb, method)()
    finally:
        sb.close()
    click.echo(json.dumps(data, indent=2) if output == "json" else render(data))
    return data


@cli.command()
@click.option("-o", "--output", type=click.Choice(["human", "json"]), default="human")
@click.pass_context
def status(ctx, output):
    """Pools, blocks per node, pods, table 119 and BGP sessions."""
    _report(ctx, "status", render_status, output)


@cli.command()
@click.option("-o", "--output", type=click.Choice(["human", "json"]), default="human")
@click.pass_context
def check(ctx, output):
    """Every pod pings a pod on every other node; exit 1 on any failure."""
    res = _report(ctx, "check", render_check, output)
    if not res["ok"]:
        from coil.sandbox.config import SandboxError
        n = len(res["failures"])
        raise SandboxError(f"check failed: {n} problem{'s' if n != 1 else ''}",
                           hint="see the report above")


@cli.command("node-rm")
@click.argument("node")
@click.option("--timeout", default=120.0, show_default=True,
              help="seconds to wait for each step (blocks freed, routes withdrawn)")
@click.option("-q", "--quiet", is_flag=True, help="no progress lines")
@click.pass_context
def node_rm(ctx, node, timeout, quiet):
    """Remove NODE as a dead machine goes (its coild, BIRD, pods and
    namespace), delete its Node object, and show coil-controller freeing its
    blocks in etcd and the other nodes losing their routes. Needs a sandbox
    made with 'up --kubernetes'."""
    from coil.sandbox.cluster import Progress
    from coil.sandbox.kube import node_rm as remove
    sb = _sandbox(ctx)
    try:
        res = remove(sb, node, Progress(quiet=quiet), timeout=timeout)
    finally:
        sb.close()
    click.echo(f"node {res['node']} removed in {res['seconds']:.1f}s: "
               f"{len(res['blocks'])} block(s) and {res['addresses']} address(es) freed by "
               f"coil-controller; nodes left: {', '.join(res['remaining']) or 'none'}")


@cli.command()
@click.option("-q", "--quiet", is_flag=True)
@click.pass_context
def down(ctx, quiet):
    """Stop every process and delete every namespace the sandbox made."""
    from coil.sandbox.cluster import Progress
    sb = _sandbox(ctx)
    res = sb.down(Progress(quiet=quiet))
    if res.get("left"):
        from coil.sandbox.config import SandboxError
        raise SandboxError(f"could not delete: {', '.join(res['left'])}")
    click.echo("sandbox removed" if res.get("removed") else f"no sandbox in {sb.dir}")


# -- rendering -------------------------------------------------------------

def _table(headers, rows) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _run_state(entry) -> str:
    if entry.get("pid") is None:
        return "not started"
    return f"pid {entry['pid']} " + ("running" if entry.get("running") else "NOT RUNNING")


def render_status(d: dict) -> str:
    out = []
    age = f", up {time.time() - d['started_at']:.0f}s" if d.get("started_at") else ""
    out.append(f"sandbox {d['name']}  state {d['state_dir']}{age}"
               + ("" if d.get("ready") else "  (NOT READY: up did not finish)"))
    fab = d.get("fabric") or {}
    out.append(f"fabric  netns {fab.get('netns')}  bridge {fab.get('bridge')}  "
               f"{fab.get('subnet')}")
    out.append(f"etcd    {_run_state(d['etcd'])}  {d['etcd']['endpoint']}"
               + (f"  error: {d['etcd']['error']}" if d["etcd"].get("error") else ""))
    k = d.get("kubernetes")
    if k:
        out.append(f"kubernetes  kube-apiserver {_run_state(k['apiserver'])}  {k['url']} "
                   f"(netns {k['netns']})")
        out.append(f"            coil-controller {_run_state(k['controller'])}  metrics "
                   f"http://{k['controller']['metrics']}  as "
                   f"{k['controller'].get('credentials') or '-'}")
        out.append(f"            Nodes ({len(k['nodes'])}): {', '.join(k['nodes']) or '-'}"
                   + (f"  error: {k['error']}" if k.get("error") else ""))
        if k.get("removed"):
            out.append("            removed by node-rm: " + ", ".join(
                f"{name} ({len(r['blocks'])} block(s) freed)" for name, r in k["removed"].items()))
        out.append(f"            kubectl: ip netns exec {k['netns']} kubectl --kubeconfig "
                   f"{k['admin_kubeconfig']} get nodes")
    out.append("")
    out.append("pools")
    out.append(_indent(_table(["POOL", "SUBNETS", "BLOCK"],
                              [[p["name"], ", ".join(p["subnets"]), 1 << p["block_size"]]
                               for p in d["pools"]])))
    for n in d["nodes"]:
        out.append("")
        out.append(f"{n['name']}  {n['address']}  netns {n['netns']}  "
                   f"coild {_run_state(n['coild'])}  bird {_run_state(n['bird'])}")
        blocks = ", ".join(f"{b['block']} ({b['pool']}, {b['used']} used)" for b in n["blocks"])
        out.append(f"  blocks     {blocks or '-'}")
        out.append("  table 119  " + ("\n             ".join(n["table119"]) or "-"))
        sessions = ", ".join(f"{s['peer']} {s['info'] or s['state']}" for s in n["bgp"])
        out.append(f"  bgp        {sessions or n['bird'].get('error', '-')}")
        out.append("  via bgp    " + ("\n             ".join(n["routes"]) or "-"))
    out.append("")
    out.append(f"pods ({len(d['pods'])})")
    out.append(_indent(_table(["POD", "NAMESPACE", "NODE", "ADDRESS", "NETNS"],
                              [[p["name"], p["namespace"], p["node"],
                                p["address"] or "-", p["netns"]] for p in d["pods"]])))
    return "\n".join(out)


def render_check(r: dict) -> str:
    nodes = list(r["matrix"])
    rows = []
    for a in nodes:
        cells = []
        for b in nodes:
            ok, total = r["matrix"][a][b]
            cells.append("-" if total == 0 else f"{ok}/{total}" + ("" if ok == total else " !"))
        rows.append([a, *cells])
    out = [f"pings from the pods of a node (rows) to a pod on another node (columns): "
           f"{r['pings']} pings", _indent(_table(["FROM \\ TO", *nodes], rows))]
    for s in r["special"]:
        status = "reachable" if not s["failed_from"] else f"NOT reachable from {s['failed_from']}"
        out.append(f"namespace pool pod {s['namespace']}/{s['pod']} {s['address']} on "
                   f"{s['node']}: {status} (from {len(s['reached_from'])} nodes)")
    for node, sessions in r["bgp"].items():
        out.append(f"{node} BGP: " + ", ".join(f"{k} {v}" for k, v in sessions.items()))
    if r["ok"]:
        out.append("check passed")
    else:
        out.append(f"check FAILED ({len(r['failures'])}):")
        out += [f"  {f}" for f in r["failures"][:50]]
    return "\n".join(out)


def _indent(text: str, n: int = 2) -> str:
    return "\n".join(" " * n + ln for ln in text.splitlines())


def main(argv: list[str]) -> int:
    """Errors end in coil/hypercoil.py's role boundary (one line, exit code)."""
    from coil.cliutil import run_click
    return run_click(cli, argv, "hypercoil sandbox")


if __name__ == "__main__":      # errors end in the one boundary, as for 'hypercoil sandbox'
    from coil.hypercoil import run_role
    sys.exit(run_role("sandbox", sys.argv[1:], main))
