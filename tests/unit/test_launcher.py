"""The CNI plugin client: the native launcher (coil/_fast/launcher.c) and its
pure-Python twin (coil/cni/plugin.py), tested side by side against a fake
coild (a UNIX socket server in a thread). Needs neither root nor coild.

Both clients must produce byte-identical output, so most expectations are
exact bytes built with json.dumps(..., separators=(",", ":")).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from coil.cni import plugin, spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "coil", "_fast", "launcher.c")
CC = shutil.which("cc")
# what setup.py links the shipped launcher with: musl-gcc -static when there
MUSL_CC = os.environ.get("COIL_LAUNCHER_CC") or shutil.which("musl-gcc")
REQUIRE_FAST = os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0")

DETAILS_START = plugin.DETAILS_START


# --------------------------------------------------------------------------
# building the launcher

def _compile(out: str, python: str, *extra: str, static: bool = False) -> None:
    """cc with the flags setup.py uses (-O2 -Wall, COIL_PYTHON baked in);
    ``static``: musl-gcc -static, as setup.py links the shipped launcher.
    Any compiler output (a warning) fails the test."""
    cc = MUSL_CC if static else CC
    if cc is None:
        if REQUIRE_FAST:
            pytest.fail(f"no C compiler ({'musl-gcc' if static else 'cc'}) but "
                        f"COIL_REQUIRE_FAST=1 (make deps installs it)")
        pytest.skip("no C compiler; the native launcher cannot be built")
    cmd = [cc, "-O2", "-Wall", *(["-static"] if static else []),
           f'-DCOIL_PYTHON="{python}"', *extra, "-o", out, SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", f"compiler warnings:\n{proc.stderr}"


@pytest.fixture(scope="module")
def build_dir():
    # short path: sun_path holds 108 bytes only
    path = tempfile.mkdtemp(prefix="coil-lt-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def hypercoil(build_dir) -> str:
    out = os.path.join(build_dir, "hypercoil")
    _compile(out, sys.executable, static=True)
    os.symlink("hypercoil", os.path.join(build_dir, "coil"))
    return out


@pytest.fixture(scope="module")
def hypercoil_fast_timeout(build_dir) -> str:
    """The same launcher with a 0.5 s relay timeout instead of 120 s."""
    out = os.path.join(build_dir, "hypercoil-t")
    _compile(out, sys.executable, "-DCOIL_RELAY_TIMEOUT_MS=500", static=True)
    os.mkdir(os.path.join(build_dir, "t"))
    os.symlink("../hypercoil-t", os.path.join(build_dir, "t", "coil"))
    return out


def _env(**cni) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(cni)
    return env


class Client:
    """Runs one CNI call through either client."""

    def __init__(self, kind: str, build_dir: str):
        self.kind = kind
        self.build_dir = build_dir

    def argv(self, fast_timeout: bool = False) -> list[str]:
        if self.kind == "c":
            sub = ("t", "coil") if fast_timeout else ("coil",)
            return [os.path.join(self.build_dir, *sub)]
        if fast_timeout:
            return [sys.executable, "-c",
                    "import sys, coil.cni.plugin as p; p.RELAY_TIMEOUT = 0.5; "
                    "sys.exit(p.main([]))"]
        return [sys.executable, "-m", "coil", "coil"]

    def run(self, stdin: bytes, fast_timeout: bool = False, **cni) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(fast_timeout), input=stdin, env=_env(**cni),
                              capture_output=True, timeout=60, cwd=REPO)


@pytest.fixture(params=["c", "python"])
def client(request, build_dir) -> Client:
    if request.param == "c":
        request.getfixturevalue("hypercoil")
        request.getfixturevalue("hypercoil_fast_timeout")
    return Client(request.param, build_dir)


# --------------------------------------------------------------------------
# a fake coild

class FakeCoild:
    """Accepts connections one after the other, records each request (read
    to EOF) and answers with `reply`; with hang=True it never answers."""

    def __init__(self, path: str, reply: bytes = b"0\n{}", hang: bool = False,
                 early: bool = False):
        self.path = path
        self.reply = reply
        self.hang = hang
        self.early = early      # answer after the first chunk, close unread
        self.requests: list[bytes] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if self.early:
                    self.requests.append(conn.recv(4096))
                    conn.sendall(self.reply)
                    continue
                chunks = []
                while chunk := conn.recv(1 << 20):
                    chunks.append(chunk)
                self.requests.append(b"".join(chunks))
                if self.hang:
                    self._stop.wait(30)
                    continue
                conn.sendall(self.reply)

    def close(self):
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(10)
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="coil-ls-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def coild(sock_dir):
    servers = []

    def start(**kwargs) -> FakeCoild:
        server = FakeCoild(os.path.join(sock_dir, f"coild{len(servers)}.sock"), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def dumps(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_bytes(code, msg, details="", version="1.1.0") -> bytes:
    return dumps(spec.error_object(code, msg, details, version))


def conf(socket_path=None, version="1.0.0", **extra) -> bytes:
    doc = {"cniVersion": version, "name": "k8s-pod-network", "type": "coil"}
    if socket_path is not None:
        doc["socket"] = socket_path
    doc.update(extra)
    return json.dumps(doc).encode()


# --------------------------------------------------------------------------
# VERSION

@pytest.mark.parametrize("stdin,version", [
    (b'{"cniVersion":"0.4.0"}', "0.4.0"),
    (b'{"cniVersion":"1.1.0","socket":"/nonexistent/coild.sock"}', "1.1.0"),
    (b"", "1.1.0"),
    (b"not json", "1.1.0"),
])
def test_version_is_answered_locally(client, stdin, version):
    proc = client.run(stdin, CNI_COMMAND="VERSION")
    assert proc.returncode == 0, proc
    assert proc.stdout == dumps({"cniVersion": version,
                                 "supportedVersions": list(spec.SUPPORTED_VERSIONS)})
    assert proc.stderr == b""


def test_supported_versions_constant_matches_spec():
    with open(SOURCE) as f:
        line = next(l for l in f if l.startswith("#define SUPPORTED_VERSIONS"))
    listed = re.findall(r'\\"([^\\"]*)\\"', line)
    assert tuple(listed) == spec.SUPPORTED_VERSIONS


# --------------------------------------------------------------------------
# coild not reachable

def test_missing_coild(client, sock_dir):
    path = os.path.join(sock_dir, "absent.sock")
    proc = client.run(conf(path, version="0.4.0"), CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(
        spec.ERR_TRY_AGAIN, f"coild is not reachable at {path}: {os.strerror(errno.ENOENT)}",
        DETAILS_START, "0.4.0")


def test_refused_connection(client, sock_dir):
    path = os.path.join(sock_dir, "dead.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)            # bound but not listening: ECONNREFUSED
    try:
        proc = client.run(conf(path), CNI_COMMAND="DEL")
    finally:
        s.close()
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["code"] == 11 and out["cniVersion"] == "1.0.0"
    assert out["msg"] == f"coild is not reachable at {path}: {os.strerror(errno.ECONNREFUSED)}"


def test_error_strings_are_json_escaped(client, sock_dir):
    path = os.path.join(sock_dir, 'we"ird\\pa\tth\x01ü')
    version = 'v"1\n'
    proc = client.run(conf(path, version=version), CNI_COMMAND="ADD")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["msg"] == f"coild is not reachable at {path}: {os.strerror(errno.ENOENT)}"
    assert out["cniVersion"] == version
    assert proc.stdout == error_bytes(11, out["msg"], DETAILS_START, version)


def test_socket_path_too_long(client):
    path = "/tmp/" + "x" * 200
    proc = client.run(conf(path), CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["msg"] == (
        f"coild is not reachable at {path}: {os.strerror(errno.ENAMETOOLONG)}")


def test_default_socket(client):
    if os.path.exists(plugin.DEFAULT_SOCKET):
        pytest.skip(f"{plugin.DEFAULT_SOCKET} exists on this machine")
    for stdin, version in [(conf(None, version="0.3.1"), "0.3.1"),
                           (conf(""), "1.0.0"),
                           (conf(42), "1.0.0")]:
        proc = client.run(stdin, CNI_COMMAND="ADD")
        assert proc.returncode == 1
        out = json.loads(proc.stdout)
        assert out["msg"].startswith(f"coild is not reachable at {plugin.DEFAULT_SOCKET}: ")
        assert out["cniVersion"] == version, stdin


@pytest.mark.parametrize("stdin", [b'{"socket":"/elsewhere.sock", broken',
                                   b'["socket", "/elsewhere.sock"]', b"", b"42"])
def test_not_an_object_is_a_decode_error(client, stdin):
    """Without a configuration the socket is unknown: answered locally."""
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(spec.ERR_DECODE, plugin.NOT_AN_OBJECT)


def test_stdin_too_large(client):
    stdin = b" " * (plugin.MAX_STDIN + 1)
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(spec.ERR_DECODE,
                                      "network configuration on stdin is larger than 16 MiB")


# --------------------------------------------------------------------------
# relay round trip

@pytest.mark.parametrize("code", [0, 7, 255])
def test_round_trip(client, coild, code):
    body = b'{"cniVersion":"1.0.0","ips":[]}\x00\xff binary \n tail'
    server = coild(reply=b"%d\n" % code + body)
    stdin = conf(server.path, extra="ünicode")
    env = dict(CNI_COMMAND="ADD", CNI_CONTAINERID="abc123", CNI_NETNS="/var/run/netns/x",
               CNI_IFNAME="eth0", CNI_ARGS="", CNI_PATH="/opt/cni/bin:/usr/lib/cni")
    proc = client.run(stdin, **env)
    assert proc.stdout == body
    assert proc.returncode == code
    assert server.requests == [
        b"COIL1\n"
        b"CNI_COMMAND=ADD\0CNI_CONTAINERID=abc123\0CNI_NETNS=/var/run/netns/x\0"
        b"CNI_IFNAME=eth0\0CNI_ARGS=\0CNI_PATH=/opt/cni/bin:/usr/lib/cni\0"
        b"\0" + stdin]


def test_round_trip_only_set_variables(client, coild):
    server = coild(reply=b"0\n")
    stdin = conf(server.path)
    proc = client.run(stdin, CNI_COMMAND="DEL", CNI_CONTAINERID="c1")
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert server.requests == [b"COIL1\nCNI_COMMAND=DEL\0CNI_CONTAINERID=c1\0\0" + stdin]


def test_round_trip_large(client, coild):
    body = bytes(random.Random(1).getrandbits(8) for _ in range(1 << 16)) * 64  # 4 MiB
    server = coild(reply=b"3\n" + body)
    stdin = conf(server.path, pad="x" * (3 << 20))
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert proc.returncode == 3
    assert proc.stdout == body
    assert server.requests[0].endswith(b"\0\0" + stdin)


def test_coild_answers_before_reading_everything(client, coild):
    """coild refuses a huge request early (EPIPE for the client): its answer
    still comes through."""
    server = coild(reply=b"1\n{\"code\":6}", early=True)
    proc = client.run(conf(server.path, pad="x" * (8 << 20)), CNI_COMMAND="ADD")
    assert (proc.returncode, proc.stdout) == (1, b'{"code":6}')


@pytest.mark.parametrize("reply", [b"", b"0", b"abc\n{}", b"256\n{}", b"1234\n",
                                   b"-1\n{}", b" 0\n{}", b"\n{}", b"0\r\n{}"])
def test_malformed_answer(client, coild, reply):
    server = coild(reply=reply)
    proc = client.run(conf(server.path, version="0.4.0"), CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(
        11, f"malformed answer from coild at {server.path}",
        "the answer must start with the exit code and a newline; check the coild log",
        "0.4.0")


def test_timeout(client, coild):
    server = coild(hang=True)
    proc = client.run(conf(server.path), fast_timeout=True, CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(
        11, f"coild at {server.path} did not answer within 0 s",
        "coild may be overloaded or hung; check the coild log", "1.0.0")


# --------------------------------------------------------------------------
# the "socket" key: only the top-level object counts

def test_socket_key_parsing(client, coild, sock_dir):
    server = coild(reply=b"0\nok")
    wrong = os.path.join(sock_dir, "wrong.sock")
    escaped = server.path.replace("/", "\\/")
    stdin = ('{"cniVersion":"1.0.0",'
             f'"ipam":{{"socket":"{wrong}","list":[{{"socket":"{wrong}"}}]}},'
             f'"name":"a \\"socket\\": \\"{wrong}\\" \\\\",'
             f'"socket":"{escaped}",'
             f'"args":{{"cni":{{"socket":"{wrong}"}}}},'
             '"x":[1,-2.5e+3,true,false,null,"\\u00fc\\ud83d\\ude00"],'
             f'"nested":[[["socket"]],{{"socket":{{"socket":"{wrong}"}}}}]}}').encode()
    json.loads(stdin)       # valid JSON
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert (proc.returncode, proc.stdout) == (0, b"ok")
    assert len(server.requests) == 1


def test_socket_key_unicode_escapes_and_last_duplicate_wins(client, coild, sock_dir):
    server = coild(reply=b"0\nok")
    wrong = os.path.join(sock_dir, "wrong.sock")
    spelled = "".join(f"\\u{ord(c):04x}" for c in server.path)
    stdin = (f'{{"socket":"{wrong}","\\u0073ocket":"{spelled}"}}').encode()
    assert json.loads(stdin)["socket"] == server.path
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert (proc.returncode, proc.stdout) == (0, b"ok")


def _random_doc(rng: random.Random, target: str, decoy: str, depth: int = 0):
    def value(d):
        kind = rng.randrange(8 if d < 4 else 5)
        if kind == 0:
            return rng.choice([0, -1, 3.25, 1e100, -0.0, 12345678901234567890])
        if kind == 1:
            return rng.choice([True, False, None])
        if kind == 2:
            return rng.choice(["", "socket", 'q"uo\\te', "\u00fc\u20ac\U0001f600", "\n\t\x01", decoy])
        if kind in (3, 4):
            return rng.choice(["x", "socket", "cniVersion"])
        if kind in (5, 6):
            return {rng.choice(["socket", "cniVersion", "a", 'k"ey']): value(d + 1)
                    for _ in range(rng.randrange(4))}
        return [value(d + 1) for _ in range(rng.randrange(4))]

    doc = {}
    for _ in range(rng.randrange(1, 6)):
        key = rng.choice(["socket", "cniVersion", "name", "ipam", "sock\u00e9t"])
        doc[key] = rng.choice([target, decoy, "1.0.0"]) if rng.random() < 0.5 else value(depth)
    return doc


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randrange(1, 3)):
        pos = rng.randrange(2, max(len(data), 3))   # keep the first bytes: json's
        op = rng.randrange(3)                        # encoding detection
        if op == 0 and pos < len(data):
            del data[pos]
        elif op == 1:
            data[pos:pos] = bytes([rng.choice(b'{}[],:"\\ u0eE.-+\x80\xc3\xff\x00\x1f')])
        elif pos < len(data):
            data[pos] = rng.randrange(256)
    return bytes(data)


def test_scanner_agrees_with_python_json(hypercoil, build_dir, sock_dir):
    """Differential test of the C JSON scanner: on valid and on broken
    documents it picks the same socket and cniVersion as json.loads()."""
    rng = random.Random(20240517)
    target = os.path.join(sock_dir, "t.sock")
    decoy = os.path.join(sock_dir, "d.sock")
    cases = []
    for i in range(600):
        doc = _random_doc(rng, target, decoy)
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1])).encode()
        cases.append(text if i % 3 == 0 else _mutate(rng, text))
    cases += [b"\xef\xbb\xbf" + json.dumps({"socket": target}).encode(),
              b'{"socket":"%s","n":NaN,"i":-Infinity,"j":Infinity}' % target.encode(),
              b'{"socket":"%s","n":01}' % target.encode(),
              b'{"socket":"%s","n":1.}' % target.encode(),
              b'{"socket":"%s","n":1e}' % target.encode(),
              b'{"socket":"%s","s":"\xed\xa0\x80"}' % target.encode(),
              b'{"socket":"%s","s":"\xc0\xaf"}' % target.encode(),
              b'{"socket":"%s"} x' % target.encode(),
              b'{"socket":"%s",}' % target.encode(),
              b'{"socket":"%s"}' % (b"\\ud800" + target.encode())]
    coil = os.path.join(build_dir, "coil")
    mismatches = []
    for data in cases:
        expected = plugin._Config(data)
        proc = subprocess.run([coil], input=data, env=_env(CNI_COMMAND="ADD"),
                              capture_output=True, timeout=30)
        out = json.loads(proc.stdout.decode("utf-8", "surrogatepass"))
        if not expected.is_object:
            want = (plugin.NOT_AN_OBJECT, spec.ERR_DECODE)
            got = (out["msg"], out["code"])
        else:
            want = (expected.socket, expected.cni_version)
            prefix = "coild is not reachable at "
            got = (out["msg"][len(prefix):].rsplit(": ", 1)[0], out["cniVersion"])
        if got != want:
            mismatches.append((data, want, got))
    assert not mismatches, mismatches[:5]


# --------------------------------------------------------------------------
# every other role execs Python

@pytest.fixture(scope="module")
def fake_python(build_dir) -> str:
    """A launcher whose COIL_PYTHON is a script printing its argv."""
    script = os.path.join(build_dir, "fakepy")
    with open(script, "w") as f:
        f.write('#!/bin/sh\nprintf "%s\\n" "$0" "$@"\n')
    os.chmod(script, 0o755)
    out = os.path.join(build_dir, "roles", "hypercoil")
    os.makedirs(os.path.dirname(out))
    _compile(out, script)
    for role in ("coild", "coilctl", "coil-controller", "coil-installer", "sandbox", "other"):
        os.symlink("hypercoil", os.path.join(build_dir, "roles", role))
    return script


@pytest.mark.parametrize("argv,expected", [
    (["hypercoil", "coilctl", "pool", "list"], ["-m", "coil", "coilctl", "pool", "list"]),
    (["hypercoil"], ["-m", "coil"]),
    (["hypercoil", "--help"], ["-m", "coil", "--help"]),
    (["coild", "--config", "x y"], ["-m", "coil", "coild", "--config", "x y"]),
    (["coild", "coil"], ["-m", "coil", "coild", "coil"]),
    (["coilctl", "pool", "list"], ["-m", "coil", "coilctl", "pool", "list"]),
    (["coil-controller"], ["-m", "coil", "coil-controller"]),
    (["coil-installer", "-v"], ["-m", "coil", "coil-installer", "-v"]),
    (["sandbox", "up"], ["-m", "coil", "sandbox", "up"]),
    (["other", "version"], ["-m", "coil", "version"]),
])
def test_roles_exec_python(fake_python, build_dir, argv, expected):
    exe = os.path.join(build_dir, "roles", argv[0])
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, env=_env(),
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [fake_python, *expected]


def test_hypercoil_coil_relays(hypercoil):
    proc = subprocess.run([hypercoil, "coil"], input=b'{"cniVersion":"0.3.1"}',
                          env=_env(CNI_COMMAND="VERSION"), capture_output=True, timeout=30)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["cniVersion"] == "0.3.1"


def test_exec_failure(build_dir):
    missing = os.path.join(build_dir, "no-such-python")
    out = os.path.join(build_dir, "hypercoil-broken")
    _compile(out, missing)
    proc = subprocess.run([out, "coilctl"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 127
    assert proc.stderr == f"hypercoil: cannot start {missing}: {os.strerror(errno.ENOENT)}\n"


def test_hypercoil_help_runs_python(hypercoil):
    proc = subprocess.run([hypercoil, "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: hypercoil ROLE")


def test_hypercoil_version_runs_python(hypercoil):
    proc = subprocess.run([hypercoil, "version"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "hypercoil" in proc.stdout


def test_coil_version_is_answered_by_python(hypercoil, build_dir):
    """'coil --version' (the CNI name, and 'hypercoil coil --version') prints
    the version like every role; without arguments it stays the CNI plugin."""
    from coil import __version__
    for argv in ([os.path.join(build_dir, "coil"), "--version"],
                 [hypercoil, "coil", "--version"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert (proc.returncode, proc.stdout) == (0, f"coil {__version__}\n"), proc.stderr
    proc = subprocess.run([os.path.join(build_dir, "coil")], input="{}", capture_output=True,
                          text=True, env=dict(os.environ, CNI_COMMAND="VERSION"), timeout=60)
    assert proc.returncode == 0 and "supportedVersions" in json.loads(proc.stdout)


def _elf_interpreter(path: str) -> bool:
    """Whether the ELF executable at ``path`` names a program interpreter
    (PT_INTERP: it is dynamically linked)."""
    import struct
    with open(path, "rb") as f:
        head = f.read(64)
        assert head[:4] == b"\x7fELF" and head[4] == 2, "not a 64-bit ELF file"
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def test_shipped_launcher_is_static(build_dir):
    """The launcher the build installs is linked statically (musl): the
    runtime execs it for every CNI call, and glibc's start-up alone costs
    ~0.7 ms of CPU per call on a VM (docs/benchmarks.md, "CNI")."""
    from coil import launcher_path
    path = launcher_path()
    if path is None or MUSL_CC is None:
        if REQUIRE_FAST:
            pytest.fail("no native launcher, or no musl-gcc (make deps installs musl-tools)")
        pytest.skip("no native launcher built with musl-gcc")
    assert not _elf_interpreter(path), f"{path} is dynamically linked"
    # the check tells the two apart: the default compiler links dynamically
    dynamic = os.path.join(build_dir, "hypercoil-dynamic")
    _compile(dynamic, sys.executable)
    assert _elf_interpreter(dynamic)


def test_strict_c99(hypercoil):
    """Also clean as strict C99 with extra warnings."""
    proc = subprocess.run([CC, "-std=c99", "-pedantic", "-Wall", "-Wextra", "-O2",
                           "-fsyntax-only", '-DCOIL_PYTHON="/usr/bin/python3"', SOURCE],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_python_twin_imports_stay_minimal():
    """The fallback plugin imports only os, sys, socket and json."""
    code = ("import sys; before = set(sys.modules); import coil.cni.plugin; "
            "print(sorted(set(sys.modules) - before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=True)
    new = set(json.loads(proc.stdout.replace("'", '"')))
    # coil.errors (spec's CNIError derives from the one root) imports nothing itself
    assert new <= {"coil", "coil.cni", "coil.cni.plugin", "coil.cni.protocol", "coil.cni.spec",
                   "coil.errors"}, new
