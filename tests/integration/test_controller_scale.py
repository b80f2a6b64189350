"""coil-controller's Node list and watch with hundreds of Nodes, on the real
kube-apiserver: the list is paged (``limit``/``continue``) and keeps one
page in memory, a dropped watch resumes from the last resourceVersion it
handled (no relist), and a 410 Gone relists, again in pages.

The API calls are real; ``CountingCore`` only records the arguments of each
``list_node`` call before passing it on.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import threading
import tracemalloc
import uuid

import pytest
import yaml

from helpers import REPO, wait_for

NODES = 300
PAGE = 40


class CountingCore:
    def __init__(self, core):
        self._core = core
        self.lists = []      # kwargs of each list (not watch) call
        self.watches = []    # resource_version of each watch call
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._core, name)

    def list_node(self, **kwargs):
        with self._lock:
            if kwargs.get("watch"):
                self.watches.append(kwargs.get("resource_version"))
            else:
                self.lists.append(dict(kwargs))
        return self._core.list_node(**kwargs)


@pytest.fixture(scope="module")
def controller_token(kube_apiserver):
    with open(os.path.join(REPO, "deploy", "rbac.yaml")) as f:
        kube_apiserver.apply([d for d in yaml.safe_load_all(f) if d])
    return kube_apiserver.service_account_token("kube-system", "coil-controller")


@pytest.fixture(scope="module")
def many_nodes(kube_apiserver):
    """NODES Node objects created through the API, deleted afterwards."""
    admin = kube_apiserver.core()
    tag = uuid.uuid4().hex[:8]
    names = [f"scale-{tag}-{i:04d}" for i in range(NODES)]

    def create(name):
        admin.create_node({"metadata": {"name": name, "labels": {"coil-scale": tag}}})

    try:
        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            list(ex.map(create, names))
        yield names
    finally:
        admin.delete_collection_node(label_selector=f"coil-scale={tag}")


def test_node_list_is_paged(kube_apiserver, controller_token, many_nodes):
    from coil.controller.watcher import NodeWatcher
    core = CountingCore(kube_apiserver.core(controller_token))
    w = NodeWatcher(core, lambda names: None, lambda name: None, page_size=PAGE)
    names, rv = w.list_nodes()
    assert set(many_nodes) <= names and rv
    assert len(core.lists) == math.ceil(len(names) / PAGE)
    assert all(c["limit"] == PAGE for c in core.lists)
    assert core.lists[0]["_continue"] is None
    assert all(c["_continue"] for c in core.lists[1:])


def test_node_list_keeps_one_page_in_memory(kube_apiserver, controller_token, many_nodes):
    """Peak Python memory of a relist: pages of 40 against one page of all."""
    from coil.controller.watcher import NodeWatcher
    core = kube_apiserver.core(controller_token)

    def peak(page):
        w = NodeWatcher(core, lambda names: None, lambda name: None, page_size=page)
        w.list_nodes()                         # warm the client (connection, models)
        tracemalloc.start()
        try:
            names, _ = w.list_nodes()
            return tracemalloc.get_traced_memory()[1], len(names)
        finally:
            tracemalloc.stop()

    paged, n = peak(PAGE)
    whole, n2 = peak(10 * NODES)
    assert n == n2 >= NODES
    assert paged * 2 < whole, (paged, whole)


def compact_kube_etcd(kube_apiserver, admin):
    """Make every resourceVersion read so far too old (a real 410 Gone):
    write once, then compact the API server's etcd at its newest revision,
    as kube-apiserver itself does every 5 minutes."""
    env = dict(os.environ, ETCDCTL_API="3")
    ep = kube_apiserver.etcd.endpoint
    admin.create_namespace({"metadata": {"name": f"scale-bump-{uuid.uuid4().hex[:8]}"}})
    out = subprocess.run(["etcdctl", "--endpoints", ep, "endpoint", "status", "-w", "json"],
                         capture_output=True, text=True, env=env, check=True).stdout
    rev = json.loads(out)[0]["Status"]["header"]["revision"]
    subprocess.run(["etcdctl", "--endpoints", ep, "compact", str(rev)],
                   capture_output=True, env=env, check=True)


class CompactingCore(CountingCore):
    """After the first page of the first list, compact the API server's etcd:
    the list's continue token is then too old and the next page is a 410."""

    def __init__(self, core, compact):
        super().__init__(core)
        self._compact = compact

    def list_node(self, **kwargs):
        resp = super().list_node(**kwargs)
        if not kwargs.get("watch") and self._compact is not None:
            compact, self._compact = self._compact, None
            compact()
        return resp


def test_watch_resumes_after_a_drop_and_relists_in_pages_after_410(
        kube_apiserver, controller_token, many_nodes):
    from kubernetes.client.exceptions import ApiException

    from coil.controller.metrics import ControllerMetrics
    from coil.controller.watcher import Backoff, NodeWatcher
    admin = kube_apiserver.core()
    core = CompactingCore(kube_apiserver.core(controller_token),
                          lambda: compact_kube_etcd(kube_apiserver, admin))
    synced, deleted = [], []
    metrics = ControllerMetrics()
    w = NodeWatcher(core, synced.append, deleted.append, metrics=metrics, page_size=PAGE,
                    backoff=Backoff(0.05, 0.2), watch_timeout=60)
    extra = f"scale-extra-{uuid.uuid4().hex[:8]}"
    # the continue token of the first list expires: 410 Gone on its second page
    with pytest.raises(ApiException) as info:
        w.list_nodes()
    assert info.value.status == 410
    assert len(core.lists) == 2
    core.lists.clear()
    core._compact = lambda: compact_kube_etcd(kube_apiserver, admin)
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    try:
        # the same 410 inside the run loop: counted as expired, listed again in pages
        wait_for(lambda: synced and core.watches, what="relist and a watch")
        assert metrics.watch_restarts.labels("expired")._value.get() == 1
        assert set(many_nodes) <= synced[0] and len(synced) == 1
        pages = math.ceil(len(synced[0]) / PAGE)
        assert pages > 1 and len(core.lists) == 2 + pages       # failed attempt + relist
        assert core.watches == [w.resource_version]             # from the list's version
        # an event moves the watch's resourceVersion on
        before = w.resource_version
        admin.create_node({"metadata": {"name": extra}})
        wait_for(lambda: w.resource_version != before, what="ADDED event handled")
        seen = w.resource_version
        lists = len(core.lists)
        # the connection drops: the next watch starts where the last one stopped
        with w._resp_lock:
            resp = w._resp
        resp.shutdown()
        wait_for(lambda: len(core.watches) > 1, what="watch resumed")
        assert core.watches[1] == seen
        assert len(core.lists) == lists, "a dropped watch must not relist"
        assert len(synced) == 1
        # and the resumed watch delivers deletions
        admin.delete_node(many_nodes[0])
        wait_for(lambda: many_nodes[0] in deleted, what="deletion seen by the resumed watch")
    finally:
        w.stop()
        t.join(10)
        try:
            admin.delete_node(extra)
        except Exception:   # noqa: BLE001 - already gone
            pass
    assert not t.is_alive()


def test_list_page_size_flag_is_validated():
    r = subprocess.run([sys.executable, "-m", "coil", "coil-controller", "--list-page-size", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--list-page-size" in lines[0] and "0" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
