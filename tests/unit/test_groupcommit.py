"""GroupCommit: callers that arrive while a commit is in flight go out
together in the next one; a lone caller is committed at once; a failed
commit reaches every caller of its batch and no other. Deterministic: the
first commit is held on an event until the others are queued."""

from __future__ import annotations

import threading

import pytest

from coil.coild.groupcommit import GroupCommit
from helpers import wait_for


def queued(gc: GroupCommit, n: int):
    wait_for(lambda: len(gc._queue) >= n, timeout=10, interval=0.001,
             what=f"{n} callers queued")


class Held:
    """A commit function whose first call waits for ``release``."""

    def __init__(self, fail_on=None):
        self.batches: list[list] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"batch with {self.fail_on} failed")
        return [f"done-{i}" for i in items]


def run(gc, items):
    results, threads = {}, []
    for i in items:
        def call(i=i):
            try:
                results[i] = gc.submit(i)
            except RuntimeError as exc:
                results[i] = exc
        t = threading.Thread(target=call)
        t.start()
        threads.append(t)
    return results, threads


def behind_a_held_commit(gc: GroupCommit, commit: Held, items) -> tuple[dict, dict]:
    """Submit "lead", hold its commit, queue ``items`` behind it, let go;
    returns (lead's result, the items' results) once every caller is back."""
    first, t0 = run(gc, ["lead"])
    assert commit.entered.wait(10)
    results, threads = run(gc, items)
    queued(gc, len(items))
    commit.release.set()
    for t in t0 + threads:
        t.join(10)
    return first, results


def test_a_lone_caller_commits_alone_at_once():
    commit = Held()
    commit.release.set()
    gc = GroupCommit(commit)
    assert gc.submit("a") == "done-a"
    assert commit.batches == [["a"]] and (gc.batches, gc.items) == (1, 1)


def test_callers_arriving_during_a_commit_go_out_together():
    commit = Held()
    gc = GroupCommit(commit)
    first, results = behind_a_held_commit(gc, commit, range(5))
    assert commit.batches[0] == ["lead"]
    assert sorted(commit.batches[1]) == [0, 1, 2, 3, 4] and len(commit.batches) == 2
    assert first == {"lead": "done-lead"}
    assert results == {i: f"done-{i}" for i in range(5)}
    assert (gc.batches, gc.items) == (2, 6)


def test_max_batch_splits_the_queue():
    commit = Held()
    gc = GroupCommit(commit, max_batch=2)
    _, results = behind_a_held_commit(gc, commit, range(5))
    assert [len(b) for b in commit.batches] == [1, 2, 2, 1]
    assert sorted(i for b in commit.batches[1:] for i in b) == [0, 1, 2, 3, 4]
    assert results == {i: f"done-{i}" for i in range(5)}


def test_a_failed_commit_reaches_every_caller_of_its_batch_only():
    commit = Held(fail_on=3)
    gc = GroupCommit(commit, max_batch=3)
    _, results = behind_a_held_commit(gc, commit, [1, 2, 3, 4, 5, 6])
    failed = next(b for b in commit.batches if 3 in b)
    for i in range(1, 7):
        if i in failed:
            assert isinstance(results[i], RuntimeError), results
        else:
            assert results[i] == f"done-{i}"
    # the next caller is served normally
    assert gc.submit(7) == "done-7"


def test_commit_errors_are_not_swallowed_for_a_lone_caller():
    def boom(items):
        raise RuntimeError("etcd down")
    with pytest.raises(RuntimeError, match="etcd down"):
        GroupCommit(boom).submit("x")


def test_each_caller_of_a_failed_batch_raises_its_own_exception():
    """Threads raising one exception object at once would share (and
    overwrite) its traceback and context: each caller gets its own copy,
    of the same type and fields, caused by the commit's exception."""
    from coil.errors import NetlinkError, OutcomeUnknown

    for exc in (OutcomeUnknown("txn may or may not have committed", hint="read back"),
                NetlinkError("adding route 10.0.0.5/32", 17)):
        def boom(items, exc=exc):
            if "lead" in items:       # the held first commit succeeds
                return [None] * len(items)
            raise exc
        commit = Held()
        gc = GroupCommit(lambda items: commit(items) and boom(items), max_batch=8)
        got = {}
        first, _ = run(gc, ["lead"])
        assert commit.entered.wait(10)
        threads = []
        for i in range(4):
            def call(i=i):
                try:
                    gc.submit(i)
                except type(exc) as e:
                    got[i] = e
            t = threading.Thread(target=call)
            t.start()
            threads.append(t)
        queued(gc, 4)
        commit.release.set()
        for t in threads:
            t.join(10)
        assert sorted(got) == [0, 1, 2, 3]
        assert len({id(e) for e in got.values()}) == 4          # four objects
        assert sum(e is exc for e in got.values()) == 1         # the original once
        for e in got.values():
            assert type(e) is type(exc) and str(e) == str(exc) and e.hint == exc.hint
            assert e is exc or e.__cause__ is exc
        if isinstance(exc, NetlinkError):
            assert {e.errno for e in got.values()} == {17}
