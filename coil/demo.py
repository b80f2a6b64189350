"""``python -m coil.demo`` (``make demo``): coil on a real, local cluster.

1. ``sandbox up``: a fabric bridge and 3 node network namespaces, etcd,
   coild and BIRD on every node, a few pods per node made by the coil CNI
   plugin through the sandbox's CNI executor (libcni's way);
2. ``sandbox check``: every pod pings a pod on every other node, across the
   BGP routes BIRD learned from table 119;
3. ``sandbox status``: pools, blocks, table 119, BGP sessions, pods;
4. ``sandbox down``: everything is removed again.

When the kube-apiserver binary is built (``make kube-apiserver``), ``up``
runs with ``--kubernetes``: kube-apiserver, a Node object per node and
coil-controller join the sandbox (a one-line note says so otherwise).
``--node-rm`` then also removes the last node with ``sandbox node-rm`` and
runs the check again on the nodes left.

``--keep`` leaves the sandbox running for exploration and prints how to use
and stop it. Without ``--keep`` the sandbox is always removed, also when a
step fails. Needs root; changes nothing outside its own network namespaces.
"""

from __future__ import annotations

import argparse
import os
import sys


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say()
    say(f"==> {text}")


def hypercoil_command(state_dir: str, default_dir: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "hypercoil")
    if not os.path.exists(exe):
        exe = f"{sys.executable} -m coil"
    else:
        rel = os.path.relpath(exe)
        exe = rel if not rel.startswith("..") else exe
    flag = "" if state_dir == default_dir else f" --state-dir {state_dir}"
    return f"{exe} sandbox{flag}"


def explore_hints(sb, cmd: str) -> str:
    n1 = sb.node("node1")
    pods = sb.state.pods
    a = next(p for p in pods if p["node"] == "node1")
    b = next((p for p in pods if p["node"] != "node1" and p.get("address")), a)
    k = sb.state.data.get("kubernetes")
    kube = [] if not k else [
        f"  ip netns exec {k['netns']} kubectl --kubeconfig {k['admin_kubeconfig']} get nodes",
        f"  {cmd} node-rm {sb.node_names()[-1]}   # a node goes away; "
        "coil-controller frees its blocks",
    ]
    return "\n".join([
        "The sandbox keeps running. Try:",
        f"  {cmd} status    # pools, blocks, table 119, BGP, pods",
        f"  {cmd} check     # the ping matrix again",
        f"  ip netns exec {a['netns']} ping -c3 {b['address']}    "
        f"# {a['name']} -> {b['name']} on {b['node']}",
        f"  ip -n {n1['netns']} route show table 119     # node1's blocks (coild)",
        f"  ip -n {n1['netns']} route show proto bird    # other nodes' blocks (BIRD)",
        f"  birdc -s {n1['bird_ctl']} show protocols",
        f"  birdc -s {n1['bird_ctl']} show route",
        f"  less {n1['bird_conf']}   # the BIRD configuration (docs/routing.md)",
        *kube,
        f"  logs: {os.path.join(sb.dir, 'node1', 'coild.log')}, "
        f"{os.path.join(sb.dir, 'node1', 'bird.log')}",
        "Stop it with:",
        f"  {cmd} down",
    ])


def kubernetes_available() -> bool:
    """True when ``up --kubernetes`` can run; else prints a one-line note."""
    from coil.sandbox import kube
    from coil.sandbox.cluster import SandboxError
    try:
        kube.preflight()
        return True
    except SandboxError as exc:
        say(f"note: without Kubernetes ({str(exc).split(':')[0]}; 'make kube-apiserver' "
            "adds kube-apiserver and coil-controller to the demo)")
        return False


def main(argv: list[str] | None = None) -> int:
    from coil.sandbox import cli as sandbox_cli
    from coil.sandbox.cluster import Config, Progress, Sandbox, SandboxError
    from coil.sandbox.state import DEFAULT_STATE_DIR

    parser = argparse.ArgumentParser(prog="python -m coil.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the sandbox running and print how to explore and stop it")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pods", type=int, default=3, help="pods per node")
    parser.add_argument("--state-dir", default=os.environ.get("COIL_SANDBOX_DIR",
                                                              DEFAULT_STATE_DIR))
    parser.add_argument("--no-kubernetes", action="store_true",
                        help="without kube-apiserver and coil-controller even when built")
    parser.add_argument("--node-rm", action="store_true",
                        help="(with Kubernetes) also remove the last node with node-rm")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        raise SandboxError("needs root (it creates network namespaces)")
    sb = Sandbox(os.path.abspath(args.state_dir))
    cmd = hypercoil_command(sb.dir, DEFAULT_STATE_DIR)
    kubernetes = not args.no_kubernetes and kubernetes_available()
    made = False
    ok = False
    try:
        step(f"{cmd} up --nodes {args.nodes} --pods {args.pods}"
             + (" --kubernetes" if kubernetes else ""))
        res = sb.up(Config(nodes=args.nodes, pods=args.pods, kubernetes=kubernetes), Progress(),
                    cleanup_on_failure=not args.keep)
        made = True
        say(f"sandbox up in {res['seconds']:.1f}s: {res['nodes']} nodes, {res['pods']} pods")

        step(f"{cmd} check")
        result = sb.check()
        say(sandbox_cli.render_check(result))

        step(f"{cmd} status")
        say(sandbox_cli.render_status(sb.status()))
        ok = result["ok"]
        if ok and kubernetes and args.node_rm and args.nodes > 1:
            from coil.sandbox.kube import node_rm
            last = sb.node_names()[-1]
            step(f"{cmd} node-rm {last}")
            r = node_rm(sb, last, Progress())
            say(f"node {last} removed in {r['seconds']:.1f}s")
            step(f"{cmd} check")
            result = sb.check()
            say(sandbox_cli.render_check(result))
            ok = result["ok"]
        if not ok:
            raise SandboxError("the connectivity check failed", hint="see above")
        return 0
    finally:        # errors and Ctrl-C end in coil/hypercoil.py's boundary after this
        sb.close()
        if args.keep and made:
            step("kept running (--keep)")
            say(explore_hints(sb, cmd))
        elif made:       # a failed up removed its own leftovers already
            step(f"{cmd} down")
            sb.down(Progress())
            say("sandbox removed: nothing of it is left")


if __name__ == "__main__":      # one line and the exit code, as for every role
    from coil.hypercoil import run_role
    sys.exit(run_role("demo", sys.argv[1:], main))
