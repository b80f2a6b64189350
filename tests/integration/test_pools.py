"""PoolResolver: the ADD path reads no pool from etcd while the background
refresh runs; new pools are picked up."""

from __future__ import annotations

import time

import pytest

from helpers import wait_for

from coil.coild.pools import PoolResolver
from coil.errors import NotFound


class CountingStore:
    """The real store, counting list_pools calls."""

    def __init__(self, store):
        self.store = store
        self.reads = 0

    def list_pools(self):
        self.reads += 1
        return self.store.list_pools()


def test_lookups_do_not_read_etcd_while_refreshed_in_background(store):
    store.create_pool("default", "10.60.0.0/24", 4)
    counting = CountingStore(store)
    r = PoolResolver(counting, refresh_interval=0.3)
    assert r.for_namespace("web") == "default"          # first lookup loads the names
    r.start()
    try:
        before = counting.reads
        for _ in range(200):
            assert r.for_namespace("web") == "default"
        assert counting.reads == before                  # no read on the lookup path
        store.create_pool("web", "10.61.0.0/24", 4)
        # a wait bound, not a timing target: the refresh runs every 0.3 s
        wait_for(lambda: r.for_namespace("web") == "web", timeout=60, interval=0.05,
                 what="the new namespace pool picked up")
        assert r.for_namespace("other") == "default"
    finally:
        r.stop()


def test_no_pool_asks_etcd_then_raises(store):
    counting = CountingStore(store)
    r = PoolResolver(counting, min_sync_interval=0.0)
    with pytest.raises(NotFound, match="neither pool 'x' nor pool 'default'"):
        r.for_namespace("x")
    store.create_pool("default", "10.62.0.0/24", 4)
    assert r.for_namespace("x") == "default"            # created a moment ago: found at once


def test_without_background_thread_names_expire(store):
    store.create_pool("default", "10.63.0.0/24", 4)
    r = PoolResolver(store, refresh_interval=0.2)
    assert r.for_namespace("team") == "default"
    store.create_pool("team", "10.64.0.0/24", 4)
    time.sleep(0.25)
    assert r.for_namespace("team") == "team"


def test_default_and_namespace_pool(store):
    store.create_pool("default", "10.0.0.0/16", 5)
    store.create_pool("global", "192.168.10.0/24", 2)
    r = PoolResolver(store)
    assert r.for_namespace("global") == "global"
    assert r.for_namespace("kube-system") == "default"
    assert r.for_namespace("default") == "default"
    assert r.for_namespace("") == "default"
    # a name no pool may have falls back to default
    assert r.for_namespace("Not_A_Label") == "default"


def test_namespace_pool_without_default(store):
    store.create_pool("global", "192.168.10.0/24", 2)
    r = PoolResolver(store)
    assert r.for_namespace("global") == "global"
    with pytest.raises(NotFound) as info:
        r.for_namespace("team-a")
    assert "team-a" in str(info.value) and "default" in str(info.value)


def test_no_pool_at_all(store):
    with pytest.raises(NotFound, match="default"):
        PoolResolver(store).for_namespace("default")
