"""coild's REST API is locked down: a real coild in a node namespace, real etcd.

- POST/DELETE only on the root-only API socket; the TCP listener is
  read-only, also for an unprivileged local user (uid 65534 via setpriv);
- the socket is 0600 root, and SO_PEERCRED refuses a non-root peer even
  when the file mode would let it in;
- idle connections do not pin threads; a short body times out;
- malformed requests get a JSON 4xx, no traceback in the log, nothing in etcd;
- a port or socket in use: one line, non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import stat
import tempfile

import pytest

from harness import Coild, Netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
SYSTEM_PYTHON = "/usr/bin/python3"      # stdlib only, readable by nobody


@pytest.fixture
def rundir():
    """A directory under /run that uid 65534 may traverse (0755), so that only
    the socket's own mode and SO_PEERCRED keep it out."""
    path = tempfile.mkdtemp(prefix="coiltest-api-", dir="/run")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def node():
    ns = Netns("node")
    try:
        yield ns
    finally:
        ns.delete()


@pytest.fixture
def coild(etcd_server, store, etcd_prefix, tmp_path, node, rundir):
    store.create_pool("default", "10.40.0.0/24", 4)
    c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix,
              extra=["--read-timeout", "2s", "--idle-timeout", "2s"])
    c.api_socket = os.path.join(rundir, "api.sock")
    try:
        yield c.start()
    finally:
        c.stop()


def tcp(node: Netns, port: int = 9383) -> socket.socket:
    """A TCP connection to coild's --http inside the node namespace (the
    socket keeps the namespace it was created in)."""
    from coil.net.ns import in_netns
    with in_netns(node.path):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s


def unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def exchange(sock: socket.socket, raw: bytes) -> tuple[int | None, dict | None, bool]:
    """Send raw bytes, read one answer: (status, JSON body, closed). ``closed``:
    the server closed the connection after it (checked by reading EOF when the
    answer says ``Connection: close``, or when there is no answer at all)."""
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            assert not data, data
            return None, None, True
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the answer"
        body += chunk
    closed = headers.get("connection") == "close"
    if closed:
        assert sock.recv(65536) == b""
    sock.close()
    return status, json.loads(body), closed


def as_nobody(node: Netns, script: str, *args) -> dict:
    r = node.exec(*NOBODY, SYSTEM_PYTHON, "-c", script, *args, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


NOBODY_CLIENT = r"""
import http.client, json, socket, sys
out = {"uid": __import__("os").getuid()}
def call(method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", 9383, timeout=10)
    c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
    r = c.getresponse()
    return [r.status, json.loads(r.read())]
out["post"] = call("POST", "/ip", json.dumps({"pod-namespace": "default", "pod-name": "evil",
                                              "container-id": "e1"}))
out["delete"] = call("DELETE", "/ip/default/web/c1")
out["get"] = call("GET", "/ip/default/web/c1")
out["status"] = call("GET", "/status")[0]
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.sendall(b"DELETE /ip/default/web/c1 HTTP/1.1\r\nHost: x\r\n\r\n")
    out["socket"] = s.recv(65536).decode()
except OSError as exc:
    out["socket"] = "error:" + type(exc).__name__
print(json.dumps(out))
"""


def test_unprivileged_user_cannot_change_anything(coild, node, store):
    status, body = coild.rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "web",
                                              "container-id": "c1"})
    assert status == 200
    ip = body["address"]
    st = os.stat(coild.api_socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0

    out = as_nobody(node, NOBODY_CLIENT, coild.api_socket)
    assert out["uid"] == 65534
    for key in ("post", "delete"):
        code, err = out[key]
        assert code == 403 and err["status"] == 403
        assert "--api-socket" in err["error"] and coild.api_socket in err["error"]
    assert out["get"] == [200, {"address": ip, "addresses": [ip], "status": 200}]
    assert out["status"] == 200
    assert out["socket"] == "error:PermissionError"
    # nothing changed: the pod keeps its address, "evil" got none
    assert coild.rest("GET", "/ip/default/web/c1")[0] == 200
    assert coild.rest("GET", "/ip/default/evil/e1")[0] == 404
    # root over TCP is refused too: the listener itself is read-only
    assert coild.rest("DELETE", "/ip/default/web/c1", via="tcp")[0] == 403
    # root over the socket can
    assert coild.rest("DELETE", "/ip/default/web/c1") == (200, {"address": ip, "status": 200})
    assert coild.rest("GET", "/ip/default/web/c1", via="unix")[0] == 404


def test_peercred_refuses_non_root_even_through_an_open_socket(coild, node):
    os.chmod(coild.api_socket, 0o666)         # an operator's mistake
    script = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(b"POST /ip HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
data = b""
while True:
    c = s.recv(65536)
    if not c: break
    data += c
print(__import__("json").dumps(data.decode()))
"""
    r = node.exec(*NOBODY, SYSTEM_PYTHON, "-c", script, coild.api_socket, check=False)
    assert r.returncode == 0, r.stderr
    answer = json.loads(r.stdout)
    assert answer.startswith("HTTP/1.1 403 ")
    body = json.loads(answer.split("\r\n\r\n", 1)[1])
    assert body["status"] == 403 and "uid 65534" in body["error"]
    assert coild.rest("GET", "/status", via="unix")[0] == 200      # root still served


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def test_idle_connections_do_not_pin_threads(coild, node):
    pid = coild.proc.pid
    assert coild.rest("GET", "/status")[0] == 200
    threads_before, sockets_before = _threads(pid), _sockets(pid)
    idle = [tcp(node) for _ in range(300)]
    try:
        # a normal request meanwhile: answered (after every earlier connect was accepted)
        status, body = coild.rest("GET", "/status")
        assert status == 200 and body["status"] == 200
        assert _threads(pid) <= threads_before          # no thread per connection
        # at most --max-connections (256) stay open: the longest idle were closed
        assert _sockets(pid) <= sockets_before + 256
        readable, _, _ = select.select(idle, [], [], 0)
        closed = sum(1 for s in readable if s.recv(1) == b"")
        assert closed >= 300 - 256
    finally:
        for s in idle:
            s.close()
    assert coild.rest("GET", "/healthz")[0] == 200


def test_short_body_times_out_and_coild_still_answers(coild, node, store):
    # the API socket: a POST whose body never completes (--read-timeout 2s)
    status, body, closed = exchange(
        unix(coild.api_socket),
        b"POST /ip HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{\"pod-namespace\":")
    assert (status, body["status"], closed) == (408, 408, True)
    # TCP serves no POST; a GET with a body is refused at once, never waited for
    status, body, closed = exchange(
        tcp(node), b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert (status, closed) == (400, True) and "no request body" in body["error"]
    # headers that never end: closed without an answer
    status, body, closed = exchange(tcp(node), b"GET /status HTTP/1.1\r\nHost: x\r\n")
    assert (status, closed) == (None, True)
    assert coild.rest("GET", "/status")[0] == 200
    assert coild.rest("GET", "/status", via="unix")[1]["pods"] == {}


def test_idle_keepalive_connection_is_closed(coild, node):
    for connect in (lambda: tcp(node), lambda: unix(coild.api_socket)):
        s = connect()
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(b'{"status": 200}'):
            data += s.recv(65536)
        assert b"Connection: close" not in data          # kept alive ...
        assert s.recv(65536) == b""                       # ... until --idle-timeout (2s)
        s.close()
    assert coild.rest("GET", "/healthz")[0] == 200


POST = b"POST /ip HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def _post(body: bytes, length: bytes | None = None) -> bytes:
    length = str(len(body)).encode() if length is None else length
    return POST + b"Content-Length: " + length + b"\r\n\r\n" + body


MALFORMED = [
    # (where, raw request, status, word in the error)
    ("unix", _post(b"{}", b"abc"), 400, "Content-Length"),
    ("unix", _post(b"{}", b"-5"), 400, "Content-Length"),
    ("unix", _post(b"", b"99999999999999999999"), 413, "larger"),
    ("unix", POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "Content-Length"),
    ("unix", POST + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "Content-Length"),
    ("unix", _post(b"{nope"), 400, "JSON"),
    ("unix", _post(b"\xff\xfe{}"), 400, "JSON"),
    ("unix", _post(b"[1, 2]"), 400, "object"),
    ("unix", _post(b"[" * 100000), 413, "larger"),
    ("unix", _post(b"[" * 60000), 400, "JSON"),
    ("unix", _post(json.dumps({"pod-namespace": 5, "pod-name": "a",
                               "container-id": "c"}).encode()), 400, "pod-namespace"),
    ("unix", _post(json.dumps({"pod-namespace": "default", "pod-name": "a",
                               "container-id": "c", "extra": 1}).encode()), 400, "extra"),
    ("unix", _post(json.dumps({"pod-namespace": "Default", "pod-name": "a",
                               "container-id": "c"}).encode()), 400, "pod-namespace"),
    ("unix", _post(json.dumps({"pod-namespace": "default", "pod-name": "a/../b",
                               "container-id": "c"}).encode()), 400, "pod-name"),
    ("unix", _post(json.dumps({"pod-namespace": "default", "pod-name": "a",
                               "container-id": "c", "address-type": ["ipv4"]}).encode()),
     400, "address-type"),
    ("unix", b"DELETE /ip/default/a/%zz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "percent"),
    ("tcp", b"GET /ip/default/%ff/c HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UTF-8"),
    ("tcp", b"GET /ip/default/a%2Fb/c HTTP/1.1\r\nHost: x\r\n\r\n", 400, "pod-name"),
    ("tcp", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
    ("tcp", b"GET /ip/a HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such endpoint"),
    ("tcp", b"PUT /ip HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405, "PUT"),
    ("tcp", b"\xff\xfe garbage\r\n\r\n", 400, "request"),
    ("tcp", b"GET /status HTTP/2.0\r\n\r\n", 400, ""),
    ("tcp", b"GET /status\r\n\r\n", 400, "HTTP/0.9"),
    ("tcp", b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 431, ""),
    ("tcp", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414, ""),
    ("tcp", _post(b"{}", b"abc"), 403, "--api-socket"),
    ("tcp", b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400,
     "Content-Length"),
    ("tcp", b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400,
     "Content-Length"),
    ("tcp", b"GET /ip/d\xc3\xa9/a/c HTTP/1.1\r\nHost: x\r\n\r\n", 400, "pod-namespace"),
    ("tcp", b"GET /ip/d\xff/a/c HTTP/1.1\r\nHost: x\r\n\r\n", 400, "UTF-8"),
    # found by make chaos (fuzz seed of 2026-11-30): a header line without a
    # colon was taken as the end of the headers, and the GET answered 200
    ("tcp", b"GET /status/ HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nhPWHOalighY\r\n\r\n",
     400, "header"),
    ("unix", b"GET /status HTTP/1.1\r\n continues-nothing\r\nHost: x\r\n\r\n", 400, "header"),
]


def test_malformed_requests_get_json_4xx_and_no_traceback(coild, node, store):
    for where, raw, want, word in MALFORMED:
        sock = unix(coild.api_socket) if where == "unix" else tcp(node)
        status, body, closed = exchange(sock, raw)
        assert status == want, (raw[:80], status, body)
        assert body["status"] == want and isinstance(body["error"], str), raw[:80]
        assert word in body["error"], (raw[:80], body)
    assert coild.rest("GET", "/status")[1]["pods"] == {}
    assert not store.etcd.count_prefix("ip/")               # nothing was recorded
    log = open(coild.log_path, encoding="utf-8", errors="replace").read()
    assert "Traceback" not in log and '"level": "error"' not in log
    assert coild.rest("GET", "/healthz")[0] == 200


def test_slow_clients_do_not_hold_the_workers(etcd_server, store, etcd_prefix, tmp_path,
                                              node, rundir):
    """Requests whose headers trickle in wait in the selector, not in a worker:
    with 2 workers and a long read timeout, 20 such clients leave the
    workers free, so a normal request is answered while they are still open."""
    store.create_pool("default", "10.41.0.0/24", 4)
    c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix,
              extra=["--read-timeout", "1h", "--api-workers", "2"])
    c.api_socket = os.path.join(rundir, "api.sock")
    c.start()
    slow = []
    try:
        for i in range(20):
            s = tcp(node) if i % 2 else unix(c.api_socket)
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(s)
        assert c.rest("GET", "/status")[0] == 200
        status, _ = c.rest("POST", "/ip", {"pod-namespace": "default", "pod-name": "p",
                                           "container-id": "s1"})
        assert status == 200
        for s in slow:                  # still open, still waiting: never answered
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # one finishes its headers now: answered
        slow[0].setblocking(True)
        status, body, _ = exchange(slow[0], b"1\r\nConnection: close\r\n\r\n")
        assert status == 200 and body["status"] == 200
    finally:
        for s in slow:
            s.close()
        assert c.stop() == 0


def test_plugin_request_that_never_completes_is_dropped_after_the_read_timeout(
        store, tmp_path, node, caplog):
    """The plugin socket bounds the wait for a request (30 s in coild; 0.5 s
    here, in process): a caller that sends half a request and waits is
    disconnected without an answer, the log says why, and the worker
    answers the next caller. The real CNI service behind it."""
    from types import SimpleNamespace

    from coil.cni.service import CNIService
    from coil.coild.allocator import NodeAllocator
    from coil.coild.podnet import PodNetwork
    from coil.coild.pools import PoolResolver
    from coil.coild.server import PluginServer, serve_in_thread
    cni = CNIService(NodeAllocator(store, "n1"), PodNetwork(host_netns=node.path),
                     PoolResolver(store))
    path = str(tmp_path / "plugin.sock")
    server = PluginServer(path, SimpleNamespace(cni=cni, too_large=lambda: b"{}"),
                          read_timeout=0.5)
    thread = serve_in_thread(server, "plugin-test")
    try:
        s = unix(path)
        s.sendall(b"COIL1\nCNI_COMMAND=VERSION\0")         # no end of request (EOF)
        s.settimeout(30)
        with caplog.at_level("WARNING", logger="coild"):
            assert s.recv(1) == b""                          # closed, unanswered
        s.close()
        assert any("request not received in time" in str(getattr(r, "error", ""))
                   for r in caplog.records), caplog.records
        probe = unix(path)                                   # the worker is free again
        probe.sendall(b'COIL1\nCNI_COMMAND=VERSION\0\0{"cniVersion": "1.0.0", "name": "t", '
                      b'"type": "coil"}')
        probe.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := probe.recv(65536):
            answer += chunk
        probe.close()
        assert answer.startswith(b"0\n") and b"supportedVersions" in answer
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


def test_keepalive_pipelined_requests_are_answered_in_order(coild):
    s = unix(coild.api_socket)
    body = json.dumps({"pod-namespace": "default", "pod-name": "p", "container-id": "k1"})
    s.sendall(_post(body.encode()) + b"GET /ip/default/p/k1 HTTP/1.1\r\nHost: x\r\n\r\n"
              + b"DELETE /ip/default/p/k1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [200, 200, 200]


def _start_failing(coild: Coild) -> tuple[int, str]:
    coild.start(wait=False)
    code = coild.proc.wait(30)
    coild.proc = None
    coild._log.close()
    return code, coild.log()


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if not line.startswith("{")]


def test_port_in_use_one_line_and_nonzero_exit(etcd_server, store, etcd_prefix, tmp_path,
                                              node, rundir):
    from coil.net.ns import in_netns
    with in_netns(node.path):
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", 9383))
        squatter.listen(1)
    try:
        c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
        c.api_socket = os.path.join(rundir, "api.sock")
        code, log = _start_failing(c)
    finally:
        squatter.close()
    assert code != 0
    assert "Traceback" not in log
    lines = _error_lines(log)
    assert len(lines) == 1, log
    assert "--http 127.0.0.1:9383" in lines[0] and "already in use" in lines[0]
    assert not os.path.exists(c.api_socket) and not os.path.exists(c.socket)


def test_api_socket_in_use_stale_or_not_a_socket(etcd_server, store, etcd_prefix, tmp_path,
                                                 node, rundir):
    path = os.path.join(rundir, "api.sock")
    c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    c.api_socket = path
    # something listens there: refused, its socket left alone
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        code, log = _start_failing(c)
        assert code != 0 and "Traceback" not in log
        (line,) = _error_lines(log)
        assert f"--api-socket {path}" in line and "listens there" in line
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        live.close()
    # now stale (nothing listens): replaced, coild serves on it
    c.start()
    try:
        assert c.rest("GET", "/status")[0] == 200
    finally:
        assert c.stop() == 0
    assert not os.path.exists(path)
    # a regular file at that path: refused and not deleted
    with open(path, "w") as f:
        f.write("precious")
    code, log = _start_failing(c)
    assert code != 0 and "Traceback" not in log
    lines = log.splitlines()
    last_start = max(i for i, line in enumerate(lines) if "state loaded" in line)
    (line,) = _error_lines("\n".join(lines[last_start:]))
    assert "not a socket" in line
    assert open(path).read() == "precious"


def test_plugin_socket_caps_connections(etcd_server, store, etcd_prefix, tmp_path, node, rundir):
    c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix,
              extra=["--max-connections", "4"])
    c.api_socket = os.path.join(rundir, "api.sock")
    c.start()
    held_open = []
    try:
        for _ in range(4):            # each holds a plugin thread until it sends
            held_open.append(unix(c.socket))
        pid = c.proc.pid
        extra = unix(c.socket)         # one more: refused at once, without a thread
        answer = extra.recv(65536)
        extra.close()
        code, _, body = answer.partition(b"\n")
        assert code == b"1" and json.loads(body)["code"] == 11
        assert _threads(pid) < 40
    finally:
        for s in held_open:
            s.close()
        assert c.stop() == 0


@pytest.mark.parametrize("flags, wrong", [
    (["--read-timeout", "0"], "--read-timeout"),
    (["--idle-timeout", "soon"], "--idle-timeout"),
    (["--max-connections", "0"], "--max-connections"),
    (["--api-workers", "-2"], "--api-workers"),
    (["--api-socket", "relative.sock"], "--api-socket"),
    (["--api-socket", "/tmp/same.sock", "--socket", "/tmp/same.sock"], "--api-socket"),
])
def test_bad_limit_flags_are_one_line(flags, wrong, etcd_server, etcd_prefix, node):
    import sys
    r = node.exec("env", "COIL_NODE_NAME=node1", sys.executable, "-m", "coil", "coild",
                  "--etcd-endpoints", etcd_server.unix_endpoint, "--etcd-prefix", etcd_prefix,
                  *flags, check=False, timeout=60)
    assert r.returncode != 0
    assert wrong in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_plugin_socket_refuses_non_root_even_when_its_mode_is_loosened(etcd_server, store,
                                                                       etcd_prefix, tmp_path,
                                                                       node, rundir):
    """The plugin socket is the API socket's twin: mode 0600 and SO_PEERCRED.
    A non-root caller of a loosened socket gets CNI error 105, and its ADD
    is never read: no address is held."""
    from coil.cni import protocol, spec
    store.create_pool("default", "10.41.0.0/24", 4)
    c = Coild(node, str(tmp_path), etcd_server.unix_endpoint, etcd_prefix)
    c.socket = os.path.join(rundir, "coild.sock")
    c.start()
    try:
        os.chmod(c.socket, 0o666)                 # an operator's mistake
        conf = json.dumps({"cniVersion": "1.0.0", "name": "net", "type": "coil",
                           "socket": c.socket}).encode()
        frame = protocol.encode_request(
            {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c-nobody", "CNI_NETNS": "/run/netns/coiltest-no-such-netns",
             "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
             "CNI_PATH": "/opt/cni/bin"}, conf)
        script = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(bytes.fromhex(sys.argv[2])); s.shutdown(socket.SHUT_WR)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
print(data.hex())
"""
        r = node.exec(*NOBODY, SYSTEM_PYTHON, "-c", script, c.socket, frame.hex(), check=False)
        assert r.returncode == 0, r.stderr
        code, body = protocol.decode_response(bytes.fromhex(r.stdout.strip()))
        err = json.loads(body)
        assert code != 0 and err["code"] == spec.ERR_FORBIDDEN, err
        assert "uid 65534" in err["msg"]
        assert store.all_addresses()[0] == []
        assert "refused a caller that is not root" in c.log()
        # root is served on the same socket (this ADD names a namespace that
        # does not exist, so coild answers it with another error)
        r = node.exec(SYSTEM_PYTHON, "-c", script, c.socket, frame.hex(), check=False)
        code, body = protocol.decode_response(bytes.fromhex(r.stdout.strip()))
        assert json.loads(body)["code"] not in (spec.ERR_FORBIDDEN, None)
        assert store.all_addresses()[0] == []
    finally:
        c.stop()
