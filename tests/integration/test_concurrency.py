"""The concurrency proof: many OS processes, one etcd, one small pool.

Ten worker processes (eight nodes with one process each, plus two
processes sharing the node ``node-shared``) hammer a /24 pool with blocks
of 8 addresses, so blocks run out and are fought over. Each worker takes
blocks, assigns addresses at random offsets (so they collide), releases
random addresses, gives back blocks it believes empty, re-reads its node's
blocks, and tries to write through blocks it gave back ("zombie" writes).
Every outcome is logged with the etcd revision the store returned.

Afterwards the test reads etcd's own event history (a watch from the start
revision, with previous values) and the final state, and checks:

- per address key and per block key, the history alternates create
  (version 1) / delete, and matches the successes the workers logged one
  to one (no write nobody reported, no reported write that did not happen);
- per address key, the logged successes alternate assign / release, each
  release by the process that made the assignment;
- every address was created while its block was held by the assigning
  worker's node, under exactly the block revision that worker used;
  no block was deleted while it still held an address;
- the node-block index changed in the same transactions as the block keys,
  and matches the block keys exactly at the end;
- every final address key lies in an existing block of the node that
  recorded it; the workers' own bookkeeping equals what etcd holds;
- every zombie write was refused with BlockLost; a process that is alone on
  its node never lost a block, never failed to release its own address, and
  always read back exactly the blocks it believed it held.

Run as a script (``python test_concurrency.py SPEC_JSON``) this file is the
worker.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
import time

POOL = "default"
SUBNET = "10.77.0.0/24"
BLOCK_SIZE = 3             # 32 blocks of 8 addresses
UNIQUE_NODES = 8
SHARED_NODE = "node-shared"
OPS_PER_WORKER = 500
MARKER = "zz-end-of-test"


# -- the worker (runs in its own process) -----------------------------------------------

def worker(spec: dict) -> dict:
    from coil.config import EtcdConfig
    from coil.errors import Conflict, PoolExhausted
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    from coil.store.model import BlockLost

    store = IPAMStore(Etcd(EtcdConfig(endpoints=(spec["endpoint"],), prefix=spec["prefix"],
                                      timeout=20.0)))
    rnd = random.Random(spec["seed"])
    wid, node, shared = spec["wid"], spec["node"], spec["shared"]
    blocks = {}        # cidr -> Block this process believes its node holds
    stale = []         # Blocks this process gave back (never valid again)
    held = {}          # (cidr, offset) -> (revision, container id)
    log = []

    def own_in(cidr):
        return sum(1 for (c, _) in held if c == cidr)

    with open(spec["ready"], "w"):
        pass
    deadline = time.time() + 60
    while not os.path.exists(spec["go"]):
        if time.time() > deadline:
            raise SystemExit("never got the go signal")
        time.sleep(0.005)

    for i in range(spec["ops"]):
        r = rnd.random()
        refresh_p = 0.12 if shared else 0.04
        if not blocks or r < 0.10:
            try:
                b = store.acquire_block(POOL, node)
            except PoolExhausted:
                log.append({"op": "acquire", "ok": False, "why": "exhausted"})
            except Conflict:
                log.append({"op": "acquire", "ok": False, "why": "conflict"})
            else:
                blocks[b.cidr] = b
                log.append({"op": "acquire", "ok": True, "cidr": b.cidr, "rev": b.revision,
                            "node": b.node})
        elif r < 0.52:
            b = rnd.choice(list(blocks.values()))
            offset = rnd.randrange(b.size)
            cid = f"w{wid}-{i}"
            try:
                a = store.assign_address(b, offset, "ns", f"pod-{wid}-{i}", cid)
            except BlockLost:
                del blocks[b.cidr]
                log.append({"op": "assign", "ok": False, "why": "lost", "cidr": b.cidr,
                            "off": offset, "block_rev": b.revision})
            else:
                if a is None:
                    log.append({"op": "assign", "ok": False, "why": "taken", "cidr": b.cidr,
                                "off": offset, "block_rev": b.revision})
                else:
                    held[(b.cidr, offset)] = (a.revision, cid)
                    log.append({"op": "assign", "ok": True, "cidr": b.cidr, "off": offset,
                                "rev": a.revision, "cid": cid, "block_rev": b.revision,
                                "address": a.address})
        elif r < 0.76:
            if not held:
                continue
            (cidr, offset), (rev, cid) = rnd.choice(sorted(held.items()))
            ok = store.release_address(cidr, offset, rev)
            if ok:
                del held[(cidr, offset)]
            log.append({"op": "release", "ok": ok, "cidr": cidr, "off": offset, "rev": rev,
                        "cid": cid})
        elif r < 0.88:
            empty = [b for b in blocks.values() if own_in(b.cidr) == 0]
            pick = empty if empty and rnd.random() < 0.8 else list(blocks.values())
            b = rnd.choice(pick)
            own = own_in(b.cidr)
            ok = store.release_block(b)
            if ok:
                del blocks[b.cidr]
                stale.append(b)
            log.append({"op": "release_block", "ok": ok, "cidr": b.cidr, "rev": b.revision,
                        "own_addresses": own})
        elif r < 0.88 + refresh_p:
            fresh = store.node_blocks(node)
            believed = sorted((c, b.revision) for c, b in blocks.items())
            blocks = {b.cidr: b for b in fresh}
            log.append({"op": "refresh", "believed": believed,
                        "read": sorted((b.cidr, b.revision) for b in fresh),
                        "nodes": sorted({b.node for b in fresh})})
        elif stale:
            b = rnd.choice(stale)
            offset = rnd.randrange(b.size)
            try:
                a = store.assign_address(b, offset, "ns", "zombie", f"z{wid}-{i}")
            except BlockLost:
                log.append({"op": "zombie", "outcome": "lost", "cidr": b.cidr,
                            "rev": b.revision})
            else:
                outcome = "taken" if a is None else "written"
                if a is not None:   # a bug: keep the books straight for the final check
                    held[(b.cidr, offset)] = (a.revision, a.container_id)
                log.append({"op": "zombie", "outcome": outcome, "cidr": b.cidr,
                            "rev": b.revision, "off": offset,
                            "arev": None if a is None else a.revision})
    store.close()
    return {"wid": wid, "node": node, "shared": shared, "log": log,
            "held": sorted([c, o, rev, cid] for (c, o), (rev, cid) in held.items()),
            "blocks": sorted([c, b.revision] for c, b in blocks.items())}


def _worker_main(argv):
    spec = json.loads(argv[1])
    result = worker(spec)
    tmp = spec["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.rename(tmp, spec["out"])


if __name__ == "__main__":
    _worker_main(sys.argv)
    sys.exit(0)


# -- the test ------------------------------------------------------------------------------

from coil.store import keys  # noqa: E402


def read_history(store, start_revision: int) -> list:
    """Every event under the store's prefix from ``start_revision`` up to the
    marker key, with previous values: (revision, type, key, version, value, prev_mod)."""
    from pyetcd import etcdrpc
    from coil.store.etcd import prefix_end
    client = store.etcd._client
    full = store.etcd.prefix.encode()
    create = etcdrpc.WatchCreateRequest(key=full, range_end=prefix_end(full),
                                        start_revision=start_revision, prev_kv=True)
    stub = etcdrpc.WatchStub(client.channel)
    call = stub.Watch(iter([etcdrpc.WatchRequest(create_request=create)]), timeout=60,
                      metadata=client.metadata)
    events = []
    marker = (store.etcd.prefix + MARKER).encode()
    try:
        for resp in call:
            assert not resp.canceled, resp.cancel_reason
            for ev in resp.events:
                if ev.kv.key == marker:
                    return events
                key = ev.kv.key.decode()[len(store.etcd.prefix):]
                kind = "delete" if ev.type == ev.DELETE else "put"
                prev = ev.prev_kv.mod_revision if ev.HasField("prev_kv") else 0
                events.append((ev.kv.mod_revision, kind, key, ev.kv.version, ev.kv.value, prev))
    finally:
        call.cancel()
    raise AssertionError("watch ended before the marker")


def run_workers(etcd_server, etcd_prefix, tmp_path, seed):
    specs = []
    nodes = [f"node-{i}" for i in range(UNIQUE_NODES)] + [SHARED_NODE, SHARED_NODE]
    for wid, node in enumerate(nodes):
        specs.append({"endpoint": etcd_server.endpoint, "prefix": etcd_prefix, "wid": wid,
                      "node": node, "shared": node == SHARED_NODE, "seed": seed * 1000 + wid,
                      "ops": OPS_PER_WORKER, "ready": str(tmp_path / f"ready-{wid}"),
                      "go": str(tmp_path / "go"), "out": str(tmp_path / f"out-{wid}.json")})
    procs = []
    try:
        for spec in specs:
            err = open(tmp_path / f"stderr-{spec['wid']}", "w")
            procs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                            json.dumps(spec)],
                                           stdout=err, stderr=subprocess.STDOUT), err))
        deadline = time.time() + 60
        while not all(os.path.exists(s["ready"]) for s in specs):
            assert time.time() < deadline, "workers did not start within 60 s"
            assert all(p.poll() is None for p, _ in procs), "a worker died while starting"
            time.sleep(0.02)
        (tmp_path / "go").write_text("go")
        for spec, (p, err) in zip(specs, procs):
            rc = p.wait(timeout=120)
            err.close()
            output = (tmp_path / f"stderr-{spec['wid']}").read_text()
            assert rc == 0, f"worker {spec['wid']} failed (seed {seed}):\n{output}"
    finally:
        for p, err in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()
    return [json.load(open(s["out"])) for s in specs]


def test_many_processes_never_share_a_block_or_an_address(store, etcd_server, etcd_prefix,
                                                           tmp_path):
    seed = int.from_bytes(os.urandom(4), "big")
    store.create_pool(POOL, SUBNET, BLOCK_SIZE)
    start_revision = store.etcd.get_prefix("")[1] + 1
    t0 = time.time()
    results = run_workers(etcd_server, etcd_prefix, tmp_path, seed)
    elapsed = time.time() - t0
    store.etcd.put(MARKER, b"end")
    history = read_history(store, start_revision)
    ctx = f"(seed {seed})"

    by_wid = {r["wid"]: r for r in results}
    node_of = {r["wid"]: r["node"] for r in results}
    counts = collections.Counter()
    for r in results:
        for e in r["log"]:
            counts[(e["op"], e.get("ok", e.get("outcome")), e.get("why"))] += 1
    print(f"\n{len(results)} workers, {sum(len(r['log']) for r in results)} operations "
          f"in {elapsed:.1f}s {ctx}")
    for k, v in sorted(counts.items(), key=str):
        print(f"  {k}: {v}")

    # -- the run was contended ----------------------------------------------------------
    assert counts[("acquire", False, "exhausted")] > 0, f"the pool never ran out {ctx}"
    assert counts[("assign", False, "taken")] > 0, f"no address collision happened {ctx}"
    assert counts[("release_block", True, None)] > 0
    assert counts[("assign", True, None)] >= 200, f"too little work {ctx}"

    # -- per-worker promises -------------------------------------------------------------
    for r in results:
        for e in r["log"]:
            if e["op"] == "zombie":
                assert e["outcome"] == "lost", f"worker {r['wid']} wrote through a block it " \
                                               f"gave back: {e} {ctx}"
            if e["op"] == "release_block" and e["own_addresses"]:
                assert not e["ok"], f"block released while holding addresses: {e} {ctx}"
            if e["op"] == "acquire" and e["ok"]:
                assert e["node"] == r["node"]
            if e["op"] == "refresh":
                assert e["nodes"] in ([], [r["node"]]), e
            if r["shared"]:
                continue
            # alone on its node: nobody else may touch its blocks or addresses
            if e["op"] == "assign":
                assert e.get("why") != "lost", f"worker {r['wid']} lost a block: {e} {ctx}"
            if e["op"] == "release":
                assert e["ok"], f"worker {r['wid']} could not release its address: {e} {ctx}"
            if e["op"] == "refresh":
                assert e["read"] == e["believed"], f"node {r['node']} blocks differ: {e} {ctx}"
            if e["op"] == "acquire":
                assert e.get("why") != "conflict", f"acquire hit the retry bound {ctx}"

    # -- etcd's history, key by key ----------------------------------------------------------
    timelines = collections.defaultdict(list)
    for ev in history:
        timelines[ev[2]].append(ev)
    events_at = collections.defaultdict(list)
    for ev in history:
        events_at[ev[0]].append(ev)

    block_key_of = {}
    for key, evs in timelines.items():
        evs.sort()
        if key.startswith((keys.IP, keys.BLOCK, keys.NODE_BLOCK)):
            for n, ev in enumerate(evs):
                want = "put" if n % 2 == 0 else "delete"
                assert ev[1] == want, f"{key}: expected {want} at {ev[0]}, history {evs} {ctx}"
                if ev[1] == "put":
                    assert ev[3] == 1, f"{key} was overwritten instead of created: {ev} {ctx}"
                else:
                    assert ev[5] == evs[n - 1][0], f"{key}: deleted a record it did not see {ctx}"
        if key.startswith(keys.BLOCK):
            block_key_of[keys.parse_block_key(key)[1]] = key

    def put_revisions(key):
        return [ev[0] for ev in timelines.get(key, []) if ev[1] == "put"]

    def live_at(key, revision):
        """The create revision of ``key``'s record live at ``revision`` (exclusive), or 0."""
        live = 0
        for ev in timelines.get(key, []):
            if ev[0] >= revision:
                break
            live = ev[0] if ev[1] == "put" else 0
        return live

    # logged successes <-> history, one to one
    logged_ip_puts, logged_ip_deletes = {}, {}
    logged_block_puts, logged_block_deletes = {}, {}
    for r in results:
        for e in r["log"]:
            if e["op"] == "assign" and e["ok"]:
                k = (keys.ip(e["cidr"], e["off"]), e["rev"])
                assert k not in logged_ip_puts, f"two assigns report one write {k} {ctx}"
                logged_ip_puts[k] = (r["wid"], e)
            elif e["op"] == "release" and e["ok"]:
                k = (keys.ip(e["cidr"], e["off"]), e["rev"])
                assert k not in logged_ip_deletes, f"two releases of one record {k} {ctx}"
                logged_ip_deletes[k] = r["wid"]
            elif e["op"] == "acquire" and e["ok"]:
                k = (keys.block(POOL, e["cidr"]), e["rev"])
                assert k not in logged_block_puts, f"two acquires report one write {k} {ctx}"
                logged_block_puts[k] = r["wid"]
            elif e["op"] == "release_block" and e["ok"]:
                k = (keys.block(POOL, e["cidr"]), e["rev"])
                assert k not in logged_block_deletes, f"block released twice {k} {ctx}"
                logged_block_deletes[k] = r["wid"]

    hist_ip_puts = {(ev[2], ev[0]): ev for ev in history if ev[2].startswith(keys.IP)
                    and ev[1] == "put"}
    hist_ip_deletes = {(ev[2], ev[5]): ev for ev in history if ev[2].startswith(keys.IP)
                       and ev[1] == "delete"}
    hist_block_puts = {(ev[2], ev[0]): ev for ev in history if ev[2].startswith(keys.BLOCK)
                       and ev[1] == "put"}
    hist_block_deletes = {(ev[2], ev[5]): ev for ev in history
                          if ev[2].startswith(keys.BLOCK) and ev[1] == "delete"}
    assert set(hist_ip_puts) == set(logged_ip_puts), f"address writes differ from reports {ctx}"
    assert set(hist_ip_deletes) == set(logged_ip_deletes), f"address deletes differ {ctx}"
    assert set(hist_block_puts) == set(logged_block_puts), f"block writes differ {ctx}"
    assert set(hist_block_deletes) == set(logged_block_deletes), f"block deletes differ {ctx}"

    # the logged successes of one address alternate assign/release, same process
    per_address = collections.defaultdict(list)
    for (key, rev), (wid, e) in logged_ip_puts.items():
        per_address[key].append((rev, "assign", wid))
    for (key, rev), wid in logged_ip_deletes.items():
        per_address[key].append((hist_ip_deletes[(key, rev)][0], "release", wid))
    for key, items in per_address.items():
        items.sort()
        for n, (rev, what, wid) in enumerate(items):
            assert what == ("assign" if n % 2 == 0 else "release"), \
                f"{key}: two owners at once: {items} {ctx}"
            if what == "release":
                assert wid == items[n - 1][2], f"{key}: released by a non-owner {items} {ctx}"

    # every address was written into a block held by the writer's node, at the
    # very block revision the writer used
    for (key, rev), (wid, e) in logged_ip_puts.items():
        bkey = keys.block(POOL, e["cidr"])
        held_since = live_at(bkey, rev)
        assert held_since == e["block_rev"], \
            f"{key}@{rev} written under block revision {e['block_rev']} but the block " \
            f"was {'held since ' + str(held_since) if held_since else 'free'} {ctx}"
        value = json.loads(hist_block_puts[(bkey, held_since)][4])
        assert value["node"] == node_of[wid], f"{key} written by {node_of[wid]} into a block " \
                                              f"of {value['node']} {ctx}"
        assert json.loads(hist_ip_puts[(key, rev)][4])["container_id"] == e["cid"]

    # no block was given back while it held an address
    ip_keys_of_block = collections.defaultdict(list)
    for key in timelines:
        if key.startswith(keys.IP):
            ip_keys_of_block[keys.parse_ip_key(key)[0]].append(key)
    for (bkey, _), ev in hist_block_deletes.items():
        cidr = keys.parse_block_key(bkey)[1]
        for ikey in ip_keys_of_block[cidr]:
            assert not live_at(ikey, ev[0]), f"{bkey} deleted at {ev[0]} while {ikey} " \
                                             f"was held {ctx}"

    # the node-block index changes in the same transactions as the block keys
    for ev in history:
        if not ev[2].startswith(keys.BLOCK):
            continue
        cidr = keys.parse_block_key(ev[2])[1]
        same_txn = [x for x in events_at[ev[0]] if x[2].startswith(keys.NODE_BLOCK)
                    and x[2].endswith("/" + cidr)]
        assert len(same_txn) == 1 and same_txn[0][1] == ev[1], \
            f"{ev[2]} {ev[1]} at {ev[0]} without its node-block entry {ctx}"
        if ev[1] == "put":
            assert same_txn[0][4] == POOL.encode()
            node = json.loads(ev[4])["node"]
            assert same_txn[0][2] == keys.node_block(node, cidr)

    # -- the final state ---------------------------------------------------------------------
    dump, _ = store.etcd.get_prefix("")
    final = {kv.key: kv for kv in dump}
    blocks = {k: (json.loads(kv.value), kv.mod_revision) for k, kv in final.items()
              if k.startswith(keys.BLOCK)}
    index = {k: kv.value.decode() for k, kv in final.items() if k.startswith(keys.NODE_BLOCK)}
    ips = {k: kv for k, kv in final.items() if k.startswith(keys.IP)}

    expected_index = {keys.node_block(v["node"], keys.parse_block_key(k)[1]): POOL
                      for k, (v, _) in blocks.items()}
    assert index == expected_index, f"node-block index differs from block keys {ctx}"

    owner_of_address = {}
    for r in results:
        for cidr, off, rev, cid in r["held"]:
            owner_of_address[keys.ip(cidr, off)] = (r["wid"], rev, cid)
    for key, kv in ips.items():
        cidr, _ = keys.parse_ip_key(key)
        bkey = keys.block(POOL, cidr)
        assert bkey in blocks, f"{key} lies in no existing block {ctx}"
        assert key in owner_of_address, f"{key} is held in etcd but by no process {ctx}"
        wid, rev, cid = owner_of_address[key]
        assert blocks[bkey][0]["node"] == node_of[wid], \
            f"{key} recorded by {node_of[wid]} lies in a block of {blocks[bkey][0]['node']} {ctx}"
    held_books = {k: (rev, cid) for k, (wid, rev, cid) in owner_of_address.items()}
    held_etcd = {k: (kv.mod_revision, json.loads(kv.value)["container_id"])
                 for k, kv in ips.items()}
    assert held_books == held_etcd, f"processes' addresses differ from etcd {ctx}"
    assert sum(len(r["held"]) for r in results) == len(held_books), "an address held twice"

    acquired = {(k, rev) for (k, rev) in logged_block_puts} - set(logged_block_deletes)
    assert acquired == {(k, rev) for k, (_, rev) in blocks.items()}, \
        f"blocks acquired and not released differ from etcd {ctx}"
    for (k, rev) in acquired:
        assert blocks[k][0]["node"] == node_of[logged_block_puts[(k, rev)]]
    for r in results:
        if not r["shared"]:
            mine = sorted([keys.parse_block_key(k)[1], rev] for k, (v, rev) in blocks.items()
                          if v["node"] == r["node"])
            assert r["blocks"] == mine, f"{r['node']} forgot or invented a block {ctx}"
    # two processes on one node: a block one believes it holds is either still
    # the node's at that revision, or was given back by the other process
    for r in results:
        if not r["shared"]:
            continue
        for cidr, rev in r["blocks"]:
            bkey = keys.block(POOL, cidr)
            if bkey in blocks and blocks[bkey][1] == rev:
                assert blocks[bkey][0]["node"] == SHARED_NODE
            else:
                releaser = logged_block_deletes.get((bkey, rev))
                assert releaser is not None and releaser != r["wid"] and \
                    by_wid[releaser]["shared"], f"{cidr}@{rev} of {r['wid']} vanished {ctx}"
