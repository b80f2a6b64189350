"""CNI ADD/DEL latency, parallel throughput and pod churn: coil vs ptp + host-local.

Both are driven by the same libcni client (tests/cniclient/cnitool, its
``bench`` mode times each call in Go) in the same run, inside a node
namespace, and reported as ratios. Also coild's resident memory holding
5,000 addresses. No timed asserts: the numbers go to the report and to
pytest-benchmark's extra_info.

``COIL_BENCH_COILD_FLAGS`` adds flags to the benchmarked coild, e.g.
``--teardown-batch 0`` measures DEL without the deletion queue (each DEL
deletes its veth pair before it answers, as before the queue existed).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from harness import CNI, CNITOOL, Coild, Netns, coil_conflist, plugin_binary  # noqa: E402
from helpers import EtcdServer  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

SEQUENTIAL_PODS = 50
PARALLEL_PODS = 32
CHURN_PODS = 500
CHURN_WORKERS = 32
REPORT = {}


@pytest.fixture(scope="module")
def node():
    tmp = tempfile.mkdtemp(prefix="coil-bench-cni-")
    etcd = EtcdServer(os.path.join(tmp, "etcd")).start()
    n = Netns("node")
    coild = Coild(n, tmp, etcd.unix_endpoint, "/bench/",
                  extra=os.environ.get("COIL_BENCH_COILD_FLAGS", "").split())
    pods = []
    try:
        subprocess.run([sys.executable, "-m", "coil", "coilctl", "--etcd-endpoints", etcd.endpoint,
                        "--etcd-prefix", "/bench/", "pool", "create", "default", "10.64.0.0/14", "5"],
                       check=True, capture_output=True)
        coild.start()
        pods = [Netns("bpod") for _ in range(SEQUENTIAL_PODS)]
        yield {"tmp": tmp, "netns": n, "coild": coild, "pods": pods, "etcd": etcd}
    finally:
        coild.stop()
        for p in pods:
            p.delete()
        n.delete()
        etcd.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _conflists(node):
    tmp = node["tmp"]
    coil = CNI(node["netns"], tmp, coil_conflist(node["coild"].socket), plugin_binary())
    ptp = {"cniVersion": "1.0.0", "name": "ptp-bench", "plugins": [{
        "type": "ptp", "ipMasq": False,
        "ipam": {"type": "host-local", "subnet": "10.128.0.0/16",
                 "dataDir": os.path.join(tmp, "host-local")}}]}
    ptp_path = os.path.join(tmp, "ptp.conflist")
    with open(ptp_path, "w") as f:
        json.dump(ptp, f)
    return coil, ptp_path


def _run_bench(node, env, conf_path, pods, parallel, tag):
    listing = os.path.join(node["tmp"], f"pods-{tag}.txt")
    with open(listing, "w") as f:
        for i, p in enumerate(pods):
            f.write(f"{p.path} {tag}-{i} eth0 default {tag}-pod-{i}\n")
    r = node["netns"].exec(CNITOOL, "bench", conf_path, listing, str(parallel), env=env,
                           check=False, timeout=600)
    data = json.loads(r.stdout)
    assert not data.get("errors"), data["errors"][:3]
    assert len(data["add_ms"]) == len(pods) and len(data["del_ms"]) == len(pods)
    return data


def _drained(node):
    """Wait until coil's deletion queue has deleted what its DELs retired, so
    that its deferred kernel work does not land in ptp's next timed phase.
    Returns the seconds waited."""
    start = time.perf_counter()
    node["netns"].wait_retired_gone(poll=0.005)
    return time.perf_counter() - start


def _p90(values):
    values = sorted(values)
    return values[max(0, int(round(0.9 * len(values))) - 1)]


def test_add_del_latency_vs_ptp(benchmark, node):
    coil, ptp_path = _conflists(node)
    env = coil.env()
    pods = node["pods"]

    def both():
        # interleave warm-up-free runs: ptp first, then coil, then both again
        out = {}
        for round_ in range(2):
            out.setdefault("ptp", []).append(_run_bench(node, env, ptp_path, pods, 1, f"p{round_}"))
            out.setdefault("coil", []).append(_run_bench(node, env, coil.conf_path, pods, 1, f"c{round_}"))
            _drained(node)
        return out

    out = benchmark.pedantic(both, rounds=1, iterations=1)
    stats = {}
    for name, runs in out.items():
        adds = [v for r in runs for v in r["add_ms"]]
        dels = [v for r in runs for v in r["del_ms"]]
        stats[name] = {"add_median_ms": statistics.median(adds), "add_p90_ms": _p90(adds),
                       "del_median_ms": statistics.median(dels), "del_p90_ms": _p90(dels)}
    ratio_add = stats["coil"]["add_median_ms"] / stats["ptp"]["add_median_ms"]
    ratio_del = stats["coil"]["del_median_ms"] / stats["ptp"]["del_median_ms"]
    benchmark.extra_info.update({"coil": stats["coil"], "ptp+host-local": stats["ptp"],
                                 "add_median_ratio": ratio_add, "del_median_ratio": ratio_del,
                                 "plugin": plugin_binary()})
    REPORT["latency"] = benchmark.extra_info
    print(f"\nCNI latency over {2 * SEQUENTIAL_PODS} pods each (plugin: {plugin_binary()})")
    for name in ("coil", "ptp"):
        s = stats[name]
        print(f"  {name:5} ADD median {s['add_median_ms']:.2f} ms p90 {s['add_p90_ms']:.2f} ms | "
              f"DEL median {s['del_median_ms']:.2f} ms p90 {s['del_p90_ms']:.2f} ms")
    print(f"  ratio coil/ptp: ADD {ratio_add:.2f}  DEL {ratio_del:.2f}  "
          f"(targets: ADD <= 0.45, DEL <= 0.3)")
    # both plugins did real work: every call succeeded (checked in _run_bench)


def test_parallel_throughput_vs_ptp(benchmark, node):
    coil, ptp_path = _conflists(node)
    env = coil.env()
    pods = node["pods"][:PARALLEL_PODS]

    def both():
        return {"ptp": _run_bench(node, env, ptp_path, pods, PARALLEL_PODS, "pp"),
                "coil": _run_bench(node, env, coil.conf_path, pods, PARALLEL_PODS, "cp"),
                "drained": _drained(node)}

    out = benchmark.pedantic(both, rounds=1, iterations=1)
    out.pop("drained")
    tput = {k: PARALLEL_PODS / v["add_wall_s"] for k, v in out.items()}
    ratio = tput["coil"] / tput["ptp"]
    benchmark.extra_info.update({"coil_pods_per_s": tput["coil"], "ptp_pods_per_s": tput["ptp"],
                                 "throughput_ratio": ratio})
    print(f"\n{PARALLEL_PODS} pods in parallel: coil {tput['coil']:.1f} pods/s, "
          f"ptp+host-local {tput['ptp']:.1f} pods/s, ratio {ratio:.2f} (target >= 1.5)")


def _cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run_churn(node, env, conf_path, tag, pods):
    """``pods`` pods through CHURN_WORKERS workers, each doing ADD then DEL
    for one pod, then the next pod. Worker w reuses the namespace of pod w
    for all its pods (ADD straight after DEL, same netns, same ifname).
    Also the CPU the run cost ("cpu_s"): the libcni client with the plugins
    it exec'd (the bench's waited-for children), coild, etcd; coild and
    etcd are read again after ``_drained`` by the caller."""
    spaces = node["pods"][:CHURN_WORKERS]
    listing = os.path.join(node["tmp"], f"churn-{tag}.txt")
    with open(listing, "w") as f:
        for i in range(pods):
            f.write(f"{spaces[i % CHURN_WORKERS].path} {tag}-{i} eth0 default {tag}-pod-{i}\n")
    before = _children_cpu_s()
    r = node["netns"].exec(CNITOOL, "churn", conf_path, listing, str(CHURN_WORKERS), env=env,
                           check=False, timeout=900)
    client = _children_cpu_s() - before
    data = json.loads(r.stdout)
    data["cpu_s"] = {"client+plugins": client}
    assert not data.get("errors"), data["errors"][:3]
    assert len(data["add_ms"]) == pods and len(data["del_ms"]) == pods
    return data


def test_churn_throughput_vs_ptp(benchmark, node):
    coil, ptp_path = _conflists(node)
    env = coil.env()
    # a smoke run (--benchmark-disable, as in make test) churns fewer pods
    pods = CHURN_PODS if not benchmark.disabled else 2 * CHURN_WORKERS

    def both():
        # two rounds, interleaved, so that a change of machine load hits both
        out = {}
        daemons = {"coild": node["coild"].proc.pid, "etcd": node["etcd"].proc.pid}
        for round_ in range(2):
            out.setdefault("ptp", []).append(_run_churn(node, env, ptp_path, f"pc{round_}", pods))
            start = {k: _cpu_s(pid) for k, pid in daemons.items()}
            run = _run_churn(node, env, coil.conf_path, f"cc{round_}", pods)
            run["wall_s"] += _drained(node)    # coil's churn ends when its veths are gone
            run["cpu_s"].update({k: _cpu_s(pid) - start[k] for k, pid in daemons.items()})
            out.setdefault("coil", []).append(run)
        return out

    out = benchmark.pedantic(both, rounds=1, iterations=1)
    tput = {k: pods * len(v) / sum(r["wall_s"] for r in v) for k, v in out.items()}
    ratio = tput["coil"] / tput["ptp"]
    rounds = [p["wall_s"] / c["wall_s"] for p, c in zip(out["ptp"], out["coil"])]
    dels = {k: statistics.median([x for r in v for x in r["del_ms"]]) for k, v in out.items()}
    adds = {k: statistics.median([x for r in v for x in r["add_ms"]]) for k, v in out.items()}
    # CPU per pod (ADD + DEL), ms: load-insensitive, unlike the rates
    cpu = {}
    for name, runs in out.items():
        for run in runs:
            for part, seconds in run["cpu_s"].items():
                cpu.setdefault(name, {}).setdefault(part, 0.0)
                cpu[name][part] += seconds * 1000 / (pods * len(runs))
    cpu_ratio = sum(cpu["ptp"].values()) / sum(cpu["coil"].values())
    benchmark.extra_info.update({"coil_pods_per_s": tput["coil"], "ptp_pods_per_s": tput["ptp"],
                                 "churn_ratio": ratio, "round_ratios": rounds,
                                 "del_median_ms": dels,
                                 "add_median_ms": adds, "cpu_ms_per_pod": cpu,
                                 "cpu_ratio": cpu_ratio, "load_average": os.getloadavg()})
    REPORT["churn"] = benchmark.extra_info
    # every coil pod is gone again: no address held, no veth left once the
    # deletion queue has flushed
    status, body = node["coild"].rest("GET", "/status")
    assert status == 200 and not [p for p in body["pods"] if p.startswith("default/cc")]
    print(f"\nchurn, {pods} pods (ADD then DEL) x 2 rounds, {CHURN_WORKERS} workers: "
          f"coil {tput['coil']:.1f} pods/s, ptp+host-local {tput['ptp']:.1f} pods/s, "
          f"ratio {ratio:.2f} (rounds: {', '.join(f'{r:.2f}' for r in rounds)}; target >= 4)")
    print(f"  under churn: ADD median coil {adds['coil']:.2f} ms / ptp {adds['ptp']:.2f} ms, "
          f"DEL median coil {dels['coil']:.2f} ms / ptp {dels['ptp']:.2f} ms")
    print("  CPU per pod (ADD + DEL): " + "; ".join(
        f"{name} " + ", ".join(f"{part} {ms:.2f} ms" for part, ms in parts.items())
        for name, parts in cpu.items())
        + f"; ptp / coil {cpu_ratio:.2f} (load average {os.getloadavg()[0]:.1f})")


def test_coild_memory_with_5000_addresses(benchmark, node):
    coild = node["coild"]
    script = r"""
import http.client, json, socket, sys
class UnixConnection(http.client.HTTPConnection):   # POST /ip: the root-only API socket
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(%r)
c = UnixConnection('localhost', timeout=30)
for i in range(5000):
    body = json.dumps({"pod-namespace": "mem", "pod-name": "p%%d" %% i, "container-id": "m%%d" %% i})
    c.request("POST", "/ip", body=body, headers={"Content-Type": "application/json"})
    r = c.getresponse(); data = r.read()
    if r.status != 200:
        sys.exit("POST failed: %%s %%s" %% (r.status, data))
print("ok")
""" % coild.api_socket

    def fill():
        return node["netns"].exec(sys.executable, "-c", script, timeout=600)

    r = benchmark.pedantic(fill, rounds=1, iterations=1)
    assert r.stdout.strip() == "ok"
    with open(f"/proc/{coild.proc.pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    status, body = coild.rest("GET", "/status")
    # "pods": container ID -> its address; the 5,000 made here are m0..m4999
    held = sum(1 for cid in body["pods"] if re.fullmatch(r"m\d+", cid))
    assert held == 5000, held
    benchmark.extra_info.update({"coild_rss_mib": rss_kb / 1024, "addresses": held})
    print(f"\ncoild RSS holding {held} addresses: {rss_kb / 1024:.1f} MiB (target < 80 MiB)")
