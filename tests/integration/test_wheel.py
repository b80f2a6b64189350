"""``pip install`` of a wheel, outside the checkout, is a working coil.

One wheel is built from the checkout (``pip wheel --no-build-isolation``,
with the Cython and setuptools of the test venv) and installed into a fresh
venv in a temporary directory. The third-party dependencies come from the
test venv through a ``.pth`` path line (a plain directory on sys.path after
the fresh venv's own site-packages: the test venv's editable coil is never
imported, which the tests assert). Every command runs with cwd=/ and a
PYTHONPATH-free environment, so nothing can come from the checkout.

The wheel's own proof: the native launcher is inside it and, installed,
execs the *fresh* venv's interpreter (it was built by another one); the
CNI VERSION command is answered by the launcher; and the packaged sandbox
(its own CNI executor, its package data) runs ``up``/``check``/``down``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import uuid
import zipfile

import pytest

from helpers import need_sandbox

pytestmark = [pytest.mark.integration]
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(venv: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv}/bin:" + env.get("PATH", "/usr/bin:/bin")
    env.pop("COIL_PURE_PYTHON", None)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv dir, wheel path): the wheel built and installed, outside the checkout."""
    top = str(tmp_path_factory.mktemp("wheel"))
    assert not top.startswith(REPO)
    dist = os.path.join(top, "dist")
    env = dict(os.environ, COIL_REQUIRE_FAST="1")
    env.pop("COIL_LAUNCHER_PYTHON", None)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation",
                        "--no-deps", REPO, "-w", dist],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = glob.glob(os.path.join(dist, "coil-*.whl"))
    venv = os.path.join(top, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True,
                   timeout=120)
    py = os.path.join(venv, "bin", "python")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q",
                        "--no-deps", "--no-index", wheel],
                       capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    # third-party dependencies only: the test venv's site-packages as a plain
    # path entry (its .pth files, among them the editable coil's, are not run)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "zz_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    return venv, wheel, site


def run(venv, *cmd, env=None, timeout=120, input=None):
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd="/",
                          env=env or _env(venv), timeout=timeout, input=input)


def test_wheel_holds_the_launcher_and_no_checkout_paths(installed):
    venv, wheel, _ = installed
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = {i.filename: i for i in z.infolist()}
    assert "coil/_fast/hypercoil" in names
    assert (info["coil/_fast/hypercoil"].external_attr >> 16) & 0o111, "launcher not executable"
    assert "coil/sandbox/data/rbac.yaml" in names
    assert "coil/sandbox/cniexec.py" in names
    assert any(n.startswith("coil/net/_netlink") and n.endswith(".so") for n in names)
    assert not any(n.startswith("tests/") or n.startswith("deploy/") for n in names)


def test_installed_package_is_the_wheel(installed):
    venv, _, site = installed
    r = run(venv, f"{venv}/bin/python", "-c",
            "import coil, json; print(json.dumps([coil.__file__, coil.launcher_path()]))")
    assert r.returncode == 0, r.stderr
    init, launcher = json.loads(r.stdout)
    assert init == os.path.join(site, "coil", "__init__.py")
    assert launcher == os.path.join(site, "coil", "_fast", "hypercoil")


def test_console_script_and_launcher_run_the_venvs_python(installed):
    venv, _, site = installed
    r = run(venv, f"{venv}/bin/hypercoil", "version", "-o", "json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backends"]["launcher"] == os.path.join(site, "coil", "_fast", "hypercoil")
    assert info["backends"]["bitmap"] != "python" and info["backends"]["netlink"] != "pyroute2"
    r = run(venv, f"{venv}/bin/hypercoil", "coilctl", "--help")
    assert r.returncode == 0 and "pool" in r.stdout, r.stderr

    launcher = os.path.join(site, "coil", "_fast", "hypercoil")
    # the launcher was built by the test venv's interpreter (baked in as the
    # fallback) ...
    with open(launcher, "rb") as f:
        assert sys.executable.encode() in f.read()
    # ... yet installed it execs the fresh venv's: only that interpreter
    # imports the wheel's coil, whose launcher_path() is the one in site
    # (the test venv's would import the checkout's coil and report its launcher)
    r = run(venv, launcher, "version", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["backends"]["launcher"] == launcher
    r = run(venv, launcher, "coilctl", "--help")
    assert r.returncode == 0 and "pool" in r.stdout, r.stderr


def test_cni_version_from_the_launcher(installed, tmp_path):
    venv, _, site = installed
    plugin = tmp_path / "coil"
    os.symlink(os.path.join(site, "coil", "_fast", "hypercoil"), plugin)
    env = dict(_env(venv), CNI_COMMAND="VERSION")
    r = run(venv, str(plugin), env=env, input='{"cniVersion": "1.0.0"}')
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cniVersion"] == "1.0.0"
    assert "1.0.0" in out["supportedVersions"] and "0.4.0" in out["supportedVersions"]


def test_wheel_launcher_is_compiled_with_the_protocol(installed, tmp_path):
    """setup.py generated protocol.h for the wheel's launcher: it sends the
    protocol's frame and falls back to the protocol's default socket."""
    from coil.cni import protocol
    venv, _, site = installed
    plugin = tmp_path / "coil"
    os.symlink(os.path.join(site, "coil", "_fast", "hypercoil"), plugin)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "c.sock")
    server.bind(path)
    server.listen(1)
    got = []

    def serve():
        conn, _ = server.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            got.append(b"".join(chunks))
            conn.sendall(protocol.encode_response(0, b"ok"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    stdin = b'{"socket": "%s", not json' % path.encode()      # relayed unchecked
    try:
        r = subprocess.run([str(plugin)], input=stdin, capture_output=True, timeout=60,
                           cwd="/", env=dict(_env(venv), CNI_COMMAND="ADD"))
        thread.join(30)
    finally:
        server.close()
    assert (r.returncode, r.stdout) == (0, b"ok"), r
    assert got == [protocol.encode_request({"CNI_COMMAND": "ADD"}, stdin)]
    if not os.path.exists(protocol.DEFAULT_SOCKET):
        r = run(venv, str(plugin), env=dict(_env(venv), CNI_COMMAND="ADD"), input="{}")
        assert json.loads(r.stdout)["msg"].startswith(
            f"coild is not reachable at {protocol.DEFAULT_SOCKET}: ")


@pytest.mark.root
@pytest.mark.e2e
def test_packaged_sandbox_up_check_down(installed):
    """``pip install`` plus etcd and BIRD is enough for the sandbox."""
    need_sandbox()
    venv, _, _ = installed
    state = f"/run/coil-wheel-{uuid.uuid4().hex[:6]}"
    name = f"cwh{uuid.uuid4().hex[:6]}"
    hc = f"{venv}/bin/hypercoil"
    try:
        r = run(venv, hc, "sandbox", "--state-dir", state, "up", "--nodes", "2", "--pods", "2",
                "--name", name, "-q", timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        r = run(venv, hc, "sandbox", "--state-dir", state, "check", "-o", "json", timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        report = json.loads(r.stdout)
        r = run(venv, hc, "sandbox", "--state-dir", state, "status", "-o", "json")
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        pods = status["pods"]
        assert len([p for p in pods if p.get("namespace", "default") == "default"]) == 4
        assert all(p.get("address") for p in pods)
        assert report
    finally:
        r = run(venv, hc, "sandbox", "--state-dir", state, "down", "-q", timeout=300)
        shutil.rmtree(state, ignore_errors=True)
    assert r.returncode == 0, r.stderr
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in leftover
