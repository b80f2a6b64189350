"""``coilctl smoke``: Pods on two nodes ping each other, both ways.

One run creates four Pods in one namespace, each pinned to its node with
``spec.nodeName`` and labelled ``app.kubernetes.io/managed-by=coilctl-smoke``
and ``coil.cybozu.com/smoke-run=<run id>``:

- ``coil-smoke-<id>-server-a`` on node A and ``...-server-b`` on node B
  (``sleep``: they only need an address);
- once both have an address, ``...-ping-a-b`` on node A, whose command is
  ``ping -c 3 -W 2 <address of server-b>``, and ``...-ping-b-a`` on node B
  towards server-a (``restartPolicy: Never``: the phase, Succeeded or
  Failed, is ping's verdict).

The run follows its Pods with one watch (relisting when the watch expires
or answers 410 Gone) until both pings ended or the deadline passed, checks
every Pod address against coil's pools when they were given, and returns a
report (a dict, rendered by coil/coilctl/render.py). ``cleanup`` deletes
every Pod of the run, found by its label as well as by name, so that a Pod
whose creation was interrupted mid-request goes too.

Everything goes through the official ``kubernetes`` client (coil/k8s.py).
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import time

from coil import k8s
from coil.errors import InvalidArgument

MANAGED_BY = ("app.kubernetes.io/managed-by", "coilctl-smoke")
RUN_LABEL = "coil.cybozu.com/smoke-run"
ROLE_LABEL = "coil.cybozu.com/smoke-role"
DEFAULT_IMAGE = "busybox"
DEFAULT_TIMEOUT = "2m"
#: ping's command, the server address appended
PING = ["ping", "-c", "3", "-W", "2"]
GRACE_SECONDS = 1
DOCS = "docs/troubleshooting.md#when-coilctl-smoke-fails"
#: taints that keep ordinary Pods away: such nodes are not picked by default
_AVOID_EFFECTS = ("NoSchedule", "NoExecute")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")


def validate_image(image: str) -> str:
    if not image or len(image) > 512 or not _IMAGE.match(image):
        raise InvalidArgument(f"invalid --image {image!r}: not an image reference")
    return image


def validate_namespace(name: str) -> str:
    if not name or len(name) > 63 or not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", name):
        raise InvalidArgument(f"invalid --namespace {name!r}: use a DNS label (lower-case "
                              f"letters, digits and '-', at most 63 characters)")
    return name


def _call(what: str, fn, *args, **kwargs):
    """One API request with coil's timeout; failures become KubernetesError."""
    try:
        return fn(*args, _request_timeout=k8s.REQUEST_TIMEOUT, **kwargs)
    except k8s.transient_errors() as exc:
        raise k8s.to_coil_error(exc, what) from None


def _ready(node) -> bool:
    for c in (node.status.conditions or []) if node.status else []:
        if c.type == "Ready":
            return c.status == "True"
    return False


def _avoided(node) -> str | None:
    """Why a node is not picked by default (None: it may be)."""
    if not _ready(node):
        return "not Ready"
    if node.spec and node.spec.unschedulable:
        return "cordoned"
    for t in (node.spec.taints or []) if node.spec else []:
        if t.effect in _AVOID_EFFECTS:
            return f"taint {t.key}:{t.effect}"
    return None


def check_node_args(wanted) -> list[str]:
    """``--node`` given zero or two times, two different valid names.
    Raises InvalidArgument naming the bad value."""
    wanted = list(wanted)
    if wanted and len(wanted) != 2:
        raise InvalidArgument(f"give --node twice (two nodes), not {len(wanted)} time(s): "
                              f"{', '.join(wanted)}")
    if wanted and wanted[0] == wanted[1]:
        raise InvalidArgument(f"--node {wanted[0]} is given twice: the smoke test needs "
                              f"two different nodes")
    for name in wanted:
        k8s.validate_object_name(name, "node")
    return wanted


def pick_nodes(core, wanted: list[str] | tuple[str, ...]) -> tuple[str, str]:
    """The two nodes of the run: ``wanted`` (exactly two distinct, existing,
    Ready nodes), or the first two Ready, uncordoned, untainted nodes by name.
    Raises InvalidArgument naming the bad value, KubernetesError."""
    wanted = check_node_args(wanted)
    if wanted:
        for name in wanted:
            try:
                node = core.read_node(name, _request_timeout=k8s.REQUEST_TIMEOUT)
            except k8s.transient_errors() as exc:
                if k8s.is_api_exception(exc) and k8s.api_status(exc) == 404:
                    raise InvalidArgument(f"node {name} does not exist") from None
                raise k8s.to_coil_error(exc, f"reading node {name}") from None
            if not _ready(node):
                raise InvalidArgument(f"node {name} is not Ready",
                                      hint="pick Ready nodes (kubectl get nodes)")
        return wanted[0], wanted[1]
    nodes = _call("listing nodes", core.list_node).items
    usable = sorted(n.metadata.name for n in nodes if _avoided(n) is None)
    if len(usable) < 2:
        skipped = ", ".join(f"{n.metadata.name} ({_avoided(n)})" for n in nodes
                            if _avoided(n) is not None)
        raise InvalidArgument(f"the smoke test needs two Ready, schedulable nodes; found "
                              f"{len(usable)}" + (f" (not used: {skipped})" if skipped else ""),
                              hint="name two nodes with --node A --node B")
    return usable[0], usable[1]


def check_namespace(core, namespace: str):
    """Raises InvalidArgument when ``namespace`` does not exist."""
    try:
        core.read_namespace(namespace, _request_timeout=k8s.REQUEST_TIMEOUT)
    except k8s.transient_errors() as exc:
        if k8s.is_api_exception(exc) and k8s.api_status(exc) == 404:
            raise InvalidArgument(f"namespace {namespace} does not exist") from None
        raise k8s.to_coil_error(exc, f"reading namespace {namespace}") from None


class SmokeRun:
    """One run of the smoke test.

    ``pools`` is ``[(name, [ip_network, ...]), ...]`` read from etcd, or
    None when etcd is not configured (the pool check is skipped and the
    report says why: ``pool_note``). ``clock`` gives monotonic seconds.
    Not thread-safe; ``run`` once, then ``cleanup`` (always, in a finally).
    """

    def __init__(self, core, namespace: str, image: str, timeout: float,
                 pools: list | None = None, pool_note: str = "", clock=time.monotonic,
                 run_id: str | None = None):
        self.core = core
        self.namespace = namespace
        self.image = image
        self.timeout = timeout
        self.pools = pools
        self.pool_note = pool_note
        self.clock = clock
        self.id = run_id or secrets.token_hex(3)
        self.selector = f"{RUN_LABEL}={self.id}"
        self.created: list[str] = []      # names sent to the API server, in order
        self.pods: dict = {}              # name -> the last V1Pod seen
        self.nodes: tuple[str, str] | None = None
        self.deadline = None
        self._rv = None

    # -- the Pods -----------------------------------------------------------------
    def name(self, role: str) -> str:
        return f"coil-smoke-{self.id}-{role}"

    def manifest(self, role: str, node: str, command: list[str]) -> dict:
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name(role), "namespace": self.namespace,
                         "labels": {MANAGED_BY[0]: MANAGED_BY[1], RUN_LABEL: self.id,
                                    ROLE_LABEL: role}},
            "spec": {
                "nodeName": node,                   # pinned: no scheduler involved
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": GRACE_SECONDS,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "containers": [{"name": "smoke", "image": self.image, "command": command}],
            },
        }
        if command[0] == "ping":
            # ping needs a raw socket; CRI-O drops NET_RAW by default
            pod["spec"]["containers"][0]["securityContext"] = {
                "capabilities": {"add": ["NET_RAW"]}}
        return pod

    def _create(self, role: str, node: str, command: list[str]):
        name = self.name(role)
        self.created.append(name)       # before the request: cleanup must know it
        what = f"creating Pod {self.namespace}/{name}"
        try:
            self.core.create_namespaced_pod(self.namespace, self.manifest(role, node, command),
                                            _request_timeout=k8s.REQUEST_TIMEOUT)
        except k8s.transient_errors() as exc:
            err = k8s.to_coil_error(exc, what)
            if 400 <= err.status < 500:
                self.created.remove(name)   # refused: nothing of ours by that name exists
            if err.status == 403 and "PodSecurity" in err.message:
                err.hint = (f"the Pod Security level of namespace {self.namespace} forbids "
                            f"the NET_RAW capability ping needs: give --namespace of a "
                            f"namespace labelled pod-security.kubernetes.io/enforce=privileged")
            elif err.status == 403:
                err.hint = (f"the kubeconfig's user may not create Pods in {self.namespace}; "
                            f"docs/coilctl.md#smoke-test lists the permissions needed")
            raise err from None

    # -- following the Pods ---------------------------------------------------------
    def _relist(self):
        pods = _call(f"listing the smoke Pods in {self.namespace}",
                     self.core.list_namespaced_pod, self.namespace,
                     label_selector=self.selector)
        self.pods = {p.metadata.name: p for p in pods.items}
        self._rv = pods.metadata.resource_version

    def _wait(self, done) -> bool:
        """Follow the run's Pods until ``done(self.pods)``; False at the deadline."""
        from kubernetes import watch
        if self._rv is None:
            self._relist()
        while not done(self.pods):
            remaining = self.deadline - self.clock()
            if remaining <= 0:
                return False
            w = watch.Watch()
            try:
                for ev in w.stream(self.core.list_namespaced_pod, self.namespace,
                                   label_selector=self.selector, resource_version=self._rv,
                                   timeout_seconds=max(1, math.ceil(remaining)),
                                   _request_timeout=(k8s.REQUEST_TIMEOUT[0], remaining + 5)):
                    if ev["type"] not in ("ADDED", "MODIFIED", "DELETED"):
                        continue            # a BOOKMARK (never asked for) carries no Pod
                    pod = ev["object"]
                    self._rv = pod.metadata.resource_version
                    if ev["type"] == "DELETED":
                        self.pods.pop(pod.metadata.name, None)
                    else:
                        self.pods[pod.metadata.name] = pod
                    if done(self.pods) or self.clock() >= self.deadline:
                        break
            except k8s.transient_errors() as exc:
                if k8s.is_api_exception(exc) and k8s.api_status(exc) == 410:
                    self._relist()          # the watch's revision is too old
                    continue
                if self.clock() >= self.deadline and not k8s.is_api_exception(exc):
                    return done(self.pods)  # the read timed out with the deadline
                raise k8s.to_coil_error(exc, f"watching the smoke Pods in "
                                             f"{self.namespace}") from None
            finally:
                w.stop()
        return True

    def _ip(self, name: str) -> str | None:
        pod = self.pods.get(name)
        return pod.status.pod_ip if pod is not None and pod.status else None

    def _phase(self, name: str) -> str | None:
        pod = self.pods.get(name)
        return pod.status.phase if pod is not None and pod.status else None

    # -- the run ------------------------------------------------------------------
    def run(self, nodes: tuple[str, str]) -> dict:
        """Create the Pods on ``nodes`` (A, B), wait, and return the report.
        Raises KubernetesError when the API server fails a request (the
        caller still runs ``cleanup``)."""
        self.nodes = nodes
        a, b = nodes
        self.deadline = self.clock() + self.timeout
        servers = {"a": self.name("server-a"), "b": self.name("server-b")}
        for side, node in (("a", a), ("b", b)):
            self._create(f"server-{side}", node, ["sleep", str(int(self.timeout) + 60)])

        def servers_known(pods):
            return all(self._ip(n) or self._phase(n) in ("Failed", "Succeeded")
                       for n in servers.values())

        self._wait(servers_known)
        clients = {}
        if all(self._ip(n) for n in servers.values()):
            for src, dst, node in (("a", "b", a), ("b", "a", b)):
                clients[src] = self.name(f"ping-{src}-{dst}")
                self._create(f"ping-{src}-{dst}", node, PING + [self._ip(servers[dst])])

            def pings_ended(pods):
                return all(self._phase(n) in ("Succeeded", "Failed") for n in clients.values())

            self._wait(pings_ended)
        return self.report(servers, clients)

    # -- the report ---------------------------------------------------------------
    def _waiting(self, name: str) -> str:
        """Why a Pod is not there yet, in a few words."""
        pod = self.pods.get(name)
        if pod is None:
            return "not seen"
        phase = (pod.status.phase if pod.status else None) or "Pending"
        for cs in (pod.status.container_statuses or []) if pod.status else []:
            if cs.state and cs.state.waiting and cs.state.waiting.reason:
                return f"{phase}: {cs.state.waiting.reason}"
        return phase

    def _exit_code(self, name: str):
        pod = self.pods.get(name)
        for cs in (pod.status.container_statuses or []) if pod is not None and pod.status else []:
            if cs.state and cs.state.terminated:
                return cs.state.terminated.exit_code
        return None

    def pool_of(self, ip: str) -> str | None:
        addr = ipaddress.ip_address(ip)
        for name, subnets in self.pools or []:
            if any(addr.version == s.version and addr in s for s in subnets):
                return name
        return None

    def events(self, name: str, limit: int = 5) -> list[str]:
        """The Pod's last events, one line each (empty when they cannot be read)."""
        try:
            evs = self.core.list_namespaced_event(
                self.namespace, field_selector=f"involvedObject.name={name}",
                _request_timeout=k8s.REQUEST_TIMEOUT).items
        except k8s.transient_errors():
            return []
        evs.sort(key=lambda e: str(e.last_timestamp or e.event_time or ""))
        return [f"{e.reason}: {' '.join(str(e.message or '').split())}" for e in evs[-limit:]]

    def report(self, servers: dict, clients: dict) -> dict:
        a, b = self.nodes
        node_of = {"a": a, "b": b}
        roles = [("server-a", servers["a"], a), ("server-b", servers["b"], b)]
        roles += [(f"ping-{s}-{'b' if s == 'a' else 'a'}", n, node_of[s])
                  for s, n in clients.items()]
        pods = []
        for role, name, node in roles:
            ip = self._ip(name)
            pods.append({"name": name, "role": role, "node": node, "ip": ip,
                         "phase": self._phase(name), "status": self._waiting(name),
                         "pool": self.pool_of(ip) if ip and self.pools is not None else None})
        problems, steps = [], []
        directions = []
        for src, dst in (("a", "b"), ("b", "a")):
            d = {"from_node": node_of[src], "to_node": node_of[dst],
                 "pod": clients.get(src), "from_ip": self._ip(clients[src]) if src in clients
                 else None, "to_pod": servers[dst], "to_ip": self._ip(servers[dst]),
                 "result": "not run", "exit_code": None}
            if src in clients:
                phase = self._phase(clients[src])
                d["result"] = {"Succeeded": "ok", "Failed": "failed"}.get(phase, "timeout")
                d["exit_code"] = self._exit_code(clients[src])
            directions.append(d)
        missing = [p for p in pods if not p["ip"] and p["role"].startswith("server")]
        for p in missing:
            problems.append(f"Pod {p['name']} on node {p['node']} got no address within "
                            f"{self.timeout:g}s ({p['status']})")
            steps.append(f"events of Pod {p['name']} (a CNI failure is a "
                         f"FailedCreatePodSandBox event): kubectl -n {self.namespace} "
                         f"describe pod {p['name']} (add --keep to keep the Pods)")
            steps.append(f"the coild log on node {p['node']}: kubectl -n kube-system logs "
                         f"-c coild $(kubectl -n kube-system get pods -o name "
                         f"-l app.kubernetes.io/component=coild "
                         f"--field-selector spec.nodeName={p['node']})")
        for d in directions:
            if d["result"] == "ok" or d["result"] == "not run":
                continue
            if d["result"] == "timeout":
                problems.append(f"ping from node {d['from_node']} to {d['to_ip']} "
                                f"(node {d['to_node']}) did not end within {self.timeout:g}s "
                                f"({self._waiting(d['pod'])})")
                steps.append(f"events of Pod {d['pod']}: kubectl -n {self.namespace} "
                             f"describe pod {d['pod']} (add --keep to keep the Pods)")
            else:
                problems.append(f"ping from node {d['from_node']} to {d['to_ip']} "
                                f"(node {d['to_node']}) failed (exit code {d['exit_code']})")
                steps.append(f"ping's own words: run again with --keep, then kubectl -n "
                             f"{self.namespace} logs POD (the ping-* Pods)")
                steps.append(f"who holds the addresses: coilctl address info {d['to_ip']}"
                             + (f" and coilctl address info {d['from_ip']}" if d["from_ip"]
                                else ""))
                steps.append(f"on node {d['to_node']}: ip route show table 119 (its blocks), "
                             f"ip route get {d['to_ip']} (the Pod's /32)")
                steps.append(f"on node {d['from_node']}: ip route get {d['to_ip']} (must go "
                             f"via node {d['to_node']}), birdc show route for {d['to_ip']}, "
                             f"birdc show protocols")
        pool_check = {"checked": self.pools is not None, "note": self.pool_note,
                      "outside": []}
        if self.pools is not None:
            pool_check["outside"] = [{"pod": p["name"], "ip": p["ip"]} for p in pods
                                     if p["ip"] and p["pool"] is None]
            for o in pool_check["outside"]:
                problems.append(f"Pod {o['pod']} has {o['ip']}, which is in no coil pool")
            if pool_check["outside"]:
                steps.append("an address outside every pool was given by another CNI "
                             "plugin (coil's conflist must sort first in /etc/cni/net.d) or "
                             "etcd is another cluster's (--etcd-endpoints, --etcd-prefix): "
                             f"coilctl address info {pool_check['outside'][0]['ip']}")
        if problems:
            steps.append(f"the whole path, step by step: {DOCS}")
        deduped = []
        for s in steps:
            if s not in deduped:
                deduped.append(s)
        return {"run": self.id, "namespace": self.namespace, "nodes": [a, b],
                "image": self.image, "timeout_seconds": self.timeout, "ok": not problems,
                "pods": pods, "directions": directions, "pool_check": pool_check,
                "problems": problems, "next_steps": deduped,
                "events": {p["name"]: self.events(p["name"]) for p in pods
                           if problems and (not p["ip"] or p["phase"] == "Failed"
                                            or p["status"].startswith("Pending"))},
                "cleanup": None}

    # -- cleanup ------------------------------------------------------------------
    def cleanup(self, keep: bool = False) -> dict:
        """Delete every Pod of the run (by name and by label), unless ``keep``.
        Never raises: what could not be deleted is in ``failed`` with the
        error. Safe to repeat."""
        out = {"kept": keep, "deleted": [], "failed": [], "error": None,
               "selector": self.selector}
        if keep:
            return out
        names = list(dict.fromkeys(self.created))
        try:
            listed = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector,
                                                   _request_timeout=k8s.REQUEST_TIMEOUT)
            names += [p.metadata.name for p in listed.items if p.metadata.name not in names]
        except k8s.transient_errors() as exc:
            out["error"] = k8s.describe(exc)
        for name in names:
            try:
                self.core.delete_namespaced_pod(name, self.namespace,
                                                grace_period_seconds=GRACE_SECONDS,
                                                _request_timeout=k8s.REQUEST_TIMEOUT)
                out["deleted"].append(name)
            except k8s.transient_errors() as exc:
                if k8s.is_api_exception(exc) and k8s.api_status(exc) == 404:
                    continue                # gone already, or its creation never arrived
                out["failed"].append(name)
                out["error"] = k8s.describe(exc)
        return out


def leftover_hint(namespace: str, selector: str) -> str:
    return f"delete them with: kubectl -n {namespace} delete pod -l {selector}"

