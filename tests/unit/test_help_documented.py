"""Every flag of every click role and subcommand is documented.

The ``--help`` of each command (coild, coilctl and each of its subcommands,
coil-controller, the sandbox and its subcommands) is rendered, and every
``--flag`` in it must appear in that role's page under docs/, so the
reference cannot drift from the code again. (coil-installer reads only
environment variables; the CNI plugin reads stdin and CNI_* variables.)
"""

from __future__ import annotations

import importlib
import os
import re

import click
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROLES = {   # role -> (module with the click command ``cli``, its page)
    "coild": ("coil.coild.main", "coild.md"),
    "coilctl": ("coil.coilctl.cli", "coilctl.md"),
    "coil-controller": ("coil.controller.main", "coil-controller.md"),
    "sandbox": ("coil.sandbox.cli", "sandbox.md"),
}
FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def walk(cmd: click.Command, path: list[str]):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from walk(cmd.commands[name], path + [name])


def rendered_help(root: click.Command, path: list[str], cmd: click.Command) -> str:
    ctx = click.Context(root, info_name=path[0])
    for name in path[1:]:
        parent = ctx.command
        ctx = click.Context(parent.commands[name], info_name=name, parent=ctx)
    assert ctx.command is cmd
    return cmd.get_help(ctx)


def commands():
    for role, (module, page) in ROLES.items():
        root = importlib.import_module(module).cli
        for path, cmd in walk(root, [role]):
            yield pytest.param(role, root, path, cmd, page, id=" ".join(path))


def page_text(page: str) -> str:
    with open(os.path.join(REPO, "docs", page), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("role,root,path,cmd,page", list(commands()))
def test_every_flag_in_help_is_documented(role, root, path, cmd, page):
    text = rendered_help(root, path, cmd)
    flags = set(FLAG.findall(text)) - {"--help"}
    doc = page_text(page)
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", doc))
    assert not missing, f"'{' '.join(path)} --help' shows {missing}, not in docs/{page}"


def test_every_subcommand_is_documented():
    for role, (module, page) in ROLES.items():
        root = importlib.import_module(module).cli
        doc = page_text(page)
        for path, cmd in walk(root, [role]):
            if len(path) > 1:
                words = " ".join(path[1:])
                assert f"`{words}" in doc or f"{words}" in doc, \
                    f"command '{' '.join(path)}' is not in docs/{page}"


def test_the_check_sees_options_of_a_subcommand():
    from coil.coilctl.cli import cli
    path = ["coilctl", "ipam", "release"]
    text = rendered_help(cli, path, cli.commands["ipam"].commands["release"])
    assert {"--from-report", "--yes", "--kubeconfig"} <= set(FLAG.findall(text))


# Kubernetes' own variables (in-cluster configuration), not coil's to document
KUBERNETES_VARIABLES = {"KUBERNETES_SERVICE_HOST"}


def _environment_reads(tree):
    """The names of the environment variables a module reads by name."""
    import ast
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            receiver = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
            if ((name in ("get", "pop") and "environ" in receiver) or name == "getenv"
                    or (name == "env" and len(node.args) == 2)):      # the installer's env()
                yield node.args[0].value, node.lineno
        elif (isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value)
              and isinstance(node.slice, ast.Constant)):
            yield node.slice.value, node.lineno


def test_every_environment_variable_read_is_documented():
    """Production code reads no hidden switch: every environment variable a
    module of coil reads by name is named in docs/ or the README (test-only
    fault hooks are monkeypatched by the tests, never read from the
    environment)."""
    import ast
    import glob
    docs = ""
    for path in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True) + [
            os.path.join(REPO, "README.md")]:
        with open(path) as f:
            docs += f.read()
    root = os.path.join(REPO, "coil")
    seen, hidden = set(), []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read())
        for name, line in _environment_reads(tree):
            seen.add(name)
            if name not in docs and name not in KUBERNETES_VARIABLES:
                hidden.append(f"{os.path.relpath(path, REPO)}:{line}: {name}")
    assert {"COIL_NODE_NAME", "COIL_PURE_PYTHON", "CNI_COMMAND"} <= seen
    assert hidden == []
