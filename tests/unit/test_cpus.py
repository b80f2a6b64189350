"""coild's --cpu-affinity (coil/coild/cpus.py): parsing, the choice of
``auto``, and pinning every thread of a process, old and new."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, strategies as st

from coil.coild import cpus
from coil.errors import InvalidArgument

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("text, want", [
    ("3", {3}), ("0-2", {0, 1, 2}), ("2-3,6", {2, 3, 6}), (" 1 , 4-5 ", {1, 4, 5}), ("7-7", {7}),
])
def test_parse_cpus(text, want):
    assert cpus.parse_cpus(text) == want


@pytest.mark.parametrize("text", ["", "x", "1,", "-1", "3-1", "1-", "1.5", "0-70000", "on"])
def test_parse_cpus_refuses_and_names_the_value(text):
    with pytest.raises(InvalidArgument) as exc:
        cpus.parse_cpus(text)
    assert "--cpu-affinity" in exc.value.message and repr(text) in exc.value.message


@given(st.sets(st.integers(0, 300), min_size=1))
def test_format_then_parse_is_the_same_set(s):
    text = cpus.format_cpus(s)
    assert cpus.parse_cpus(text) == s
    assert cpus.format_cpus({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_off_and_a_single_allowed_cpu_leave_placement_alone():
    assert cpus.choose("off", "node1", {0, 1, 2, 3}) is None
    assert cpus.choose("auto", "node1", {5}) is None


def test_auto_is_one_allowed_cpu_by_node_name():
    allowed = {0, 2, 5, 9}
    picks = {name: cpus.choose("auto", name, allowed) for name in (f"node{i}" for i in range(40))}
    assert all(len(p) == 1 and p <= allowed for p in picks.values())
    assert picks == {n: cpus.choose("auto", n, allowed) for n in picks}     # the same each time
    assert set().union(*picks.values()) == allowed       # nodes spread over the CPUs


def test_a_list_must_be_cpus_the_process_may_run_on():
    assert cpus.choose("1-2", "n", {0, 1, 2, 3}) == {1, 2}
    with pytest.raises(InvalidArgument) as exc:
        cpus.choose("2-4", "n", {0, 1, 2})
    assert "'2-4'" in exc.value.message and "CPU 3-4 is not one" in exc.value.message
    assert "allowed: 0-2" in exc.value.message


CHILD = r"""
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
from coil.coild import cpus
target = {int(sys.argv[2])}
stop = threading.Event()
def aff(tid):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
old = [threading.Thread(target=stop.wait) for _ in range(3)]
for t in old: t.start()
before = {t: aff(t) for t in os.listdir("/proc/self/task")}
cpus.pin(target)
new = threading.Thread(target=stop.wait); new.start()
after = {t: aff(t) for t in os.listdir("/proc/self/task")}
stop.set()
print(json.dumps({"before": before, "after": after}))
"""


def test_pin_moves_every_thread_and_new_ones_inherit():
    allowed = cpus.allowed()
    target = max(allowed)
    r = subprocess.run([sys.executable, "-c", CHILD, REPO, str(target)], capture_output=True,
                       text=True, timeout=60, check=True)
    out = json.loads(r.stdout)
    assert len(out["before"]) == 4 and len(out["after"]) == 5          # main + 3, then + 1
    assert set(out["before"].values()) == {cpus.format_cpus(allowed)}
    assert set(out["after"].values()) == {str(target)}


def test_apply_when_pinning_fails(monkeypatch, caplog):
    """A cpuset that changed under coild (pinning answers EINVAL): ``auto``
    goes on unpinned with a warning, a list the operator named stops coild."""
    allowed = cpus.allowed()
    if len(allowed) < 2:          # auto would not pin at all: pretend two CPUs
        monkeypatch.setattr(cpus, "allowed", lambda: {0, 1})

    def refuse(_cpus):
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(cpus, "pin", refuse)
    with caplog.at_level("WARNING", logger="coild"):
        assert cpus.apply("auto", "node1") == "off"
    assert any("cpu affinity not set" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidArgument) as exc:
        cpus.apply(str(min(cpus.allowed())), "node1")
    assert "--cpu-affinity" in exc.value.message and "Invalid argument" in exc.value.message
    assert cpus.apply("off", "node1") == "off"


def test_apply_pins_and_names_the_cpu(monkeypatch):
    got = []
    monkeypatch.setattr(cpus, "allowed", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(cpus, "pin", got.append)
    assert cpus.apply("1-2", "n") == "1-2" and got == [{1, 2}]
    assert cpus.apply("auto", "n") == cpus.format_cpus(got[-1]) and len(got[-1]) == 1
