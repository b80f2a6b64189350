"""coilctl commands. Thin: parse, call coil.store, render."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import click

from coil import config as cfg
from coil.cliutil import etcd_flags, etcd_options, open_store, run_click
from coil.coilctl import render

CONFIG_FILE = "~/.coilctl.yml"
ENV_PREFIX = "COILCTL_ETCD_"
V1_ENV_PREFIX = "COILCTL_"            # v1's names: COILCTL_ENDPOINTS, COILCTL_TLS_CA_FILE ...


class Ctx:
    def __init__(self, flags, config_file, output):
        self.flags = flags
        self.config_file = config_file
        self.output = output
        self._store = None
        self.allow_v1 = False           # only 'migrate v1' may open a v1 store

    @property
    def store(self):
        if self._store is None:
            store = open_store(cfg.resolve(self.flags, ENV_PREFIX, self.config_file,
                                           v1_env_prefix=V1_ENV_PREFIX))
            if not self.allow_v1:
                from coil.store.v1 import refuse_if_v1
                try:
                    refuse_if_v1(store.etcd, "coilctl")
                except BaseException:
                    store.close()
                    raise
            self._store = store
        return self._store

    def etcd_configured(self) -> bool:
        """Whether a flag, the environment or the config file names etcd."""
        return cfg.endpoints_given(self.flags, ENV_PREFIX, self.config_file,
                                   v1_env_prefix=V1_ENV_PREFIX)

    def emit(self, data, human: str):
        click.echo(render.as_json(data) if self.output == "json" else human)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@etcd_options
@click.option("--config", "config_file", default=None, envvar="COILCTL_CONFIG",
              help=f"YAML/JSON config file [default: {CONFIG_FILE}]")
@click.option("-o", "--output", type=click.Choice(["human", "json"]), default="human",
              help="output format")
@click.pass_context
def cli(ctx, config_file, output, **kwargs):
    """Configure coil's address pools and inspect blocks and addresses."""
    flags = etcd_flags(kwargs)
    if config_file and not os.path.exists(os.path.expanduser(config_file)):
        # only the default file may be missing; a named one is a typo
        from coil.errors import InvalidArgument
        raise InvalidArgument(f"config file {config_file} does not exist")
    ctx.obj = Ctx(flags, config_file or CONFIG_FILE, output)
    ctx.call_on_close(lambda: ctx.obj._store and ctx.obj._store.close())


@cli.group()
def pool():
    """Address pools."""


@pool.command("create")
@click.argument("name")
@click.argument("subnet")
@click.argument("size")
@click.pass_obj
def pool_create(obj, name, subnet, size):
    """Create pool NAME with SUBNET, blocks of 2^SIZE addresses."""
    from coil.store.model import parse_subnet, validate_block_size, validate_pool_name
    validate_pool_name(name)
    validate_block_size(size, parse_subnet(subnet))
    p = obj.store.create_pool(name, subnet, size)
    obj.emit(p.to_json(), f"created pool {p.name} with subnet {p.subnets[0]}, "
                          f"blocks of {1 << p.block_size} addresses")


@pool.command("add-subnet")
@click.argument("name")
@click.argument("subnet")
@click.pass_obj
def pool_add_subnet(obj, name, subnet):
    """Add SUBNET to pool NAME."""
    from coil.store.model import parse_subnet, validate_pool_name
    validate_pool_name(name)
    net = parse_subnet(subnet)
    p = obj.store.add_subnet(name, subnet)
    obj.emit(p.to_json(), f"added subnet {net} to pool {p.name}")


@pool.command("delete")
@click.argument("name")
@click.pass_obj
def pool_delete(obj, name):
    """Delete pool NAME and its subnets. Refuses while any block of it is
    held, naming the nodes that hold one."""
    p = obj.store.delete_pool(name)
    obj.emit(p.to_json(), f"deleted pool {p.name} ({', '.join(map(str, p.subnets))})")


@pool.command("remove-subnet")
@click.argument("name")
@click.argument("subnet")
@click.pass_obj
def pool_remove_subnet(obj, name, subnet):
    """Remove SUBNET from pool NAME. Refuses while any block of SUBNET is
    held, naming the nodes that hold one, and for the pool's last subnet."""
    from coil.store.model import parse_subnet, validate_pool_name
    validate_pool_name(name)
    net = parse_subnet(subnet)
    p = obj.store.remove_subnet(name, subnet)
    obj.emit(p.to_json(), f"removed subnet {net} from pool {p.name}")


@pool.command("list")
@click.pass_obj
def pool_list(obj):
    """List pools."""
    pools = obj.store.list_pools()
    rows = [[p.name, 1 << p.block_size, ", ".join(map(str, p.subnets))] for p in pools]
    obj.emit([p.to_json() for p in pools],
             render.table(["POOL", "BLOCK", "SUBNETS"], rows) if pools else "no pools")


@pool.command("show")
@click.argument("name")
@click.argument("subnet", required=False)
@click.option("--json", "as_json", is_flag=True, help="same as '-o json' (v1's flag)")
@click.pass_obj
def pool_show(obj, name, subnet, as_json):
    """Block usage of pool NAME (optionally only SUBNET)."""
    from coil.store.model import parse_subnet, validate_pool_name
    if as_json:
        obj.output = "json"
    validate_pool_name(name)
    if subnet is not None:
        parse_subnet(subnet)
    u = obj.store.pool_usage(name, subnet)
    nodes = {}                      # v1's "nodes" key: node -> its blocks
    for b in u["blocks"]:
        nodes.setdefault(b["node"], []).append(b["block"])
    u["nodes"] = nodes
    head = (f"pool {u['pool']}  subnets {', '.join(u['subnets'])}  "
            f"block size {u['addresses_per_block']}\n"
            f"blocks: {u['blocks_used']} used, {u['blocks_free']} free of {u['blocks_total']}")
    per_node = {}
    for b in u["blocks"]:
        n = per_node.setdefault(b["node"], [0, 0, 0])
        n[0] += 1
        n[1] += b["used"]
        n[2] += b["free"]
    rows = [[node, *v] for node, v in sorted(per_node.items())]
    body = render.table(["NODE", "BLOCKS", "USED", "FREE"], rows) if rows else "no blocks in use"
    detail = render.table(["BLOCK", "NODE", "USED", "FREE"],
                          [[b["block"], b["node"], b["used"], b["free"]] for b in u["blocks"]])
    obj.emit(u, head + "\n\n" + body + ("\n\n" + detail if u["blocks"] else ""))


@cli.group()
def node():
    """Nodes."""


@node.command("blocks")
@click.argument("node_name", metavar="NODE")
@click.pass_obj
def node_blocks(obj, node_name):
    """Address blocks held by NODE (nothing, exit 0, for an idle node)."""
    from coil.store.model import validate_node_name
    validate_node_name(node_name)
    blocks = obj.store.node_blocks(node_name)
    if not blocks:
        # v1 printed nothing and exited 0 for an idle node; so do we (JSON: [])
        if obj.output == "json":
            obj.emit([], "")
        return
    rows = []
    data = []
    for b in sorted(blocks, key=lambda b: (b.pool, b.network.version, b.network)):
        used = obj.store.count_addresses(b.cidr)
        rows.append([b.pool, b.cidr, used, b.size - used])
        data.append({"pool": b.pool, "block": b.cidr, "used": used, "free": b.size - used,
                     "acquired_at": b.acquired_at})
    obj.emit(data, render.table(["POOL", "BLOCK", "USED", "FREE"], rows))


@node.command("release")
@click.argument("node_name", metavar="NODE")
@click.option("-y", "--yes", is_flag=True, help="required: this frees blocks by hand")
@click.option("--force", is_flag=True, help="also free blocks that still hold addresses "
                                            "(and those addresses)")
@click.pass_obj
def node_release(obj, node_name, yes, force):
    """Free the blocks of NODE, a dead node, by hand. Refuses while NODE's
    coild holds its liveness lease, and while a block still holds an address
    unless --force."""
    from coil.errors import InvalidArgument
    from coil.store.model import validate_node_name
    validate_node_name(node_name)
    if not yes:
        raise InvalidArgument(f"refusing to release the blocks of node {node_name} "
                              f"without --yes")
    freed = obj.store.release_node(node_name, force=force)
    data = [{"pool": b.pool, "block": b.cidr, "addresses_freed": n} for b, n in freed]
    human = (render.table(["POOL", "BLOCK", "ADDRESSES FREED"],
                          [[d["pool"], d["block"], d["addresses_freed"]] for d in data])
             if data else f"node {node_name} holds no block")
    obj.emit(data, human)


@cli.group()
def address():
    """Addresses."""


@address.command("info")
@click.argument("addr", metavar="ADDRESS")
@click.pass_obj
def address_info(obj, addr):
    """Who holds ADDRESS."""
    info = obj.store.address_info(addr)
    obj.emit(info, "\n".join(f"{k}: {info[k]}" for k in
                             ("address", "pool", "block", "node", "namespace", "pod",
                              "container_id", "created_at")))


@address.command("free")
@click.argument("addr", metavar="ADDRESS")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--force", is_flag=True,
              help="free it even if its Pod still exists or Kubernetes cannot be asked")
@click.option("--kubeconfig", default=None, metavar="PATH",
              help="kubeconfig used to check that the address's Pod is gone "
                   "[default: $KUBECONFIG, in-cluster, ~/.kube/config]")
@click.pass_obj
def address_free(obj, addr, yes, force, kubeconfig):
    """Free ADDRESS by hand (e.g. leaked by a crashed node). Refuses while the
    Pod of its record still exists, or when Kubernetes cannot be asked, unless
    --force. Asks first, as v1 did, unless --yes; without a terminal, --yes is
    required."""
    from coil.errors import InvalidArgument
    info = obj.store.address_info(addr)
    if not yes and not sys.stdin.isatty():
        raise InvalidArgument(f"refusing to free {info['address']} without confirmation: "
                              f"stdin is not a terminal, add --yes")
    if not force:
        _refuse_if_pod_exists(info, kubeconfig)
    if not yes:
        click.echo("\n".join(f"{k}: {info[k]}" for k in
                              ("address", "pool", "block", "node", "namespace", "pod",
                               "container_id", "created_at")), err=True)
        if not click.confirm(f"free {info['address']}?", default=False, err=True):
            raise click.exceptions.Abort()
    rec = obj.store.free_address(addr)
    obj.emit(rec.to_json(), f"freed {rec.address} (was {rec.namespace}/{rec.pod}, "
                            f"container {rec.container_id})")


def _core(kubeconfig):
    from coil import k8s
    return k8s.core_api(k8s.api_client(kubeconfig))


def _refuse_if_pod_exists(info: dict, kubeconfig):
    """Conflict when the record's Pod exists; KubernetesError when nobody can
    tell (both name --force)."""
    from coil import k8s
    from coil.errors import Conflict, KubernetesError
    ns, pod = info["namespace"], info["pod"]
    try:
        core = _core(kubeconfig)
        core.read_namespaced_pod(pod, ns, _request_timeout=k8s.REQUEST_TIMEOUT,
                                 _preload_content=False).release_conn()
    except KubernetesError as exc:
        raise KubernetesError(f"cannot check whether Pod {ns}/{pod} of {info['address']} "
                              f"is gone: {exc}",
                              hint="give --kubeconfig, or --force if you know it is gone") from None
    except k8s.transient_errors() as exc:
        if k8s.is_api_exception(exc) and k8s.api_status(exc) == 404:
            return
        raise KubernetesError(f"cannot check whether Pod {ns}/{pod} of {info['address']} "
                              f"is gone: {k8s.describe(exc)}",
                              hint="add --force if you know it is gone") from None
    raise Conflict(f"address {info['address']} is in use: Pod {ns}/{pod} still exists",
                   hint="delete the Pod first, or add --force")


@cli.group()
def ipam():
    """Audit etcd against Kubernetes and the nodes; repair from a report."""


_KUBECONFIG_HELP = "kubeconfig [default: $KUBECONFIG, in-cluster, ~/.kube/config]"


@ipam.command("check")
@click.option("--kubeconfig", default=None, metavar="PATH", help=_KUBECONFIG_HELP)
@click.option("--coild", "coild_urls", multiple=True, metavar="URL",
              help="a coild's REST API (http://NODE:9383) whose /status is compared with "
                   "etcd; repeat for each node")
@click.option("--min-age", default="60s", show_default=True, metavar="DURATION",
              help="report a record as leaked only when assigned longer ago than this")
@click.pass_obj
def ipam_check(obj, kubeconfig, coild_urls, min_age):
    """Compare etcd's address and block records with Kubernetes' Pods and
    Nodes (and each --coild's table routes). '-o json' writes the report that
    'ipam release --from-report' reads. Exit 0: no problem; 3: problems
    found."""
    from coil.controller import audit
    age = cfg.parse_duration(min_age, "--min-age")
    report = audit.check(obj.store, _core(kubeconfig), coild_urls, min_age=age)
    obj.emit(report, render.ipam_report(report))
    found = audit.problems(report)
    if found:
        from coil.errors import ProblemsFound
        raise ProblemsFound(f"ipam check found {found} problem{'s' if found != 1 else ''}",
                            hint="see the report above; 'coilctl ipam release' frees the "
                                 "leaked addresses it lists")


@ipam.command("release")
@click.option("--from-report", "report_path", required=True, metavar="FILE",
              help="a report of 'coilctl -o json ipam check'")
@click.option("-y", "--yes", is_flag=True, help="do not ask for confirmation")
@click.option("--kubeconfig", default=None, metavar="PATH", help=_KUBECONFIG_HELP)
@click.pass_obj
def ipam_release(obj, report_path, yes, kubeconfig):
    """Free the leaked addresses listed in a report, each only if it is still
    leaked: unchanged since the report (guarded by its mod revision) and
    still used by no Pod (a fresh Pod list)."""
    from coil.controller import audit
    from coil.errors import InvalidArgument
    entries = audit.load_report(report_path, obj.store.etcd.prefix)
    if entries and not yes:
        if not sys.stdin.isatty():
            raise InvalidArgument(f"refusing to free the {len(entries)} addresses of "
                                  f"{report_path} without confirmation: stdin is not a "
                                  f"terminal, add --yes")
        if not click.confirm(f"free up to {len(entries)} leaked addresses?", default=False,
                             err=True):
            raise click.exceptions.Abort()
    result = audit.release_from_report(obj.store, _core(kubeconfig), entries)
    lines = [f"released {len(result['released'])} of {len(entries)} addresses"]
    lines += [f"kept {k['address']}: {k['reason']}" for k in result["kept"]]
    obj.emit(result, "\n".join(lines))


@cli.command("smoke")
@click.option("--node", "nodes", multiple=True, metavar="NODE",
              help="a node to test; give it twice (--node A --node B) [default: the first "
                   "two Ready, schedulable nodes by name]")
@click.option("--namespace", default="default", show_default=True,
              help="namespace of the test Pods")
@click.option("--image", default="busybox", show_default=True,
              help="image with ping and sleep for the test Pods")
@click.option("--timeout", default="2m", show_default=True, metavar="DURATION",
              help="give up when the pings have not ended after this long")
@click.option("--keep", is_flag=True, help="keep the Pods afterwards, for debugging")
@click.option("--kubeconfig", default=None, metavar="PATH", help=_KUBECONFIG_HELP)
@click.pass_obj
def smoke_test(obj, nodes, namespace, image, timeout, keep, kubeconfig):
    """Pods on two nodes ping each other, both ways. Checks their addresses
    are in a coil pool (when etcd is configured), prints the result per
    direction and, on failure, the next diagnostic step. Deletes its Pods
    afterwards, also on failure, timeout and Ctrl-C, unless --keep. Exit 0:
    both pings went through; 3: the network failed the test."""
    from coil.coilctl import smoke
    from coil.errors import Interrupted, InvalidArgument, SmokeTestFailed
    limit = cfg.parse_duration(timeout, "--timeout")
    if limit <= 0:
        raise InvalidArgument(f"invalid --timeout {timeout!r}: must be positive")
    smoke.check_node_args(nodes)
    smoke.validate_namespace(namespace)
    smoke.validate_image(image)
    core = _core(kubeconfig)
    pair = smoke.pick_nodes(core, nodes)
    smoke.check_namespace(core, namespace)
    pools, note = None, ("skipped: etcd is not configured (give --etcd-endpoints, "
                         "COILCTL_ETCD_ENDPOINTS or ~/.coilctl.yml to check the addresses)")
    if obj.etcd_configured():
        pools = [(p.name, list(p.subnets)) for p in obj.store.list_pools()]
        note = f"{len(pools)} pools read from etcd under {obj.store.etcd.prefix}"
    run = smoke.SmokeRun(core, namespace, image, limit, pools, note)
    report, cleaned, interrupted = None, None, False
    try:
        with _sigterm_interrupts():
            report = run.run(pair)
    except KeyboardInterrupt:
        interrupted = True
        with _interrupts_deferred():
            cleaned = run.cleanup(keep)
        what = ("the Pods were kept (--keep)" if keep else
                f"deleted {len(cleaned['deleted'])} smoke Pods" if not cleaned["failed"] else
                f"could not delete {', '.join(cleaned['failed'])}: {cleaned['error']}; "
                f"{smoke.leftover_hint(namespace, run.selector)}")
        raise Interrupted(f"interrupted; {what}") from None
    finally:
        if cleaned is None:
            with _interrupts_deferred():
                cleaned = run.cleanup(keep)
        if cleaned["failed"] and report is None and not interrupted:
            click.echo(f"coilctl: could not delete the smoke Pods {', '.join(cleaned['failed'])}"
                       f" ({cleaned['error']}); "
                       f"{smoke.leftover_hint(namespace, run.selector)}", err=True)
    report["cleanup"] = cleaned
    obj.emit(report, render.smoke_report(report))
    if not report["ok"]:
        raise SmokeTestFailed(f"smoke test failed: {report['problems'][0]}"
                              + (f" (and {len(report['problems']) - 1} more)"
                                 if len(report["problems"]) > 1 else ""),
                              hint=f"see the report above and {smoke.DOCS}")


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM is handled like Ctrl-C, so that the cleanup runs."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt()
    try:
        old = signal.signal(signal.SIGTERM, raise_interrupt)
    except ValueError:              # not the main thread (an embedding caller)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C and SIGTERM wait until the block ends (the cleanup must finish);
    one that arrived meanwhile is raised then."""
    got = []
    try:
        old = {s: signal.signal(s, lambda signum, frame: got.append(signum))
               for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise KeyboardInterrupt()


@cli.group()
def migrate():
    """Convert a store written by an older Coil."""


@migrate.command("v1")
@click.option("--dry-run", is_flag=True, help="report what would be converted, change nothing")
@click.pass_obj
def migrate_v1(obj, dry_run):
    """Convert a Coil v1 store under --etcd-prefix in place.

    Stop every v1 coild and coil-controller and back up etcd first (see
    docs/upgrade-from-v1.md). Safe to interrupt and to run again: it resumes."""
    from coil.store import v1
    obj.allow_v1 = True
    report = v1.migrate(obj.store.etcd, dry_run=dry_run)
    obj.emit(report, render.migration(report, obj.store.etcd.prefix))


@cli.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]), default="bash",
                required=False)
def completion(shell):
    """Print the shell completion script for SHELL (default: bash, as in v1)."""
    from click.shell_completion import get_completion_class
    comp = get_completion_class(shell)(cli, {}, "coilctl", "_COILCTL_COMPLETE")
    click.echo(comp.source())


def _set_output(ctx, param, value):
    obj = ctx.find_object(Ctx)
    if value is not None and obj is not None:
        obj.output = value


def _output_everywhere(group: click.Group):
    """Give every subcommand its own ``-o/--output``, so that it works after
    the subcommand too (``coilctl pool list -o json``), as in kubectl."""
    for cmd in group.commands.values():
        if not any(p.name == "output" for p in cmd.params):
            cmd.params.append(click.Option(
                ["-o", "--output"], type=click.Choice(["human", "json"]), default=None,
                expose_value=False, callback=_set_output,
                help="output format (also accepted before the subcommand)"))
        if isinstance(cmd, click.Group):
            _output_everywhere(cmd)


def main(argv: list[str]) -> int:
    _output_everywhere(cli)
    if os.environ.get("_COILCTL_COMPLETE"):
        cli.main(args=argv, prog_name="coilctl", complete_var="_COILCTL_COMPLETE")
        return 0
    return run_click(cli, argv, "coilctl")


if __name__ == "__main__":      # errors end in the one boundary, as for 'hypercoil coilctl'
    from coil.hypercoil import run_role
    sys.exit(run_role("coilctl", sys.argv[1:], main))
