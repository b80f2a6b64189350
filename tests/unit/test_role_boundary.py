"""The one exit-code boundary (coil/hypercoil.py) and the habits every role
shares: bad input is one line on stderr with the documented exit code and no
traceback; every role answers ``--version``; the error classes have one root."""

from __future__ import annotations

import ast
import glob
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys

import pytest

from helpers import hypercoil

import coil
from coil.errors import CoilError

ROLES = ["coil", "coild", "coilctl", "coil-controller", "coil-installer", "sandbox"]


@pytest.mark.parametrize("role", ROLES)
def test_every_role_answers_version(role):
    r = hypercoil(role, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{role} {coil.__version__}\n" and r.stderr == ""


def test_hypercoil_answers_version():
    r = hypercoil("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"hypercoil {coil.__version__} ")


def one_line(r, role: str, needle: str) -> str:
    assert r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"{role}: error: ") and needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    return r.stderr


@pytest.mark.parametrize("role,args,env,code,needle", [
    # usage errors: 2
    ("coilctl", ["--bogus"], {}, 2, "No such option '--bogus'"),
    ("coilctl", ["pool", "list", "-o", "yaml"], {}, 2, "'yaml' is not one of"),
    ("coild", ["--bogus"], {}, 2, "No such option '--bogus'"),
    ("coil-controller", ["--bogus"], {}, 2, "No such option '--bogus'"),
    ("coil-installer", ["--node", "x"], {}, 2, "unexpected argument '--node'"),
    ("sandbox", ["frobnicate"], {}, 2, "No such command 'frobnicate'"),
    # a CoilError (bad value): 1
    ("coilctl", ["--config", "/nonexistent/coilctl.yml", "pool", "list"], {}, 1,
     "config file /nonexistent/coilctl.yml does not exist"),
    ("coil-installer", [], {"COIL_LOG_LEVEL": "loud"}, 1, "invalid COIL_LOG_LEVEL 'loud'"),
])
def test_bad_input_is_one_line_with_the_documented_code(role, args, env, code, needle):
    r = hypercoil(role, *args, env=env)
    assert r.returncode == code, r.stderr
    one_line(r, role, needle)


def test_sandbox_error_goes_through_the_boundary(tmp_path):
    (tmp_path / "state.json").write_text("{corrupt")
    r = hypercoil("sandbox", "--state-dir", str(tmp_path), "status")
    assert r.returncode == 1, r.stderr
    one_line(r, "sandbox", "is corrupt")


def test_plugin_errors_stay_cni_error_objects():
    """The CNI plugin answers on stdout with an error object (CNI spec), not
    through the stderr line."""
    r = hypercoil("coil", input='{"socket": "/nonexistent/coild.sock", not json',
                  env={"CNI_COMMAND": "ADD"})
    assert r.returncode == 1 and r.stderr == ""
    err = json.loads(r.stdout)
    assert err["code"] == 11 and "/nonexistent/coild.sock" in err["msg"]


def test_every_exception_class_derives_from_coil_error():
    """One root: every exception class defined in the coil package is a CoilError."""
    outside = []
    for mod in pkgutil.walk_packages(coil.__path__, "coil."):
        if mod.name.startswith("coil._fast") or mod.name.endswith("__main__"):
            continue
        module = importlib.import_module(mod.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, BaseException)
                    and obj.__module__ == module.__name__ and not issubclass(obj, CoilError)):
                outside.append(f"{module.__name__}.{name}")
    assert outside == []


def test_moved_errors_are_reexported():
    from coil import errors
    from coil.coild.podnet import PodNetError
    from coil.store.model import BlockLost
    assert BlockLost is errors.BlockLost and issubclass(BlockLost, errors.Conflict)
    assert PodNetError is errors.PodNetError


def _exit_calls(tree):
    """(line, what) of every place a module ends the process itself."""
    main_blocks = set()
    for node in tree.body:
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            main_blocks.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            yield node.lineno, "SystemExit"
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("Exit", "_exit")):
            yield node.lineno, ast.unparse(node)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "exit"):
            # only 'python -m coil.X' blocks, and only through the boundary
            through = any(isinstance(c, ast.Call) and getattr(c.func, "id", "") == "run_role"
                          for c in ast.walk(node))
            if id(node) not in main_blocks or not through:
                yield node.lineno, ast.unparse(node)


def test_no_exit_code_is_decided_outside_the_boundary():
    """Only coil/hypercoil.py's run_role turns an outcome into an exit code:
    a command that must end with another code raises a CoilError whose
    exit_code says it (SmokeTestFailed, ProblemsFound: 3), never SystemExit,
    sys.exit or click's Exit; a module's own ``python -m`` block goes
    through run_role too."""
    root = os.path.dirname(coil.__file__)
    found = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if rel in ("hypercoil.py", "__main__.py"):
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        found += [f"coil/{rel}:{line}: {what}" for line, what in _exit_calls(tree)]
    assert found == []


@pytest.mark.parametrize("module,role", [("coil.coild.main", "coild"),
                                         ("coil.coilctl.cli", "coilctl"),
                                         ("coil.sandbox.cli", "sandbox")])
def test_python_m_of_a_role_module_ends_in_the_boundary(module, role):
    """``python -m coil.coild.main --bogus``: one line and exit 2, as through
    hypercoil (before, the UsageError ended in a traceback)."""
    r = subprocess.run([sys.executable, "-m", module, "--bogus"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    one_line(r, role, "No such option '--bogus'")


@pytest.mark.parametrize("args", [["version"], ["coilctl", "--help"]])
def test_a_closed_stdout_ends_quietly_with_exit_1(args):
    """A reader that went away (``hypercoil version | true``): exit 1 from the
    boundary, nothing on stderr (before: the version role died at shutdown
    with "Exception ignored ... BrokenPipeError" and exit 120)."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "coil", *args], stdout=write,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert (r.returncode, r.stderr) == (1, "")
