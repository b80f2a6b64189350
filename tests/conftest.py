"""Shared fixtures: a real etcd server, unique key prefixes, root checks.

Tests are split by what they need: tests/unit (nothing), tests/integration
(etcd, network namespaces), tests/e2e (the multi-node sandbox). Fixtures
start real servers and always stop them, even on failure.
"""

from __future__ import annotations

import os
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
pytest_plugins = ["kube", "strict"]  # kube_apiserver fixture; skips fail under COIL_STRICT=1

from helpers import etcd_in_tmpdir  # noqa: E402


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        for kind in ("unit", "integration", "e2e"):
            if f"{os.sep}tests{os.sep}{kind}{os.sep}" in path:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def etcd_server():
    """One etcd for the whole session; tests isolate by key prefix."""
    with etcd_in_tmpdir("coil-etcd-") as server:
        yield server


@pytest.fixture
def tls_files(tmp_path):
    """Three existing (dummy) files standing in for CA, cert and key."""
    out = {}
    for name in ("ca", "cert", "key"):
        p = tmp_path / f"{name}.pem"
        p.write_text("dummy\n")
        out[name] = str(p)
    return out


@pytest.fixture
def etcd_prefix():
    return f"/coiltest-{uuid.uuid4().hex[:12]}/"


@pytest.fixture
def etcd_config(etcd_server, etcd_prefix):
    from coil.config import EtcdConfig
    return EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=etcd_prefix, timeout=5.0)


@pytest.fixture
def store(etcd_config):
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    s = IPAMStore(Etcd(etcd_config))
    try:
        yield s
    finally:
        s.close()
