"""End-to-end fixtures: the multi-node sandbox (coil.sandbox).

``sandbox`` is module-scoped: one 3-node sandbox (3 pods per node, blocks of
8 addresses in the default pool so that a block fills quickly) is shared by
the tests of a module, and always removed afterwards, also on failure.
``make_sandbox`` builds private ones for tests that need their own life
cycle (safety, crash). Everything lives in namespaces named after a random
prefix and a state directory under /run; nothing touches the root network
namespace.
"""

from __future__ import annotations

import uuid

import pytest

from helpers import need_sandbox

from coil.sandbox.cluster import Config, Sandbox




def new_sandbox(tag: str) -> tuple[Sandbox, str]:
    rand = uuid.uuid4().hex[:6]
    return Sandbox(f"/run/coil-e2e-{tag}-{rand}"), f"cst{tag[:3]}{rand}"


@pytest.fixture(scope="module")
def sandbox():
    """A running 3-node sandbox: 3 default pods per node, one 'global' pod."""
    need_sandbox()
    sb, name = new_sandbox("mod")
    try:
        sb.up(Config(nodes=3, pods=3, name=name, block_size=3))
        yield sb
    finally:
        sb.down()
        sb.close()


@pytest.fixture
def make_sandbox():
    """``make(tag) -> Sandbox`` (not up yet); all are downed at teardown."""
    need_sandbox()
    made = []

    def make(tag: str = "fn"):
        sb, name = new_sandbox(tag)
        sb.test_name = name
        made.append(sb)
        return sb

    try:
        yield make
    finally:
        for sb in made:
            sb.down()
            sb.close()
