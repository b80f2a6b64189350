"""tools/host-services.sh, the check `make demo` ends with (README: nothing
outside coil's namespaces is left running): it names an etcd started since
the snapshot, and on a systemd host the packages' own services
(etcd.service, bird.service), which `make deps` may have started before the
snapshot was taken. systemd is not this machine's init: a stand-in
`systemctl` answers is-active the way systemd does (0 active, 3 inactive)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "host-services.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=30)


def fake_systemd(tmp_path: Path, active: set[str]) -> dict:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ctl = bindir / "systemctl"
    cases = " ".join(sorted(active)) or "none"
    ctl.write_text("#!/bin/sh\n"
                   "[ \"$1\" = is-active ] || exit 1\n"
                   "unit=$3\n"
                   f"for a in {cases}; do [ \"$a\" = \"$unit\" ] && exit 0; done\n"
                   "exit 3\n")
    ctl.chmod(0o755)
    (tmp_path / "systemd").mkdir()
    return dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
                COIL_SYSTEMD_DIR=str(tmp_path / "systemd"))


def test_an_etcd_started_since_the_snapshot_is_named(tmp_path):
    snap = tmp_path / "before"
    assert run("snapshot", str(snap)).returncode == 0
    etcd = tmp_path / "etcd"                      # a process whose name is etcd
    shutil.copy("/bin/sleep", etcd)
    proc = subprocess.Popen([str(etcd), "60"])
    try:
        r = run("check", str(snap))
        assert r.returncode == 1, r
        assert f"  {proc.pid} " in r.stderr and "left running" in r.stderr, r.stderr
    finally:
        proc.kill()
        proc.wait()


def test_an_active_host_service_fails_the_check(tmp_path):
    env = fake_systemd(tmp_path, {"etcd.service", "bird.service"})
    snap = tmp_path / "before"
    assert run("snapshot", str(snap), env=env).returncode == 0
    r = run("check", str(snap), env=env)
    assert r.returncode == 1, r
    assert "host service etcd.service is running" in r.stderr, r.stderr
    assert "host service bird.service is running" in r.stderr, r.stderr
    assert "systemctl disable --now etcd.service" in r.stderr


def test_inactive_host_services_pass(tmp_path):
    env = fake_systemd(tmp_path, set())
    snap = tmp_path / "before"
    assert run("snapshot", str(snap), env=env).returncode == 0
    r = run("check", str(snap), env=env)
    # (another engineer's etcd may start meanwhile; no host service is named)
    assert "host service" not in r.stderr, r.stderr
