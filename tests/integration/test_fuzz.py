"""The bad-input campaign (issue 9): thousands of generated requests against
a live coild on real etcd, through the three doors an outsider has.

- **The plugin**: the native launcher exec'd directly (as a runtime does)
  with generated ``CNI_*`` environments and generated stdin, most of them
  broken on purpose. Every answer must be a CNI result or a CNI error
  object (``code``, ``msg``) with an exit code that agrees; a request that
  is broken for its command must fail; and after every request (and the
  DEL of a successful ADD) etcd, the node's links and the pod's links are
  exactly as before.
- **The REST API**: generated methods, paths, HTTP versions, headers (bad
  ``Content-Length`` among them) and bodies, sent over raw sockets so that
  malformed HTTP gets through. Every answer must be valid HTTP with a 4xx
  status and a JSON error body, 2xx only for a valid request; etcd changes
  only by what the valid requests did (each address a valid POST got is
  DELETEd again and checked).
- **coilctl**: generated argument lists, run in-process through the same
  entry point as the command line, against real etcd. A failure is one
  line on stderr, no traceback, and etcd unchanged; a success changes only
  the keys its command owns.

After each campaign coild still answers and its log holds no traceback.

Sizes: ``COIL_FUZZ_PROFILE=chaos`` (``make chaos``) runs ten times the
examples of the default profile (``make test``). Hypothesis prints the
failing example and a ``@reproduce_failure`` blob for a replay.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import json
import os
import re
import socket
import string
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from coil.cni import protocol
from coil.coild.podnet import RETIRED_GROUP
from coil.net import open_netlink
from harness import Coild, Netns, plugin_binary

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

PROFILE = os.environ.get("COIL_FUZZ_PROFILE", "default")
SCALE = float(os.environ.get("COIL_FUZZ_SCALE") or {"default": 1, "chaos": 10}[PROFILE])
SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
SUBNET = "10.88.0.0/24"
FIGURES: dict = {}        # examples run per campaign, for make chaos
NOTES: dict = {}          # observations that break no promise, counted


class Problems:
    """Broken promises seen during a campaign, by rule, with the first few
    requests that broke each. A campaign runs to the end and reports every
    rule it saw broken, rather than stopping at the first."""

    def __init__(self):
        self.by_rule: dict[str, list] = {}

    def __call__(self, rule: str, detail) -> None:
        examples = self.by_rule.setdefault(rule, [])
        examples.append(detail)
        if len(examples) > 3:
            examples[3] = f"... and {len(examples) - 3} more"
            del examples[4:]

    def counts(self) -> dict:
        return {rule: len(ex) for rule, ex in self.by_rule.items()}

    def report(self, pending=()) -> str:
        out = []
        for rule, examples in sorted(self.by_rule.items()):
            if rule in pending:
                continue
            out.append(f"- {rule}:")
            out.extend(f"    {str(e)[:700]}" for e in examples)
        return "\n".join(out)


def fuzz_settings(examples: int):
    return settings(max_examples=max(int(examples * SCALE), 1), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def version_tuple(v: str) -> tuple:
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (0,)


# -- a live node ----------------------------------------------------------------------

class Node:
    pass


@pytest.fixture(scope="module")
def node(etcd_server, tmp_path_factory):
    """One coild in a node namespace, one empty pod namespace, a pool whose
    first block the node already holds (so that the baseline is stable)."""
    import uuid
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    n = Node()
    n.prefix = f"/coilfuzz-{uuid.uuid4().hex[:8]}/"
    n.dir = str(tmp_path_factory.mktemp("fuzz"))
    n.store = IPAMStore(Etcd(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=n.prefix,
                                        timeout=5.0)))
    n.netns = n.pod = n.coild = None
    try:
        n.store.create_pool("default", SUBNET, 4)
        n.netns = Netns("node")
        n.pod = Netns("pod")
        n.coild = Coild(n.netns, n.dir, etcd_server.unix_endpoint, n.prefix,
                        node_name="fuzz-node", extra=["--scan-interval", "10m"])
        n.coild.start()
        bindir = os.path.join(n.dir, "bin")
        os.makedirs(bindir)
        n.plugin = os.path.join(bindir, "coil")      # the name the launcher dispatches on
        os.symlink(plugin_binary(), n.plugin)
        # warm up: the node takes its block, so a valid ADD changes only its address
        env = valid_env("ADD", "warmup", n.pod.path)
        rc, out, err = run_plugin(n, env, valid_conf(n))
        assert rc == 0, (out, err, n.coild.log())
        rc, out, err = run_plugin(n, dict(env, CNI_COMMAND="DEL"), valid_conf(n))
        assert rc == 0, (out, err)
        yield n
    finally:
        if n.coild is not None:
            n.coild.stop()
        for ns in (n.pod, n.netns):
            if ns is not None:
                ns.delete()
        n.store.close()


def valid_env(cmd: str, cid: str, netns: str, ns="default", pod="fuzz") -> dict:
    return {"CNI_COMMAND": cmd, "CNI_CONTAINERID": cid, "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod};"
                        f"K8S_POD_INFRA_CONTAINER_ID={cid}"}


def valid_conf(n, version="1.0.0") -> bytes:
    return json.dumps({"cniVersion": version, "name": "fuzz", "type": "coil",
                       "socket": n.coild.socket}).encode()


def run_plugin(n, env: dict, stdin: bytes):
    """Exec the launcher as a runtime does; (exit code, stdout, stderr)."""
    r = subprocess.run([n.plugin], env=env, input=stdin, capture_output=True, timeout=60)
    return r.returncode, r.stdout, r.stderr


def etcd_dump(n) -> dict:
    kvs, _ = n.store.etcd.get_prefix("")
    return {kv.key: kv.value for kv in kvs}


def _link_list(netns: Netns) -> list:
    """The namespace's links (one netlink dump, no process per look)."""
    with open_netlink(netns.path) as nl:
        return nl.link_list()


def _names(found: list, retired: bool = False) -> list[str]:
    """Their names; with ``retired``, only those a DEL retired (coild's
    retired link group, deleted by its queue within a moment)."""
    return sorted(link.name for link in found if not retired or link.group == RETIRED_GROUP)


def settled_links(netns: Netns, want: list[str] | None = None) -> list[str]:
    """The namespace's links once the pairs a DEL retired are gone, or as
    they are after 10 s. One dump per look: the queue may delete a retired
    pair between two dumps, and the names of the first with the "nothing
    retired" of the second would report the deleted pair as live."""
    deadline = time.monotonic() + 10
    while True:
        found = _link_list(netns)
        now = _names(found)
        if now == want or time.monotonic() > deadline or not _names(found, retired=True):
            return now
        time.sleep(0.02)


def coild_tracebacks(n) -> list[str]:
    with open(n.coild.log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [text[max(0, m.start() - 400):m.start() + 1200]
            for m in re.finditer(r"Traceback \(most recent call last\)", text)]


def assert_coild_healthy(n):
    assert n.coild.proc.poll() is None, f"coild died:\n{n.coild.log()}"
    env = valid_env("ADD", "after-fuzz", n.pod.path)
    rc, out, err = run_plugin(n, env, valid_conf(n))
    assert rc == 0, f"coild no longer serves a valid ADD: {out!r} {err!r}"
    rc, out, err = run_plugin(n, dict(env, CNI_COMMAND="DEL"), valid_conf(n))
    assert rc == 0, f"coild no longer serves a valid DEL: {out!r} {err!r}"
    tbs = coild_tracebacks(n)
    assert not tbs, f"{len(tbs)} tracebacks in coild's log, the first:\n{tbs[0]}"


# -- the plugin -------------------------------------------------------------------------

# text that is never an existing path: a runtime's netns that is gone
missing_path = st.text(string.ascii_letters + string.digits + "-_./", max_size=30).map(
    lambda s: "/nonexistent-coil-fuzz/" + s)
any_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                   max_size=40)
any_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\0", b""))
env_value = any_text | any_bytes
ident = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=64)
# the spec's container ID (CNI SPEC.md, libcni's ValidateContainerID)
CID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
cid_ok = st.tuples(st.sampled_from(string.ascii_letters + string.digits), ident).map(
    lambda t: (t[0] + t[1])[:64])
ifname_ok = st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=15).filter(
    lambda s: s != "lo")
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text
json_any = st.recursive(json_scalar, lambda c: st.lists(c, max_size=4) |
                        st.dictionaries(any_text, c, max_size=4), max_leaves=10)


@st.composite
def plugin_requests(draw, socket_path: str, pod_path: str, default_socket_live: bool):
    """(env, stdin, reasons): reasons names what makes the request fail for
    sure (empty: it may succeed)."""
    bad = []
    cmd = draw(st.sampled_from(COMMANDS) | st.sampled_from(["add", "Del", "", "ADD "]) |
               any_text)
    command_ok = cmd in COMMANDS
    if not command_ok:
        bad.append("unknown command")

    # -- stdin -------------------------------------------------------------------
    version = draw(st.sampled_from(SUPPORTED) |
                   st.sampled_from(["", "0.1.0", "0.2.0", "2.0.0", "1.0", "v1.0.0"]) |
                   json_scalar)
    conf = {"cniVersion": version, "name": "fuzz", "type": "coil", "socket": socket_path}
    conf_bad = []
    if not (isinstance(version, str) and version in SUPPORTED):
        conf_bad.append("cniVersion")
    for key in ("name", "type"):
        choice = draw(st.sampled_from(["keep", "keep", "keep", "drop", "junk"]))
        if choice == "drop":
            del conf[key]
            conf_bad.append(f"no {key}")
        elif choice == "junk":
            conf[key] = draw(json_scalar | st.lists(json_scalar, max_size=2))
            if not (isinstance(conf[key], str) and conf[key]):
                conf_bad.append(f"bad {key}")
    sock = draw(st.sampled_from(["keep"] * 6 + ["drop", "missing", "junk"]))
    socket_bad = False
    if sock == "drop":
        del conf["socket"]           # the default socket: no coild there
        socket_bad = not default_socket_live
    elif sock == "missing":
        conf["socket"] = draw(missing_path)
        socket_bad = True
    elif sock == "junk":
        conf["socket"] = draw(json_scalar)
        socket_bad = not (isinstance(conf["socket"], str) and conf["socket"]) or \
            conf["socket"] != socket_path
    if draw(st.booleans()):
        mtu = draw(st.integers(576, 65535) | st.integers() | json_scalar)
        conf["mtu"] = mtu
        if not (isinstance(mtu, int) and not isinstance(mtu, bool) and 576 <= mtu <= 65535):
            conf_bad.append("mtu")
    if draw(st.integers(0, 4)) == 0:
        v4 = draw(json_scalar)
        conf["ipv4"] = v4
        if not isinstance(v4, bool) or v4 is False:
            conf_bad.append("ipv4")     # junk, or off with no ipv6
    if draw(st.integers(0, 6)) == 0:
        conf["ipv6"] = draw(json_scalar)
        if not isinstance(conf["ipv6"], bool):
            conf_bad.append("ipv6")
    if draw(st.integers(0, 3)) == 0:
        conf.update(draw(st.dictionaries(any_text.filter(
            lambda k: k not in ("cniVersion", "name", "type", "socket", "mtu", "ipv4", "ipv6",
                                "cni.dev/valid-attachments")), json_any, max_size=3)))
    if cmd == "GC" and draw(st.booleans()):
        conf["cni.dev/valid-attachments"] = draw(json_any)
    if cmd == "GC" and not isinstance(conf.get("cni.dev/valid-attachments"), list):
        conf_bad.append("GC without valid-attachments")
    if cmd == "CHECK" and draw(st.booleans()):
        conf["prevResult"] = draw(json_any)

    form = draw(st.sampled_from(["json"] * 8 + ["raw", "scalar", "truncated", "deep"]))
    if form == "json":
        stdin = json.dumps(conf).encode()
    else:
        conf_bad.append(f"stdin {form}")
        if form == "raw":
            stdin = draw(st.binary(max_size=200))
            assume(not stdin.strip().startswith(b"{"))
        elif form == "scalar":
            stdin = json.dumps(draw(json_scalar | st.lists(json_scalar, max_size=3))).encode()
        elif form == "truncated":
            text = json.dumps(conf).encode()
            stdin = text[:draw(st.integers(0, len(text) - 1))]
        else:
            depth = draw(st.integers(100, 100000))
            stdin = b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if cmd == "DEL":
        # DEL is best-effort: only what stops it from being understood at all
        conf_bad = [c for c in conf_bad if c == "cniVersion" or c.startswith("stdin ")]
    if cmd != "VERSION":
        bad.extend(conf_bad)
        if socket_bad:
            bad.append("coild not reachable")

    # -- environment -----------------------------------------------------------------
    env = {"CNI_COMMAND": cmd}
    fields = {}
    choice = draw(st.sampled_from(["ok"] * 5 + ["drop", "empty", "junk"]))
    fields["CNI_CONTAINERID"] = {"ok": draw(ident), "drop": None, "empty": "",
                                 "junk": draw(env_value)}[choice]
    cid_text = fields["CNI_CONTAINERID"]
    if isinstance(cid_text, bytes):
        cid_text = cid_text.decode("utf-8", "replace")
    cid_bad = choice in ("drop", "empty") or not cid_text or not CID_RE.match(cid_text)
    choice = draw(st.sampled_from(["ok"] * 5 + ["drop", "empty", "missing", "junk"]))
    fields["CNI_NETNS"] = {"ok": pod_path, "drop": None, "empty": "",
                           "missing": draw(missing_path),
                           "junk": draw(missing_path)}[choice]
    netns_bad = choice != "ok"
    choice = draw(st.sampled_from(["eth0"] * 4 + ["ok", "drop", "empty", "long", "slash",
                                                  "dots", "junk"]))
    ifname = {"eth0": "eth0", "ok": draw(ifname_ok), "drop": None, "empty": "",
              "long": draw(st.text(string.ascii_lowercase, min_size=16, max_size=40)),
              "slash": draw(ifname_ok) + "/x", "dots": draw(st.sampled_from([".", ".."])),
              "junk": draw(env_value)}[choice]
    fields["CNI_IFNAME"] = ifname
    if_text = ifname.decode("utf-8", "replace") if isinstance(ifname, bytes) else ifname
    ifname_missing = not if_text
    ifname_bad = not if_text or len(if_text.encode("utf-8", "surrogatepass")) > 15 or \
        if_text in (".", "..") or any(c in "/:" or c.isspace() for c in if_text)
    ns = draw(st.sampled_from(["default", "fuzz-ns"]) | ident)
    pod = draw(ident)
    pairs = [f"K8S_POD_NAMESPACE={ns}", f"K8S_POD_NAME={pod}", "IgnoreUnknown=1"]
    args_bad = names_missing = False
    choice = draw(st.sampled_from(["ok"] * 5 + ["no-ns", "no-pod", "malformed", "empty-key",
                                                "drop", "junk"]))
    if choice == "no-ns":
        pairs = pairs[1:]             # podman, nerdctl: no namespace; ADD uses the default pool
    elif choice == "no-pod":
        pairs = [pairs[0], pairs[2]]
        names_missing = True
    elif choice == "malformed":
        pairs.insert(draw(st.integers(0, 3)), draw(st.text(string.ascii_letters, min_size=1,
                                                           max_size=10)))
        args_bad = True
    elif choice == "empty-key":
        pairs.append("=" + draw(st.text(string.ascii_letters, max_size=5)))
        args_bad = True
    fields["CNI_ARGS"] = {"drop": None, "junk": draw(env_value)}.get(choice, ";".join(pairs))
    if choice == "drop":
        names_missing = True
    elif choice == "junk":
        names_missing = True          # junk may parse, but never names the pod
    fields["CNI_PATH"] = draw(st.sampled_from(["/opt/cni/bin", None]) | env_value)
    for key, value in fields.items():
        if value is not None:
            env[key] = value
    for key, value in draw(st.dictionaries(st.sampled_from(["CNI_FOO", "CNI_cmd", "PATH",
                                                            "COIL_DEBUG"]), env_value,
                                           max_size=2)).items():
        env[key] = value

    if cmd in ("ADD", "DEL", "CHECK"):
        if cid_bad:
            bad.append("no container id")
        if ifname_bad and (cmd != "DEL" or ifname_missing):
            bad.append("bad ifname")          # DEL: only a missing one fails
        if args_bad and cmd != "DEL":
            bad.append("malformed CNI_ARGS")  # DEL goes on without CNI_ARGS
    if cmd in ("ADD", "CHECK"):
        if names_missing:
            bad.append("pod names missing")
        if netns_bad:
            bad.append("netns missing")
    if cmd == "CHECK":
        bad.append("CHECK of a container that holds nothing")
        if isinstance(version, str) and version_tuple(version) < (0, 4, 0):
            bad.append("CHECK before 0.4.0")
    if cmd in ("STATUS", "GC") and isinstance(version, str) and \
            version_tuple(version) < (1, 1, 0):
        bad.append(f"{cmd} before 1.1.0")
    if cmd == "ADD" and conf.get("ipv6") is True:
        bad.append("no IPv6 subnet")
    return env, stdin, bad


def check_plugin_answer(env, rc, out: bytes, err: bytes, bad: list, problem) -> dict | None:
    """Report every broken promise of one answer; returns the parsed stdout."""
    cmd = env.get("CNI_COMMAND")
    req = {"env": env, "rc": rc, "out": out[:300], "err": err[:300]}
    if b"Traceback" in err or b"Traceback" in out:
        problem("a traceback in the plugin's output", req)
    text = out.strip()
    doc = None
    if text:
        try:
            doc = json.loads(text)
        except ValueError:
            problem("stdout is not JSON", req)
        if text.count(b"\n"):
            problem("more than one line on stdout", req)
        if doc is not None and not isinstance(doc, dict):
            problem("stdout is not a JSON object", req)
            doc = None
    if rc == 0:
        if bad:
            problem(f"succeeded although it must fail: {bad[0]}", dict(req, why=bad))
        if doc is not None and "code" in doc:
            problem("exit 0 with an error object", req)
        if cmd == "ADD":
            try:
                ok = all(ipaddress.ip_interface(ip["address"]).ip in
                         ipaddress.ip_network(SUBNET) for ip in doc["ips"]) and doc["ips"]
            except (TypeError, KeyError, ValueError):
                ok = False
            if not ok:
                problem("an ADD result without the pool's address", req)
        elif cmd == "VERSION":
            if doc is None or not doc.get("supportedVersions"):
                problem("a VERSION answer without supportedVersions", req)
        elif doc is not None:
            problem(f"{cmd} printed something on success", req)
    else:
        if rc != 1:
            problem(f"exit code {rc} for an error", req)
        if doc is None:
            problem("an error without a CNI error object", req)
        else:
            code, msg = doc.get("code"), doc.get("msg")
            if not isinstance(code, int) or isinstance(code, bool):
                problem("an error object without an integer code", req)
            if not isinstance(msg, str) or not msg.strip():
                problem("an error object without msg", req)
            elif "\n" in msg:
                # valid JSON on one line, but the message quotes a bad value raw;
                # counted (FIGURES "notes"), not failed: the CNI contract holds
                NOTES["a message quoting a line break raw"] = \
                    NOTES.get("a message quoting a line break raw", 0) + 1
            if not isinstance(doc.get("details", ""), str):
                problem("error details not a string", req)
    return doc


# Rules broken by the product today that an unlanded branch owns (name: owner).
PLUGIN_PENDING: dict[str, str] = {}


def test_plugin_bad_input(node):
    """Generated CNI requests through the launcher: well-formed answers, the
    broken ones fail, nothing changes behind any of them."""
    state = {"etcd": etcd_dump(node), "node": settled_links(node.netns),
             "pod": settled_links(node.pod)}
    assert state["pod"] == ["lo"]
    count = {"examples": 0, "succeeded": 0, "failed": 0}
    problem = Problems()

    @fuzz_settings(1000)
    @given(req=plugin_requests(node.coild.socket, node.pod.path,
                               os.path.exists(protocol.DEFAULT_SOCKET)))
    def campaign(req):
        env, stdin, bad = req
        rc, out, err = run_plugin(node, env, stdin)
        count["examples"] += 1
        count["succeeded" if rc == 0 else "failed"] += 1
        check_plugin_answer(env, rc, out, err, bad, problem)
        if rc == 0 and env.get("CNI_COMMAND") == "ADD":
            # a valid ADD: its DEL must take it all back
            rc2, out2, err2 = run_plugin(node, dict(env, CNI_COMMAND="DEL"), stdin)
            if rc2 != 0:
                problem("the DEL of a successful ADD failed", (env, out2, err2))
        what = {"env": env, "stdin": stdin[:300], "rc": rc, "out": out[:300]}
        for key, now in (("etcd", etcd_dump(node)),
                         ("node", settled_links(node.netns, state["node"])),
                         ("pod", settled_links(node.pod, state["pod"]))):
            if now != state[key]:
                problem(f"{key} changed behind a request", dict(what, before=state[key],
                                                                 after=now))
                state[key] = now          # judge the next request on its own

    campaign()
    FIGURES["plugin"] = dict(count, problems=problem.counts(), notes=dict(NOTES))
    report = problem.report(PLUGIN_PENDING)
    assert not report, f"the plugin broke its promises:\n{report}"
    assert count["failed"] > count["examples"] // 2
    assert_coild_healthy(node)


@fuzz_settings(40)
@given(version=st.sampled_from(SUPPORTED), cid=cid_ok, ifname=ifname_ok,
       ns=st.sampled_from(["default", "kube-system"]) | ident, pod=ident,
       mtu=st.none() | st.integers(576, 9000))
def test_plugin_valid_requests_round_trip(node, version, cid, ifname, ns, pod, mtu):
    """Generated valid requests: ADD gives a result of the asked version, CHECK
    passes, DEL (twice) takes everything back."""
    assume(not ifname.startswith("veth"))
    baseline = etcd_dump(node)
    env = valid_env("ADD", cid, node.pod.path, ns, pod)
    env["CNI_IFNAME"] = ifname
    conf = json.loads(valid_conf(node, version))
    if mtu is not None:
        conf["mtu"] = mtu
    stdin = json.dumps(conf).encode()
    try:
        round_trip(node, env, conf, stdin, version, ifname, ns, pod, cid)
    finally:        # whatever failed, the next example starts clean
        run_plugin(node, dict(env, CNI_COMMAND="DEL"), stdin)
    assert etcd_dump(node) == baseline
    assert settled_links(node.pod, ["lo"]) == ["lo"]
    FIGURES["plugin_valid"] = FIGURES.get("plugin_valid", 0) + 1


def round_trip(node, env, conf, stdin, version, ifname, ns, pod, cid):
    rc, out, err = run_plugin(node, env, stdin)
    problem = Problems()
    doc = check_plugin_answer(env, rc, out, err, [], problem)
    assert rc == 0 and not problem.by_rule, (out, err, problem.report())
    assert doc["cniVersion"] == version
    address = str(ipaddress.ip_interface(doc["ips"][0]["address"]).ip)
    held = [json.loads(v) for k, v in etcd_dump(node).items() if k.startswith("ip/")]
    assert [(h["namespace"], h["pod"], h["container_id"]) for h in held] == [(ns, pod, cid)]
    assert address in node.pod.exec("ip", "-o", "addr", "show", "dev", ifname).stdout
    if version_tuple(version) >= (0, 4, 0):
        conf["prevResult"] = doc
        rc, out, err = run_plugin(node, dict(env, CNI_COMMAND="CHECK"), json.dumps(conf).encode())
        assert rc == 0, (out, err)
    for _ in range(2):
        rc, out, err = run_plugin(node, dict(env, CNI_COMMAND="DEL"), stdin)
        assert (rc, out.strip()) == (0, b""), (out, err)


# -- the REST API -----------------------------------------------------------------------

READ_PATHS = ("/status", "/healthz", "/readyz", "/metrics")
REST_PORT = 9383


def rest_connect(n, listener: str) -> socket.socket:
    """A connection to coild's read-only TCP listener (inside the node's
    namespace) or to its root-only API socket."""
    if listener == "api-socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(n.coild.api_socket)
        return s
    from coil.net.ns import in_netns
    with in_netns(n.netns.path):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(("127.0.0.1", REST_PORT))
    return s


def rest_exchange(n, data: bytes, listener: str) -> bytes:
    """Send ``data``, close our side, read everything coild answers."""
    with rest_connect(n, listener) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                    # coild answered and closed early: read it
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"coild did not answer or close within 10 s: {data[:300]!r}")
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def parse_responses(raw: bytes, head_only: bool) -> list[tuple[int, dict, bytes]]:
    """Split a byte stream into HTTP responses; fail on anything that is not HTTP."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"an answer without a header end: {raw[:300]!r}"
        lines = head.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*", lines[0])
        assert m, f"not an HTTP status line: {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            k, colon, v = line.partition(b":")
            assert colon, f"malformed header line {line!r}"
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        status = int(m.group(1))
        if head_only and (not rest or rest.startswith(b"HTTP/")):
            body, raw = b"", rest      # an answer to HEAD has no body
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body, raw = rest[:length], rest[length:]
            assert len(body) == length, f"body shorter than its Content-Length: {raw[:300]!r}"
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


pod_names = st.text(string.ascii_lowercase + string.digits + "-", min_size=1, max_size=20)


@st.composite
def valid_rest_requests(draw):
    """A well-formed request to a real endpoint (same shape as rest_requests)."""
    ns, pod, cid = draw(pod_names), draw(pod_names), draw(pod_names)
    kind = draw(st.sampled_from(["read", "get-ip", "post", "delete"]))
    method, path, body = {"read": ("GET", draw(st.sampled_from(READ_PATHS)), b""),
                          "get-ip": ("GET", f"/ip/{ns}/{pod}/{cid}", b""),
                          "post": ("POST", "/ip", json.dumps(
                              {"pod-namespace": ns, "pod-name": pod, "container-id": cid,
                               "address-type": "ipv4"}).encode()),
                          "delete": ("DELETE", f"/ip/{ns}/{pod}/{cid}", b"")}[kind]
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.0"]))
    headers = [b"Host: localhost"]
    if body or draw(st.booleans()):
        headers.append(b"Content-Length: %d" % len(body))
    if body:
        headers.append(b"Content-Type: application/json")
    raw = f"{method} {path} {version}".encode() + b"\r\n" + b"\r\n".join(headers) + \
        b"\r\n\r\n" + body
    return raw, kind, method, []


@st.composite
def rest_requests(draw):
    """(raw bytes, kind, method, reasons). ``kind`` names a valid request
    ("read", "get-ip", "post", "delete"; None otherwise); ``reasons`` says
    what makes the request bad (empty: well-formed)."""
    bad = []
    if draw(st.integers(0, 9)) < 3:
        return draw(valid_rest_requests())
    method = draw(st.sampled_from(["GET", "POST", "DELETE"] * 3 +
                                  ["PUT", "PATCH", "HEAD", "OPTIONS", "get", "TRACE", "CONNECT"]) |
                  st.text(string.ascii_letters + "-_!", min_size=1, max_size=12))
    ns, pod, cid = draw(pod_names), draw(pod_names), draw(pod_names)
    path = draw(st.sampled_from(list(READ_PATHS) + ["/ip", f"/ip/{ns}/{pod}/{cid}"] * 2 +
                                ["/", "/ip/", "/ip/a/b", "/ip/a/b/c/d", "//status", "/status/",
                                 "/status?x=1", "/metrics?format=json", "*", "/%00", "/ip/%2F/a/b",
                                 "http://127.0.0.1/status", "/../../etc/passwd"]) |
                st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30).map(
                    lambda s: "/" + s) |
                st.integers(2000, 70000).map(lambda k: "/" + "a" * k))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9.9",
                                                       "FOO", "", "HTTP/1.1 extra"]))
    if version == "":
        bad.append("no HTTP version (HTTP/0.9)")
    elif version not in ("HTTP/1.1", "HTTP/1.0"):
        bad.append("bad HTTP version")
    body_kind = draw(st.sampled_from(["none", "valid", "valid", "json", "bytes", "fields"]))
    body = b""
    if body_kind == "valid":
        doc = {"pod-namespace": ns, "pod-name": pod, "container-id": cid}
        if draw(st.booleans()):
            doc["address-type"] = "ipv4"
        body = json.dumps(doc).encode()
    elif body_kind == "json":
        body = json.dumps(draw(json_any)).encode()
    elif body_kind == "bytes":
        body = draw(st.binary(max_size=200))
    elif body_kind == "fields":
        doc = {"pod-namespace": ns, "pod-name": pod, "container-id": cid}
        key = draw(st.sampled_from(sorted(doc) + ["address-type"]))
        doc[key] = draw(json_scalar | st.sampled_from(["", "ipv6", "IPV4", "ipv5"]))
        body = json.dumps(doc).encode()
    length_kind = draw(st.sampled_from(["right"] * 6 + ["none", "abc", "negative", "huge",
                                                        "short", "long", "empty", "two",
                                                        "chunked"]))
    headers = [b"Host: 127.0.0.1"]
    if draw(st.booleans()):
        headers.append(b"Content-Type: application/json")
    if length_kind == "right":
        headers.append(b"Content-Length: %d" % len(body))
    elif length_kind == "none" and body:
        # no Content-Length: the request has no body, and the bytes after it
        # are a next (pipelined) request, which must be refused on its own
        if method == "POST":
            bad.append("a POST without Content-Length")
    elif length_kind == "abc":
        headers.append(b"Content-Length: " + draw(st.sampled_from([b"abc", b"1e3", b"0x10",
                                                                   b" ", b"+5", b"\xff"])))
        bad.append("Content-Length not a number")
    elif length_kind == "negative":
        headers.append(b"Content-Length: -%d" % draw(st.integers(1, 10**6)))
        bad.append("negative Content-Length")
    elif length_kind == "huge":
        headers.append(b"Content-Length: %d" % draw(st.integers(2**20 + 1, 2**70)))
        bad.append("Content-Length beyond the body")
    elif length_kind == "short":
        short = draw(st.integers(0, max(len(body) - 1, 0)))
        headers.append(b"Content-Length: %d" % short)
        if body and (short or method == "POST"):
            bad.append("Content-Length short of the body")
        # else a request without a body (GET /status, Content-Length: 0) and
        # the bytes after it a next (pipelined) request, refused on its own
        # (or never read: HTTP/1.0 closes), as with no Content-Length
    elif length_kind == "long":
        headers.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 1000))))
        bad.append("Content-Length beyond the body")
    elif length_kind == "empty":
        headers.append(b"Content-Length:")
        bad.append("Content-Length empty")
    elif length_kind == "two":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
        bad.append("two different Content-Lengths")
    elif length_kind == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        bad.append("chunked with a plain body")
    extra = draw(st.sampled_from(["none"] * 5 + ["random", "no-colon", "huge", "many",
                                                 "bad-bytes"]))
    if extra == "random":
        headers.append(b"X-" + draw(st.text(string.ascii_letters, min_size=1, max_size=10)).encode()
                       + b": " + draw(st.text(string.ascii_letters + " ", max_size=20)).encode())
    elif extra == "no-colon":
        headers.append(draw(st.text(string.ascii_letters, min_size=1, max_size=20)).encode())
        bad.append("a header line without a colon")
    elif extra == "huge":
        headers.append(b"X-Big: " + b"a" * draw(st.integers(65537, 200000)))
        bad.append("a header line over 64 KiB")
    elif extra == "many":
        headers += [b"X-%d: 1" % i for i in range(draw(st.integers(101, 300)))]
        bad.append("over 100 headers")
    elif extra == "bad-bytes":      # opaque header values are allowed
        headers.append(b"X-Bin: " + draw(st.binary(min_size=1, max_size=20)).replace(
            b"\r", b"").replace(b"\n", b""))
    line = f"{method} {path} {version}".rstrip().encode("latin-1", "replace")
    if len(line) > 65536:
        bad.append("a request line over 64 KiB")
    if draw(st.integers(0, 9)) == 0:
        line = draw(st.binary(max_size=60)).replace(b"\n", b"")     # no request line at all
        bad.append("garbage request line")
    raw = line + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
    if body and method != "POST" and length_kind == "right":
        bad.append("a body on a request that takes none")

    kind = None
    bare = path.split("?", 1)[0]
    # the path's segments, as coild reads them: "/status/" and "//status" are
    # /status (empty segments do not count); percent-escapes are left to chance
    parts = [p for p in bare.split("/") if p] if bare.startswith("/") else None
    ip_path = parts is not None and len(parts) == 4 and parts[0] == "ip" and "%" not in path
    if not bad:
        if method == "GET" and parts is not None and len(parts) == 1 and \
                "/" + parts[0] in READ_PATHS:
            kind = "read"
        elif method == "GET" and ip_path:
            kind = "get-ip"
        elif method == "POST" and parts == ["ip"] and body_kind == "valid":
            kind = "post"
        elif method == "DELETE" and ip_path:
            kind = "delete"
        else:
            bad.append("no such endpoint or a bad body")
    return raw, kind, method, bad


# Rules broken by the product today that an unlanded branch owns (name: owner).
REST_PENDING: dict[str, str] = {}


@pytest.mark.parametrize("listener", ["tcp", "api-socket"])
def test_rest_bad_input(node, listener):
    """Generated HTTP requests, well-formed and not, to either listener:
    valid HTTP answers, 4xx with a JSON error for the bad ones (and for
    changes asked of the read-only TCP listener), and etcd changed only by
    the valid ones."""
    state = {"etcd": etcd_dump(node)}
    count = {"examples": 0, "2xx": 0, "4xx": 0, "no answer": 0}
    problem = Problems()

    @fuzz_settings(600)
    @given(req=rest_requests())
    def campaign(req):
        raw, kind, method, bad = req
        if listener == "tcp" and kind in ("post", "delete"):
            kind, bad = None, ["a change asked of the read-only listener"]
        count["examples"] += 1
        what = {"request": raw[:200], "bad": bad}
        answer = rest_exchange(node, raw, listener)
        if not answer:
            count["no answer"] += 1
            if kind is not None:
                problem("no answer to a valid request", what)
        else:
            try:
                responses = parse_responses(answer, head_only=raw.startswith(b"HEAD "))
            except AssertionError as exc:
                problem("an answer that is not HTTP", dict(what, answer=answer[:200],
                                                          error=str(exc)[:120]))
                responses = []
            for number, (status, headers, body) in enumerate(responses):
                one = dict(what, status=status, body=body[:80])
                if status >= 500:
                    problem(f"status {status}", one)
                elif status >= 400:
                    count["4xx"] += 1
                    if not raw.startswith(b"HEAD "):
                        try:
                            doc = json.loads(body)
                            ok = isinstance(doc, dict) and doc.get("status") == status and \
                                isinstance(doc.get("error"), str) and doc["error"]
                        except ValueError:
                            ok = False
                        if not ok:
                            problem("a 4xx without a JSON error body", one)
                else:
                    count["2xx"] += 1
                    if number > 0 or kind is None:
                        problem("a 2xx for a bad request", one)
            if responses and kind == "read" and responses[0][0] != 200:
                problem("a valid read did not get 200", dict(what, status=responses[0][0]))
            if responses and responses[0][0] == 200 and kind == "post":
                cleanup_post(node, raw, responses[0][2], problem, listener)
        now = etcd_dump(node)
        if now != state["etcd"]:
            problem("etcd changed behind a request", dict(what, change=sorted(
                set(now.items()) ^ set(state["etcd"].items()))[:4]))
            state["etcd"] = now

    campaign()
    FIGURES[f"rest_{listener}"] = dict(count, problems=problem.counts())
    report = problem.report(REST_PENDING)
    assert not report, f"the REST API broke its promises:\n{report}"
    assert count["4xx"] > count["examples"] // 2
    assert_coild_healthy(node)


def cleanup_post(n, raw: bytes, body: bytes, problem, listener):
    """A valid POST got an address: it must be in etcd, and a DELETE frees it."""
    address = json.loads(body)["address"]
    doc = json.loads(raw.partition(b"\r\n\r\n")[2])
    held = {json.loads(v)["container_id"]: k for k, v in etcd_dump(n).items()
            if k.startswith("ip/")}
    if doc["container-id"] not in held:
        problem("a POST answered an address etcd does not hold", (address, held))
    path = f"/ip/{doc['pod-namespace']}/{doc['pod-name']}/{doc['container-id']}"
    back = rest_exchange(n, f"DELETE {path} HTTP/1.1\r\nHost: x\r\n"
                            f"Content-Length: 0\r\n\r\n".encode(), listener)
    if parse_responses(back, False)[0][0] != 200:
        problem("the DELETE of a POSTed address failed", back[:300])


# -- coilctl ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def coilctl_env(etcd_server, tmp_path_factory):
    """A prefix with a pool, a block and a few addresses for coilctl to read
    and free; HOME without a ~/.coilctl.yml."""
    import uuid
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    prefix = f"/coilctlfuzz-{uuid.uuid4().hex[:8]}/"
    store = IPAMStore(Etcd(EtcdConfig(endpoints=(etcd_server.endpoint,), prefix=prefix,
                                      timeout=5.0)))
    store.create_pool("default", "10.90.0.0/16", 5)
    block = store.acquire_block("default", "node-a")
    for off in range(6):
        store.assign_address(block, off, "default", f"pod{off}", f"c{off}")
    home = str(tmp_path_factory.mktemp("home"))
    try:
        yield store, ["--etcd-endpoints", etcd_server.endpoint, "--etcd-prefix", prefix], home
    finally:
        store.close()


def run_coilctl(argv: list[str], home: str) -> tuple[int, str, str]:
    """coilctl's own entry point (the one the command line uses), in-process."""
    from coil.hypercoil import main
    out, err = io.StringIO(), io.StringIO()
    # no terminal, no Kubernetes: HOME without ~/.kube, no KUBECONFIG or in-cluster
    # variables, so "address free" can only ask a missing API (and then refuses)
    cleared = ("COILCTL_CONFIG", "_COILCTL_COMPLETE", "KUBECONFIG", "KUBERNETES_SERVICE_HOST",
               "KUBERNETES_SERVICE_PORT")
    saved = {k: os.environ.get(k) for k in ("HOME",) + cleared}
    os.environ["HOME"] = home
    for k in cleared:
        os.environ.pop(k, None)
    for k in [k for k in os.environ if k.startswith("COILCTL_ETCD_")]:
        saved[k] = os.environ.pop(k)
    stdin, sys.stdin = sys.stdin, io.StringIO("")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["coilctl", *argv])
    finally:
        sys.stdin = stdin
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rc, out.getvalue(), err.getvalue()


cidrs = st.sampled_from(["10.91.0.0/24", "10.92.0.0/16", "fd00:91::/112", "10.90.0.0/24",
                         "10.93.0.1/24", "10.94.0.0/33", "::/200", "10.95.0.0", "0.0.0.0/0",
                         "300.1.1.1/24", "10.96.0.0/-1", "10.97.0.0/24/1", ""]) | any_text
sizes = st.sampled_from(["0", "3", "5", "8", "16", "17", "-1", "abc", "1e3", "", "99999999999"]) | \
    any_text
names = st.sampled_from(["default", "blue", "kube-system", "Blue", "a" * 64, "-x", "x_y", "",
                         "pool.1"]) | any_text
addresses = st.sampled_from(["10.90.0.%d" % i for i in range(8)] +
                            ["10.90.0.300", "10.99.0.1", "::1", "fd00::1", "", "10.90.0.1/32",
                             "localhost"]) | any_text
options = st.sampled_from(["-o", "json", "human", "yaml", "--output=json", "-h", "--help",
                           "--bogus", "--", "-", "--yes", "-y", "--force", "--json"])


flags = st.lists(st.sampled_from(["--yes", "-y", "--force", "--json", "-o"]), max_size=2)


@st.composite
def coilctl_argvs(draw):
    grammar = {
        "pool create": [names, cidrs, sizes], "pool add-subnet": [names, cidrs],
        "pool list": [], "pool show": [names, cidrs], "node blocks": [names],
        "address info": [addresses], "address free": [addresses, flags],
        "node release": [names, flags], "pool delete": [names],
        "pool remove-subnet": [names, cidrs],
        "completion": [st.sampled_from(["bash", "zsh", "fish", "tcsh", ""])],
    }
    cmd = draw(st.sampled_from(sorted(grammar) + ["pool", "node", "address", "bogus", ""]))
    args = cmd.split()
    for part in grammar.get(cmd, []):
        value = draw(part)
        args.extend(value if isinstance(value, list) else [value])
    n = len(args)
    if draw(st.integers(0, 3)) == 0 and n:
        del args[draw(st.integers(0, n - 1))]                  # an argument missing
    if draw(st.integers(0, 3)) == 0:
        args.insert(draw(st.integers(0, len(args))), draw(options | any_text))
    return cmd, args


# keys a successful command may change
ALLOWED_CHANGES = {
    "pool create": ("pool/", "subnet/", "subnets-guard"),
    "pool add-subnet": ("pool/", "subnet/", "subnets-guard"),
    "address free": ("ip/",),
    "node release": ("block/", "node-block/", "ip/"),
    "pool delete": ("pool/", "subnet/", "subnets-guard"),
    "pool remove-subnet": ("pool/", "subnet/", "subnets-guard"),
}


COILCTL_PENDING: dict[str, str] = {}


def test_coilctl_bad_input(coilctl_env):
    """Generated coilctl argument lists: a failure is one line, no traceback,
    nothing changed; a success changes only what its command owns."""
    store, etcd_args, home = coilctl_env
    count = {"examples": 0, "succeeded": 0, "failed": 0}
    problem = Problems()

    def dump():
        kvs, _ = store.etcd.get_prefix("")
        return {kv.key: kv.value for kv in kvs}

    @fuzz_settings(300)
    @given(req=coilctl_argvs())
    def campaign(req):
        cmd, args = req
        # never let a generated token choose etcd or a config file: the fixed
        # loopback etcd is the only server this test may talk to
        assume(not any(a.startswith(("--etcd", "--config", "--c", "--kube")) for a in args))
        before = dump()
        try:
            rc, out, err = run_coilctl(etcd_args + args, home)
        except BaseException as exc:     # noqa: BLE001 - that is the finding
            problem(f"an exception escaped coilctl: {type(exc).__name__}", (args, repr(exc)))
            return
        after = dump()
        count["examples"] += 1
        count["succeeded" if rc == 0 else "failed"] += 1
        what = {"args": args, "rc": rc, "out": out[:200], "err": err[:300]}
        if "Traceback" in out + err:
            problem("a traceback", what)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        if rc == 0:
            allowed = ALLOWED_CHANGES.get(cmd, ())
            if changed and not (allowed and all(k.startswith(allowed) for k in changed)):
                problem("a success changed keys its command does not own",
                        dict(what, changed=changed))
        else:
            if changed:
                problem("a failure changed etcd", dict(what, changed=changed))
            lines = err.strip("\n").split("\n")
            if len(lines) != 1 or not lines[0].strip():
                problem("a failure without exactly one error line", what)
            if out:
                problem("a failure printed on stdout", what)

    campaign()
    FIGURES["coilctl"] = dict(count, problems=problem.counts())
    report = problem.report(COILCTL_PENDING)
    assert not report, f"coilctl broke its promises:\n{report}"
    assert count["failed"] > 0 and count["succeeded"] > 0


@pytest.fixture(scope="module", autouse=True)
def report_figures():
    yield
    path = os.environ.get("COIL_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"profile": PROFILE, **FIGURES}, f, indent=1)
    print(f"\nfuzz figures ({PROFILE}): {json.dumps(FIGURES)}", file=sys.stderr)
