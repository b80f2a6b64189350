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
