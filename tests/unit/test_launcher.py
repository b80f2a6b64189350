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

import coil
from coil.cni import plugin, protocol, spec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "coil", "_fast", "launcher.c")
CC = shutil.which("cc")
# what setup.py links the shipped launcher with: musl-gcc -static when there
MUSL_CC = os.environ.get("COIL_LAUNCHER_CC") or shutil.which("musl-gcc")
REQUIRE_FAST = os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0")

DETAILS_START = plugin.DETAILS_START


# --------------------------------------------------------------------------
# building the launcher

def _include_dir(build_dir: str) -> str:
    """protocol.h written the way setup.py writes it."""
    sys.path.insert(0, REPO)
    try:
        from setup import write_protocol_header
    finally:
        sys.path.remove(REPO)
    include = os.path.join(build_dir, "include")
    write_protocol_header(include)
    return include


def _compile(out: str, python: str, *extra: str, static: bool = False) -> None:
    """cc with the flags setup.py uses (-O2 -Wall, COIL_PYTHON baked in, the
    generated protocol.h); ``static``: musl-gcc -static, as setup.py links
    the shipped launcher. Any compiler output (a warning) fails the test."""
    cc = MUSL_CC if static else CC
    if cc is None:
        if REQUIRE_FAST:
            pytest.fail(f"no C compiler ({'musl-gcc' if static else 'cc'}) but "
                        f"COIL_REQUIRE_FAST=1 (make deps installs it)")
        pytest.skip("no C compiler; the native launcher cannot be built")
    include = _include_dir(os.path.dirname(out))
    cmd = [cc, "-O2", "-Wall", *(["-static"] if static else []),
           f'-DCOIL_PYTHON="{python}"', "-I", include, *extra, "-o", out, SOURCE]
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


# --------------------------------------------------------------------------
# the protocol's constants come from coil/cni/protocol.py only

def test_launcher_spells_no_protocol_constant():
    """launcher.c takes its protocol constants from the generated protocol.h:
    a copy of one of them in the C source fails here (CNI_COMMAND itself is
    read by name: VERSION and STATUS are the spec's)."""
    with open(SOURCE) as f:
        source = f.read()
    assert '#include "protocol.h"' in source
    names = re.findall(r"^#define (\w+)", protocol.c_header(), re.M)
    assert {"RELAY_MAGIC", "DEFAULT_SOCKET", "SUPPORTED_VERSIONS", "RELAY_ENV_KEYS",
            "COIL_RELAY_TIMEOUT_MS"} <= set(names)
    redefined = [n for n in names if re.search(rf"^\s*#\s*define\s+{n}\b", source, re.M)]
    assert redefined == []
    values = [protocol.MAGIC.decode().strip(), protocol.DEFAULT_SOCKET,
              *protocol.SUPPORTED_VERSIONS[:-1], *protocol.ENV_KEYS[1:],
              str(int(protocol.RELAY_TIMEOUT * 1000)), str(protocol.MAX_STDIN)]
    assert [v for v in values if v in source] == []


def test_generated_header_carries_the_protocol(build_dir):
    with open(os.path.join(_include_dir(build_dir), "protocol.h")) as f:
        header = f.read()
    assert header == protocol.c_header()
    defines = dict(re.findall(r"^#define (\w+) (.+)$", header, re.M))
    assert defines["DEFAULT_SOCKET"] == f'"{protocol.DEFAULT_SOCKET}"'
    assert defines["RELAY_MAGIC"] == '"COIL1\\n"'
    assert re.findall(r'\\"([^\\"]*)\\"', defines["SUPPORTED_VERSIONS"]) == \
        list(spec.SUPPORTED_VERSIONS)
    assert re.findall(r'"(\w+)"', defines["RELAY_ENV_KEYS"]) == list(protocol.ENV_KEYS)
    assert int(defines["COIL_CONNECT_TIMEOUT_MS"]) == protocol.CONNECT_TIMEOUT * 1000
    assert int(defines["COIL_RELAY_TIMEOUT_MS"]) == protocol.RELAY_TIMEOUT * 1000
    assert (int(defines["ERR_DECODE"]), int(defines["ERR_TRY_AGAIN"]),
            int(defines["ERR_NOT_AVAILABLE"])) == (spec.ERR_DECODE, spec.ERR_TRY_AGAIN,
                                                   spec.ERR_NOT_AVAILABLE)


def test_built_launcher_speaks_the_protocol(sock_dir):
    """The launcher setup.py built (make core) sends protocol.MAGIC and the
    ENV_KEYS, answers VERSION with protocol.SUPPORTED_VERSIONS and falls
    back to protocol.DEFAULT_SOCKET."""
    exe = coil.launcher_path()
    if exe is None:
        if REQUIRE_FAST:
            pytest.fail("the native launcher was not built but COIL_REQUIRE_FAST=1")
        pytest.skip("the native launcher was not built")
    link = os.path.join(sock_dir, "coil")
    os.symlink(exe, link)
    proc = subprocess.run([link], input=b"{}", env=_env(CNI_COMMAND="VERSION"),
                          capture_output=True, timeout=30)
    assert json.loads(proc.stdout)["supportedVersions"] == list(protocol.SUPPORTED_VERSIONS)
    server = FakeCoild(os.path.join(sock_dir, "c.sock"), reply=b"0\n")
    try:
        stdin = conf(server.path)
        env = {k: f"v{i}" for i, k in enumerate(protocol.ENV_KEYS)}
        proc = subprocess.run([link], input=stdin, env=_env(**env), capture_output=True,
                              timeout=30)
        assert proc.returncode == 0, proc
    finally:
        server.close()
    assert server.requests == [protocol.encode_request(env, stdin)]
    if not os.path.exists(protocol.DEFAULT_SOCKET):
        proc = subprocess.run([link], input=b"{}", env=_env(CNI_COMMAND="ADD"),
                              capture_output=True, timeout=30)
        assert json.loads(proc.stdout)["msg"].startswith(
            f"coild is not reachable at {protocol.DEFAULT_SOCKET}: ")


# --------------------------------------------------------------------------
# coild not reachable

def test_missing_coild(client, sock_dir):
    path = os.path.join(sock_dir, "absent.sock")
    proc = client.run(conf(path, version="0.4.0"), CNI_COMMAND="ADD")
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(
        spec.ERR_TRY_AGAIN, f"coild is not reachable at {path}: {os.strerror(errno.ENOENT)}",
        DETAILS_START, "0.4.0")


@pytest.mark.parametrize("command,code", [("ADD", 11), ("DEL", 11), ("CHECK", 11),
                                          ("GC", 11), ("STATUS", 50)])
def test_unreachable_code_per_command(client, sock_dir, command, code):
    """coild out of reach: 11 (try again) for ADD/DEL/CHECK/GC; STATUS 50
    (the plugin cannot serve: the runtime marks the node not ready)."""
    path = os.path.join(sock_dir, "absent.sock")
    proc = client.run(conf(path, version="1.1.0"), CNI_COMMAND=command)
    assert proc.returncode == 1
    assert proc.stdout == error_bytes(
        code, f"coild is not reachable at {path}: {os.strerror(errno.ENOENT)}",
        DETAILS_START, "1.1.0")


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


@pytest.mark.parametrize("tail", [b', broken', b',"x":[1,2', b'}} trailing', b',"n":NaN}',
                                  b',"a":"\\q"}', b',"s":"\xff\xfe\x01"}', b'}' + b"[" * 5000])
def test_malformed_json_is_relayed_to_coild(client, coild, tail):
    """The plain relay: a document that is not valid JSON goes to coild as
    it is (coild answers the CNI error object, which the plugin prints)."""
    server = coild(reply=b'1\n{"cniVersion": "0.4.0", "code": 6, "msg": "not JSON"}')
    stdin = b'{"cniVersion":"0.4.0","socket":"%s"' % server.path.encode() + tail
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert (proc.returncode, proc.stdout) == (1, b'{"cniVersion": "0.4.0", "code": 6, '
                                                 b'"msg": "not JSON"}')
    assert server.requests == [b"COIL1\nCNI_COMMAND=ADD\0\0" + stdin]


@pytest.mark.parametrize("stdin", [b'["socket", "/elsewhere.sock"]', b"", b"42", b"not json",
                                   b'{"cniVersion":"0.4.0" "socket":"/elsewhere.sock"}'])
def test_no_socket_found_means_the_default(client, stdin):
    """Not an object, or broken before the socket key: the default socket
    (no coild there: error 11 naming it, in the version the scan found)."""
    if os.path.exists(protocol.DEFAULT_SOCKET):
        pytest.skip(f"{protocol.DEFAULT_SOCKET} exists on this machine")
    proc = client.run(stdin, CNI_COMMAND="ADD")
    assert proc.returncode == 1
    version = "0.4.0" if stdin.startswith(b'{"cniVersion"') else "1.1.0"
    assert proc.stdout == error_bytes(
        spec.ERR_TRY_AGAIN, f"coild is not reachable at {protocol.DEFAULT_SOCKET}: "
        f"{os.strerror(errno.ENOENT)}", DETAILS_START, version)


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


def _json_view(data: bytes) -> tuple:
    """(socket, cniVersion) the way a JSON parser sees a valid document."""
    doc = json.loads(data)
    pick = [doc.get(k) for k in ("socket", "cniVersion")]
    return tuple(v.encode("utf-8", "surrogatepass") if isinstance(v, str) and v else None
                 for v in pick)


def test_scan_agrees_with_json_on_valid_documents():
    """On valid JSON the minimal scan finds what json.loads finds: nested
    keys and string values that contain "socket" never count, escapes are
    decoded, the last duplicate wins, a non-string means the default."""
    rng = random.Random(7)
    for _ in range(2000):
        doc = _random_doc(rng, "/t.sock", "/d.sock")
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1])).encode("utf-8", "surrogatepass")
        sock, version = protocol.scan_netconf(text)
        assert (sock or None, version or None) == _json_view(text), text
    for text in [b'{"socket":"/a","\\u0073ocket":"/b"}', b'{"socket":"/a","socket":7}',
                 b'\xef\xbb\xbf {"socket" : "\\/x\\ud83d\\ude00\\u00fc"}',
                 b'{"a":{"socket":"/n"},"b":["socket","/n"],"c":"\\"socket\\":\\"/n\\""}',
                 b'{"s":"\\ud800","socket":"\\ud800\\u0041"}']:
        sock, version = protocol.scan_netconf(text)
        assert (sock or None, version or None) == _json_view(text), text


def test_scan_stops_quietly_on_broken_documents():
    scan = protocol.scan_netconf
    assert scan(b'{"socket":"/a", broken') == (b"/a", None)
    # brackets are counted, not matched
    assert scan(b'{"x":[1,{"socket":"/n"}}, "socket":"/a"}') == (b"/a", None)
    assert scan(b'{"socket":"/a" "socket":"/b"}') == (b"/a", None)
    assert scan(b'{"socket":"/a\\q"}') == (None, None)              # unknown escape
    assert scan(b'{"socket":"/a') == (None, None)                    # unterminated
    assert scan(b'{"socket":"\\u12"}') == (None, None)
    assert scan(b'{"x":"unterminated, "socket":"/a"}') == (None, None)
    assert scan(b'["socket","/a"]') == (None, None)
    assert scan(b'') == (None, None)
    assert scan(b'{"socket":"\xff\x01/a"}') == (b"\xff\x01/a", None)   # bytes as they are


def test_scanner_agrees_with_the_python_twin(hypercoil, build_dir, sock_dir):
    """Differential test of the C scan against protocol.scan_netconf (the
    pure-Python plugin's) on valid and on broken documents: the same socket
    and cniVersion, so the same bytes on stdout."""
    rng = random.Random(20240517)
    target = os.path.join(sock_dir, "t.sock")
    decoy = os.path.join(sock_dir, "d.sock")
    cases = []
    for i in range(600):
        doc = _random_doc(rng, target, decoy)
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1])).encode("utf-8", "surrogatepass")
        cases.append(text if i % 3 == 0 else _mutate(rng, text))
    cases += [b"\xef\xbb\xbf" + json.dumps({"socket": target}).encode(),
              b'{"socket":"%s","n":NaN,"i":-Infinity,"j":Infinity}' % target.encode(),
              b'{"socket":"%s","n":01}' % target.encode(),
              b'{"socket":"%s","s":"\xed\xa0\x80"}' % target.encode(),
              b'{"socket":"%s"} x' % target.encode(),
              b'{"socket":"%s",}' % target.encode(),
              b'{"socket":"%s"}' % (b"\\ud800" + target.encode()),
              b'{"socket":"%s\\u' % target.encode(),
              b'{"socket":"%s\\' % target.encode(),
              b'{"x":"\\ud83d\\u00', b'{"cniVersion":"\\ud83d\\ude0"}']
    coil = os.path.join(build_dir, "coil")
    mismatches = []
    for data in cases:
        sock, version = protocol.scan_netconf(data)
        want = plugin.error_bytes(
            spec.ERR_TRY_AGAIN, b"coild is not reachable at "
            + (sock or protocol.DEFAULT_SOCKET.encode()) + b": ", b"",
            version or protocol.DEFAULT_CNI_VERSION.encode())
        want = want[:want.index(b': ","details"') + 2]       # up to the errno text
        proc = subprocess.run([coil], input=data, env=_env(CNI_COMMAND="ADD"),
                              capture_output=True, timeout=30, cwd=sock_dir)
        if not proc.stdout.startswith(want):
            mismatches.append((data, want, proc.stdout))
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
                           "-fsyntax-only", '-DCOIL_PYTHON="/usr/bin/python3"',
                           "-I", _include_dir(os.path.dirname(hypercoil)), SOURCE],
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_python_twin_imports_stay_minimal():
    """The fallback plugin imports only os, sys and socket (no json: the
    minimal scan of coil/cni/protocol.py finds the socket)."""
    code = ("import sys; before = set(sys.modules); import coil.cni.plugin; "
            "print(sorted(set(sys.modules) - before))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60, check=True)
    new = set(json.loads(proc.stdout.replace("'", '"')))
    # coil.errors (spec's CNIError derives from the one root) imports nothing itself
    assert new <= {"coil", "coil.cni", "coil.cni.plugin", "coil.cni.protocol", "coil.cni.spec",
                   "coil.errors"}, new
