"""The role registry: argv[0] or argv[1] picks the role; backends reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import hypercoil


def test_first_argument_picks_role():
    r = hypercoil("coilctl", "--help")
    assert r.returncode == 0 and "Configure coil's address pools" in r.stdout


def test_unknown_role_names_it():
    r = hypercoil("frobnicate")
    assert r.returncode == 2
    assert "unknown role 'frobnicate'" in r.stderr and "coilctl" in r.stderr


def test_no_role_prints_usage():
    r = hypercoil()
    assert r.returncode == 2 and "usage: hypercoil ROLE" in r.stdout


def test_symlink_name_picks_role(tmp_path):
    entry = os.path.join(os.path.dirname(sys.executable), "hypercoil")
    link = tmp_path / "coilctl"
    link.symlink_to(entry)
    r = subprocess.run([str(link), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Configure coil's address pools" in r.stdout


@pytest.mark.parametrize("pure,expected", [("1", "python"), ("", "cython")])
def test_version_reports_backend(pure, expected):
    if expected == "cython" and os.environ.get("COIL_REQUIRE_FAST", "") in ("", "0"):
        import importlib.util
        if importlib.util.find_spec("coil._fast.bitmap") is None:
            pytest.skip("Cython extensions not built")
    r = hypercoil("version", "-o", "json", env={"COIL_PURE_PYTHON": pure})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backends"]["bitmap"] == expected
    assert info["backends"]["netlink"] == expected


def test_plugin_role_imports_nothing_heavy():
    code = ("import sys; import coil.hypercoil as h; h.ROLES['coil']; "
            "import coil.cni.plugin; "
            "heavy = [m for m in ('pyetcd', 'grpc', 'click', 'kubernetes', 'pyroute2', 'yaml') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
