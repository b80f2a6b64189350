"""The sandbox's package data cannot drift from deploy/."""

import os

import pytest

from coil.sandbox import kube

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_packaged_rbac_equals_deploy():
    with open(os.path.join(REPO, "deploy", "rbac.yaml"), "rb") as a, \
            open(kube.RBAC_MANIFEST, "rb") as b:
        assert a.read() == b.read(), "coil/sandbox/data/rbac.yaml differs from deploy/rbac.yaml"


def test_sandbox_reads_nothing_outside_the_package():
    """No path into the checkout (tests/, deploy/) in the packaged sandbox."""
    pkg = os.path.dirname(os.path.abspath(kube.__file__))
    assert kube.RBAC_MANIFEST.startswith(pkg + os.sep)
    for name in sorted(os.listdir(pkg)):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name)) as f:
                src = f.read()
            for needle in ("REPO", '"tests"', '"deploy"', "'tests'", "'deploy'"):
                assert needle not in src, f"{name} has {needle}"


def _imports(path: str, package: str) -> set[str]:
    """The modules of ``package`` that the module at ``path`` imports,
    at the top or inside a function."""
    import ast
    with open(path) as f:
        tree = ast.parse(f.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out |= {n for n in names if n.startswith(package + ".") and n.count(".") == 2}
    return out


def test_sandbox_modules_import_each_other_without_a_cycle():
    """Each module of coil/sandbox owns one thing; none imports (even
    lazily) a module that imports it back, directly or through others."""
    pkg = os.path.dirname(os.path.abspath(kube.__file__))
    graph = {f"coil.sandbox.{n[:-3]}": _imports(os.path.join(pkg, n), "coil.sandbox")
             for n in os.listdir(pkg) if n.endswith(".py") and n != "__init__.py"}
    assert len(graph) >= 8
    cycles = []

    def visit(mod, path):
        for dep in sorted(graph.get(mod, ())):
            if dep == path[0]:
                cycles.append(" -> ".join(path + [dep]))
            elif dep not in path:
                visit(dep, path + [dep])
    for mod in sorted(graph):
        visit(mod, [mod])
    assert cycles == []


def test_packaged_code_names_no_checkout_path():
    """No module of the coil package builds a path into the checkout's
    tests/ or deploy/ (messages that point a user at deploy/rbac.yaml are
    fine: they name a file, they do not read it)."""
    import ast
    import coil
    root = os.path.dirname(os.path.abspath(coil.__file__))
    found = []
    for top, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(top, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and (node.value in ("tests", "deploy", "cniclient")
                             or node.value.startswith(("tests/", "deploy/")))):
                    found.append(f"{os.path.relpath(path, root)}:{node.lineno}: {node.value!r}")
    assert found == []
