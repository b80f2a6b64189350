"""coild's CPU affinity (``--cpu-affinity``): all its threads on one CPU.

coild's request threads take turns holding Python's GIL: each netlink
request, namespace switch, socket call or etcd call hands it over. When
the threads run on different CPUs, each hand-over is a wake-up on the other
CPU (an inter-processor interrupt, a VM exit on a virtual machine) and the
thread giving the GIL away usually sleeps until it can take it back. On one
CPU the hand-over is a plain switch on that CPU. Measured under pod churn
(500 pods, 32 runtime workers, 2 CPUs): 88 -> 29 context switches and
2.5 -> 1.7 ms of coild CPU per pod, 330 -> 400 pods/s
(docs/benchmarks.md, "One CPU for coild"). The GIL lets coild use about
one CPU anyway; its kernel work (veths, routes) is short.

``auto`` (the default) picks one CPU of those the process may run on, by
the node's name, so that the coilds of a test cluster on one machine spread
over its CPUs; ``off`` leaves placement to the kernel; a list (``3``,
``2-3,6``) is used as given.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import zlib

from coil.errors import InvalidArgument

log = logging.getLogger("coild")

FLAG = "--cpu-affinity"
#: bound on "N-M" ranges: a typo such as 0-4000000000 is refused, not expanded
MAX_CPU = 65535


def allowed() -> set[int]:
    """The CPUs this process may run on (its cgroup's cpuset, taskset)."""
    return set(os.sched_getaffinity(0))


def format_cpus(cpus) -> str:
    """``{0, 1, 2, 5}`` -> ``"0-2,5"`` (the kernel's list format)."""
    out = []
    # consecutive CPUs share cpu - position in the sorted list
    for _, run in itertools.groupby(enumerate(sorted(cpus)), lambda p: p[1] - p[0]):
        run = [cpu for _, cpu in run]
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_cpus(text: str) -> set[int]:
    """``"2-3,6"`` -> ``{2, 3, 6}``. Raises InvalidArgument naming the value."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise InvalidArgument(f"invalid {FLAG} {text!r}: expected auto, off or a CPU list "
                                  f"such as 3 or 2-3,6")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first > last or last > MAX_CPU:
            raise InvalidArgument(f"invalid {FLAG} {text!r}: bad range {part!r}")
        cpus.update(range(first, last + 1))
    return cpus


def choose(setting: str, node: str, may_run_on: set[int] | None = None) -> set[int] | None:
    """The CPUs coild's threads are to run on, or None: leave them alone
    (``off``, or ``auto`` with a single CPU allowed anyway). Raises
    InvalidArgument naming the value (unparsable, or a CPU this process may
    not run on)."""
    may_run_on = allowed() if may_run_on is None else may_run_on
    setting = (setting or "").strip()
    if setting == "off":
        return None
    if setting == "auto":
        if len(may_run_on) <= 1:
            return None
        cpus = sorted(may_run_on)
        return {cpus[zlib.crc32(node.encode()) % len(cpus)]}
    wanted = parse_cpus(setting)
    outside = wanted - may_run_on
    if outside:
        raise InvalidArgument(
            f"invalid {FLAG} {setting!r}: CPU {format_cpus(outside)} is not one coild may run "
            f"on (allowed: {format_cpus(may_run_on)})",
            hint="name CPUs of the container's cpuset, or use auto or off")
    return wanted


def pin(cpus: set[int]) -> None:
    """Put every thread of this process on ``cpus``. Threads started later
    inherit it from the thread that starts them; a thread started while
    this runs is caught by the next pass. Raises OSError (EINVAL: none of
    ``cpus`` is online or in the cpuset)."""
    done: set[int] = set()
    while True:
        tids = {int(t) for t in os.listdir("/proc/self/task")} - done
        if not tids:
            return
        for tid in sorted(tids):
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:       # the thread ended meanwhile
                pass
            done.add(tid)


def apply(setting: str, node: str) -> str:
    """Resolve ``setting`` and pin coild's threads. Returns what was done,
    for the log: a CPU list, or ``"off"``. An explicit list that cannot be
    applied raises InvalidArgument; ``auto`` then leaves placement to the
    kernel with a warning."""
    cpus = choose(setting, node)
    if cpus is None:
        return "off"
    try:
        pin(cpus)
    except OSError as exc:
        if setting.strip() != "auto":
            raise InvalidArgument(f"invalid {FLAG} {setting!r}: {os.strerror(exc.errno or errno.EINVAL)}",
                                  hint="name online CPUs of the container's cpuset") from None
        log.warning("cpu affinity not set; the kernel places coild's threads",
                    extra={"cpus": format_cpus(cpus), "error": str(exc)})
        return "off"
    return format_cpus(cpus)
