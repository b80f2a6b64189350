"""Shared pieces of the click-based roles: etcd flags, and click's own
exceptions turned into coil's (the exit code is decided once, for every
role, in coil/hypercoil.py: a command that must end with another code raises
a CoilError whose ``exit_code`` says it, never SystemExit)."""

from __future__ import annotations

import click

from coil.errors import CoilError, UsageError


def etcd_options(func):
    """The v1 etcd flags, identical for every role that talks to etcd."""
    opts = [
        click.option("--etcd-endpoints", "etcd_endpoints", default=None,
                     help="comma-separated etcd URLs, or @NAME for the Endpoints object "
                          "kube-system/NAME [default: http://127.0.0.1:2379]"),
        click.option("--etcd-prefix", default=None, help="key prefix [default: /coil/]"),
        click.option("--etcd-timeout", default=None, help="request timeout, e.g. 5s [default: 5s]"),
        click.option("--etcd-username", default=None, help="etcd user name"),
        click.option("--etcd-password", default=None,
                     help="etcd password (visible in the process list: prefer "
                          "--etcd-password-file or the environment)"),
        click.option("--etcd-password-file", default=None,
                     help="file holding the etcd password (e.g. a mounted Secret)"),
        click.option("--etcd-tls-ca", default=None, help="CA certificate file for https endpoints"),
        click.option("--etcd-tls-cert", default=None, help="client certificate file"),
        click.option("--etcd-tls-key", default=None, help="client key file"),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def etcd_flags(kwargs: dict) -> dict:
    """Pop the etcd flags from click kwargs into config.resolve's shape."""
    out = {}
    for field in ("endpoints", "prefix", "timeout", "username", "password", "password_file",
                  "tls_ca", "tls_cert", "tls_key"):
        out[field] = kwargs.pop(f"etcd_{field}", None)
    return out


def open_store(config):
    """An IPAMStore for ``config``, resolving ``@NAME`` endpoints first."""
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    if config.endpoints and config.endpoints[0].startswith("@"):
        from coil.k8s import resolve_etcd_endpoints
        config = resolve_etcd_endpoints(config)
    return IPAMStore(Etcd(config))


def run_click(command: click.Command, argv: list[str], prog_name: str) -> int:
    """Run a click command. click's errors become coil's (UsageError,
    CoilError) and propagate, with every CoilError, to the
    role boundary in coil/hypercoil.py, which prints the one line and picks
    the exit code."""
    try:
        rv = command.main(args=argv, prog_name=prog_name, standalone_mode=False)
        # non-standalone click returns an Exit's code instead of raising it
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.exceptions.Abort:
        raise CoilError("aborted") from None
    except click.UsageError as exc:
        # one line, like every other error: what is wrong, and where help is
        where = exc.ctx.command_path if exc.ctx is not None else prog_name
        message = " ".join(exc.format_message().split())
        raise UsageError(message, hint=f"see '{where} --help'") from None
    except click.ClickException as exc:
        err = CoilError(" ".join(exc.format_message().split()))
        err.exit_code = exc.exit_code
        raise err from None
    except click.exceptions.Exit as exc:    # click's own (--help, completion): 0
        return exc.exit_code
