"""coild with pause points, for tests only (never packaged, never in deploy/).

    python tests/coild_hooked.py HOOK_DIR [coild options...]

Monkeypatches the no-op pause points of coild, then runs coild's own main().
Each line of ``HOOK_DIR/pause`` names a point where a request stops:
``CNIService._reached(point, req)`` for a request of a container listed
after the point (``add:wired c1``), or any container (``add:wired``).
On reaching it, the request creates ``HOOK_DIR/<point>.<container>.reached``
and waits until ``HOOK_DIR/<point>.<container>.resume`` exists (at most 60 s,
then it goes on). ``Coild._reached`` points (``shutdown:closed``) only
announce themselves with a ``.reached`` file.
"""

from __future__ import annotations

import os
import sys
import time


def _wait_for(path: str, bound: float = 60.0):
    end = time.monotonic() + bound
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.01)


def _touch(path: str):
    with open(path, "w"):
        pass


def main() -> int:
    hook_dir = sys.argv[1]
    argv = sys.argv[2:]
    wanted = {}
    with open(os.path.join(hook_dir, "pause")) as f:
        for line in f:
            parts = line.split()
            if parts:
                wanted.setdefault(parts[0], set()).update(parts[1:] or {"*"})

    from coil.cni import service as cniservice
    from coil.coild import main as coild_main

    def cni_reached(self, point, req):
        who = wanted.get(point)
        if not who or not ({"*", req.container_id} & who):
            return
        base = os.path.join(hook_dir, f"{point}.{req.container_id}")
        _touch(base + ".reached")
        _wait_for(base + ".resume")

    def coild_reached(self, point):
        _touch(os.path.join(hook_dir, f"{point}.reached"))

    cniservice.CNIService._reached = cni_reached
    coild_main.Coild._reached = coild_reached
    from coil.hypercoil import main as hypercoil_main
    return hypercoil_main(["coild", *argv])       # through the role boundary, like coild


if __name__ == "__main__":
    sys.exit(main())
