"""``make test`` asserts no absolute time.

It runs every benchmark once as a smoke test (``--benchmark-disable``) on
whatever machine it is given, often a loaded one. A benchmark's absolute
time target (``assert seconds < 15``) is checked only by ``make bench``:
inside ``if not benchmark.disabled:``. A fresh clone's ``make test`` once
failed on such an assert (1.88 s measured, ``> 2`` asserted).

Ratios against a peer measured in the same run are not absolute times and
are not looked at here. Nor are wait bounds (``wait_for(..., timeout=)``),
which only end a wait for something that must happen.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")

# names that hold a duration measured by the test itself
TIMED = re.compile(r"\b(seconds|mean|median|elapsed|took|duration|\w+_s|\w+_ms)\b|\[\"seconds\"\]")


def _is_number(node) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool)


def _timed_asserts(tree) -> list[ast.Assert]:
    """Asserts that compare a measured duration with a number."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert) or not isinstance(node.test, ast.Compare):
            continue
        sides = [node.test.left, *node.test.comparators]
        if not any(_is_number(s) for s in sides):
            continue
        if any(not _is_number(s) and TIMED.search(ast.unparse(s)) and "ratio" not in
               ast.unparse(s) for s in sides):
            found.append(node)
    return found


def _guarded(tree) -> set[int]:
    """ids of the nodes inside an ``if not benchmark.disabled:`` body."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "not benchmark.disabled":
            for stmt in node.body:
                inside.update(id(n) for n in ast.walk(stmt))
    return inside


def unguarded_timed_asserts(source: str) -> list[int]:
    """Line numbers of absolute-time asserts that a smoke run would check."""
    tree = ast.parse(source)
    guarded = _guarded(tree)
    return sorted(a.lineno for a in _timed_asserts(tree) if id(a) not in guarded)


def test_the_check_sees_an_absolute_time_assert():
    src = ("def test_x(benchmark):\n"
           "    best = run()\n"
           "    assert best['seconds'] < 15\n"
           "    assert mean < 10, 'slow'\n"
           "    assert ratio <= 1.5\n"
           "    assert len(results) == 3\n"
           "    if not benchmark.disabled:\n"
           "        assert elapsed_s < 2\n")
    assert unguarded_timed_asserts(src) == [3, 4]


def test_benchmarks_assert_absolute_times_only_when_benchmarking():
    offenders = []
    for name in sorted(os.listdir(BENCH)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(BENCH, name)) as f:
            lines = unguarded_timed_asserts(f.read())
        offenders += [f"bench/{name}:{n}" for n in lines]
    assert offenders == [], ("absolute time asserted in make test's smoke run (put it under "
                             "'if not benchmark.disabled:'): " + ", ".join(offenders))
