"""``hypercoil``: one executable, every role.

The role comes from the name the program was called by (``argv[0]``, e.g.
the ``/opt/cni/bin/coil`` symlink) or, for ``hypercoil ROLE ...``, from the
first argument. Only the chosen role's module is imported, so the CNI
plugin path stays free of heavy imports.
"""

from __future__ import annotations

import os
import sys

# role name -> "module:function"; the function takes argv (without the role)
# and returns an exit code.
ROLES = {
    "coil": "coil.cni.plugin:main",
    "coild": "coil.coild.main:main",
    "coilctl": "coil.coilctl.cli:main",
    "coil-controller": "coil.controller.main:main",
    "coil-installer": "coil.installer.main:main",
    "sandbox": "coil.sandbox.cli:main",
    "version": "coil.hypercoil:version_main",
}

USAGE = """usage: hypercoil ROLE [ARGS...]

roles:
  coil             the CNI plugin (normally reached as /opt/cni/bin/coil)
  coild            node daemon
  coilctl          operator CLI
  coil-controller  Kubernetes housekeeping
  coil-installer   installs coil and its CNI configuration on a node
  sandbox          a local multi-node cluster in network namespaces
  version          version and active backends
"""


def run_role(role: str, argv: list[str], func=None) -> int:
    """Run one role: the one boundary where an error becomes an exit code.

    A ``CoilError`` from any role ends it with one line on stderr,
    ``ROLE: error: MESSAGE (HINT)``, and the error's ``exit_code`` (1, or 2
    for a bad command line); Ctrl-C ends it with 130. No traceback. Every
    role answers ``--version`` as its first argument. A stdout whose reader
    went away ends the role quietly with 1. ``func`` (argv ->
    exit code) runs instead of the registered role's function: a program
    outside ROLES (``python -m coil.demo``) ends through here too.
    """
    if argv[:1] == ["--version"]:
        from coil import __version__
        sys.stdout.write(f"{role} {__version__}\n")
        return 0
    from coil.errors import CoilError
    try:
        if func is None:
            module_name, _, func_name = ROLES[role].partition(":")
            if module_name == __name__:
                func = globals()[func_name]
            else:
                import importlib
                func = getattr(importlib.import_module(module_name), func_name)
        code = func(argv)
        sys.stdout.flush()          # a closed stdout shows here, not at shutdown
        return code
    except BrokenPipeError:
        # the reader went away (``| head``): quietly, and keep the
        # interpreter's own flush at exit from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except CoilError as exc:
        sys.stderr.write(f"{role}: error: {exc.one_line()}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write(f"{role}: interrupted\n")
        return 130


def backends() -> dict:
    """Which implementation of each hot path is active."""
    from coil import bitmap, net
    from coil import launcher_path
    launcher = launcher_path()
    return {
        "bitmap": bitmap.BACKEND,
        "netlink": net.BACKEND,
        "launcher": launcher or "python (native launcher not built)",
    }


def version_main(argv: list[str]) -> int:
    import json
    from coil import __version__
    info = {"version": __version__, "python": sys.version.split()[0],
            "backends": backends()}
    if argv[:2] == ["-o", "json"] or argv[:1] == ["--json"]:
        print(json.dumps(info, indent=2))
    else:
        print(f"hypercoil {info['version']} (python {info['python']})")
        for name, backend in info["backends"].items():
            print(f"  {name:8} {backend}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    name = os.path.basename(argv[0]) if argv else "hypercoil"
    if name in ROLES:
        return run_role(name, argv[1:])
    if argv[1:2] == ["--version"]:
        return run_role("version", [])
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if len(argv) >= 2 else 2
    role = argv[1]
    if role not in ROLES:
        sys.stderr.write(f"hypercoil: unknown role {role!r}; choose one of: "
                         f"{', '.join(ROLES)}\n")
        return 2
    return run_role(role, argv[2:])


if __name__ == "__main__":
    sys.exit(main())
