"""One owner for namespaces and rtnetlink: ``coil/net/``.

Outside ``coil/net/`` no code calls setns(2), opens a namespace file itself
or imports a backend by its private name; nowhere in ``coil/`` is an
address family guessed from the spelling of an address (``":" in addr``)
or an errno written as a number. Each check is also run on a sample of the
code it forbids (the copies this package replaced), so that a check that
can no longer fail is noticed.
"""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess

import pytest

COIL = pathlib.Path(__file__).resolve().parents[2] / "coil"
NET = COIL / "net"

#: identifiers only coil/net/ may use
NS_NAMES = re.compile(r"^_?(setns|CLONE_NEWNET|open_ns_fd|NS_LOCK)$")
#: strings that name a namespace file
NS_PATH = re.compile(r"/ns/net\b|/run/netns\b|thread-self/ns")
#: a family guessed from the spelling: ":" in addr, b":" in b, ':' not in x
SNIFF = re.compile(r"""[bB]?(["']):\1\s+(not\s+)?in\b""")
NS_FUNC = re.compile(r"netns|(^|_)ns(_|$)", re.I)
OPENERS = {"open", "os.open", "c_open", "io.open", "os.fdopen"}
PRIVATE_MODULES = ("coil._nsutil", "coil.net._netlink", "coil._netlink", "coil.netlink")


def _ignored(paths: list[pathlib.Path]) -> set[pathlib.Path]:
    """The paths git ignores (build output such as Cython's generated C, or
    a stale one left by an older layout); none when this is no checkout."""
    try:
        r = subprocess.run(["git", "-C", str(COIL), "check-ignore", "--stdin"],
                           input="\n".join(map(str, paths)), capture_output=True, text=True,
                           timeout=30)
    except OSError:
        return set()
    return {pathlib.Path(line) for line in r.stdout.splitlines()} if r.returncode in (0, 1) \
        else set()


def _sources(root: pathlib.Path, suffixes=(".py",)):
    found = [p for p in root.rglob("*") if p.suffix in suffixes and "__pycache__" not in p.parts]
    ignored = _ignored(found)
    return sorted(p for p in found if p not in ignored)


def _outside_net(suffixes=(".py",)):
    return [p for p in _sources(COIL, suffixes) if NET not in p.parents]


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _text(node) -> str:
    """The literal text of a str / f-string node ('' otherwise)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(v) for v in node.values)
    return ""


def namespace_code(source: str) -> list[str]:
    """What in ``source`` enters a namespace or opens a namespace file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and NS_NAMES.match(node.id):
            found.append(f"line {node.lineno}: {node.id}")
        elif isinstance(node, ast.Attribute) and NS_NAMES.match(node.attr):
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.alias) and NS_NAMES.match(node.name.rsplit(".")[-1]):
            found.append(f"line {node.lineno}: import {node.name}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names]
            for mod in mods:
                if mod.startswith(PRIVATE_MODULES):
                    found.append(f"line {node.lineno}: import {mod}")
        elif isinstance(node, ast.Call) and _dotted(node.func) in OPENERS and node.args:
            arg = node.args[0]
            name = _dotted(arg).lower()
            if NS_PATH.search(_text(arg)) or "netns" in name or name.endswith("ns_path"):
                found.append(f"line {node.lineno}: {_dotted(node.func)}({ast.unparse(arg)})")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                NS_FUNC.search(node.name):
            # a function named for namespaces that opens a file: a copy of ns_handle
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and _dotted(call.func) in OPENERS:
                    found.append(f"line {call.lineno}: {node.name} opens a file")
    return found


def raw_errnos(source: str) -> list[str]:
    """errno values written as numbers: ``Error(ctx, 19)``, ``x.errno == 19``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _dotted(node.func).endswith(("Error", "Exception")):
            for arg in node.args[1:2]:
                if isinstance(arg, ast.Constant) and type(arg.value) is int and arg.value:
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Compare) and _dotted(node.left).endswith("errno"):
            for comp in node.comparators:
                elts = comp.elts if isinstance(comp, (ast.Tuple, ast.Set, ast.List)) else [comp]
                if any(isinstance(e, ast.Constant) and type(e.value) is int for e in elts):
                    found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


# -- the checks fail on the code they forbid ------------------------------------

OLD_KUBE = '''
def _enter(self):
    from coil._nsutil import _setns
    fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY | os.O_CLOEXEC)
    err = _setns(fd)
'''
OLD_PODNET = '''
@staticmethod
def _open_netns(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
'''
OLD_HOME = '''home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)'''
OLD_ROUTES = '''
if lo is None:
    raise NetlinkError("looking up device lo", 19)
if exc.errno in (2, errno.ESRCH):
    pass
'''


def test_the_checks_find_the_old_copies():
    assert len(namespace_code(OLD_KUBE)) == 4        # the import, the name, open, the call
    assert namespace_code(OLD_PODNET) and namespace_code(OLD_HOME)
    assert namespace_code("import coil.net._netlink_py as py")
    assert len(raw_errnos(OLD_ROUTES)) == 2
    assert SNIFF.search('families = {":" in a for a in addresses}')
    assert SNIFF.search("family = AF_INET6 if b':' in b else AF_INET")
    assert SNIFF.search('existing = {4 if ":" not in a.address else 6: a}')
    # what is fine: the public helpers, errno names, a colon in a split
    assert not namespace_code("from coil.net.ns import in_netns\nwith in_netns(p): pass")
    assert not raw_errnos("raise NetlinkError('x', errno.ENODEV)\nif e.errno == errno.EEXIST: pass")
    assert not SNIFF.search('host, _, port = target.rpartition(":")')


# -- the tree -------------------------------------------------------------------

@pytest.mark.parametrize("path", _outside_net(), ids=lambda p: str(p.relative_to(COIL)))
def test_no_namespace_code_outside_coil_net(path):
    assert namespace_code(path.read_text()) == [], \
        "enter namespaces and open namespace files through coil.net.ns"


def test_no_setns_in_native_code_outside_coil_net():
    for path in _outside_net((".c", ".pyx", ".pxd", ".h")):
        assert not re.search(r"\bsetns\s*\(|/ns/net", path.read_text()), path


@pytest.mark.parametrize("path", _sources(COIL), ids=lambda p: str(p.relative_to(COIL)))
def test_no_raw_errno_numbers(path):
    assert raw_errnos(path.read_text()) == [], "use errno.ENODEV and friends"


def test_no_family_guessed_from_the_spelling():
    hits = [f"{p.relative_to(COIL)}:{n}: {line.strip()}"
            for p in _sources(COIL, (".py", ".pyx"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if SNIFF.search(line)]
    assert hits == [], "use ipaddress / coil.net.ip_version / Address.version"


def test_coil_net_names_the_namespace_helpers():
    """The package's own files do hold the one copy (the checks look at the
    right tree)."""
    assert namespace_code((NET / "ns.py").read_text())
    pyx = (NET / "_netlink.pyx").read_text()
    # the Cython backend enters through ns.in_netns, no second setns(2) copy
    assert "in_netns(" in pyx and not re.search(r"\bint setns\(|/proc/thread-self", pyx)


# -- the address type --------------------------------------------------------------

def test_ip_version_is_parsed_not_guessed():
    import ipaddress

    from coil.net.types import family_of, host_prefixlen, ip_version
    from coil.store.model import Address
    assert [ip_version(a) for a in ("10.0.0.1", "fd00::1", "::ffff:10.0.0.1")] == [4, 6, 6]
    assert ip_version(ipaddress.ip_address("fd00::5")) == 6
    assert (host_prefixlen("10.1.2.3"), host_prefixlen("fd00::1")) == (32, 128)
    import socket
    assert (family_of("10.1.2.3"), family_of("fd00::1")) == (socket.AF_INET, socket.AF_INET6)
    for bad in ("node1:2379", "10.0.0.256", ""):
        with pytest.raises(ValueError):
            ip_version(bad)
    rec = Address("fd00::7", "fd00::/120", 7, "ns", "pod", "c1", "")
    assert (rec.version, Address("10.0.0.7", "10.0.0.0/24", 7, "ns", "pod", "c1", "").version) \
        == (6, 4)
