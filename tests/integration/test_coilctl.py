"""coilctl end to end: ``python -m coil coilctl ...`` as a subprocess against
a real etcd.

Every bad input must give exit code != 0, exactly one stderr line starting
with ``coilctl: error:`` that names the bad value, no traceback, and leave
the etcd prefix untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import auth_etcd_in_tmpdir, free_port, hypercoil


# -- helpers ---------------------------------------------------------------------

def dump(store) -> dict:
    kvs, _ = store.etcd.get_prefix("")
    return {kv.key: (kv.value, kv.mod_revision) for kv in kvs}


def assert_one_line_error(r, *named):
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode != 0, out
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{r.stderr}"
    assert lines[0].startswith("coilctl: error:"), lines[0]
    for word in named:
        assert word in lines[0], f"{word!r} not named in: {lines[0]}"
    assert r.stdout == "", r.stdout
    return lines[0]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No ~/.coilctl.yml and no COILCTL_* variables leak in from the host."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in list(os.environ):
        if var.startswith("COILCTL_") or var == "_COILCTL_COMPLETE":
            monkeypatch.delenv(var)
    return home


@pytest.fixture
def ctl(etcd_server, etcd_prefix):
    """Run coilctl against the session etcd under the test's prefix."""
    def run(*args, env=None):
        return hypercoil("coilctl", "--etcd-endpoints", etcd_server.endpoint,
                         "--etcd-prefix", etcd_prefix, *args, env=env)
    return run


@pytest.fixture
def populated(store):
    """Two pools, a block of node-1 with one address, a v6 block of node-2."""
    store.create_pool("default", "10.0.0.0/24", 3)
    store.create_pool("global", "192.168.10.0/24", 2)
    store.add_subnet("global", "fd00:10::/120")     # 128 blocks in all: filled lowest first
    b = store.acquire_block("default", "node-1")
    store.assign_address(b, 2, "team-a", "web-0", "c0ffee")
    b6 = store.acquire_block("global", "node-2", version=6)
    store.assign_address(b6, 1, "global", "lb-0", "beef")
    return store


# -- commands, human and JSON --------------------------------------------------------

def test_pool_create_human_and_json(ctl, store):
    r = ctl("pool", "create", "default", "10.100.0.0/16", "5")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout.strip() == ("created pool default with subnet 10.100.0.0/16, "
                                "blocks of 32 addresses")
    r = ctl("-o", "json", "pool", "create", "global", "192.168.0.0/24", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"name": "global", "subnets": ["192.168.0.0/24"],
                                    "block_size": 2}
    assert [p.name for p in store.list_pools()] == ["default", "global"]


def test_pool_add_subnet_human_and_json(ctl, store):
    store.create_pool("global", "192.168.0.0/24", 2)
    r = ctl("pool", "add-subnet", "global", "fd00:1::/112")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "added subnet fd00:1::/112 to pool global"
    r = ctl("--output", "json", "pool", "add-subnet", "global", "192.168.1.0/24")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"name": "global", "block_size": 2,
                                    "subnets": ["192.168.0.0/24", "fd00:1::/112",
                                                "192.168.1.0/24"]}
    assert len(store.get_pool("global").subnets) == 3


def test_pool_list(ctl, populated):
    r = ctl("pool", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["POOL", "BLOCK", "SUBNETS"]
    assert lines[1].split() == ["default", "8", "10.0.0.0/24"]
    assert lines[2].split() == ["global", "4", "192.168.10.0/24,", "fd00:10::/120"]
    r = ctl("-o", "json", "pool", "list")
    assert json.loads(r.stdout) == [
        {"name": "default", "subnets": ["10.0.0.0/24"], "block_size": 3},
        {"name": "global", "subnets": ["192.168.10.0/24", "fd00:10::/120"], "block_size": 2},
    ]


def test_pool_list_empty(ctl):
    r = ctl("pool", "list")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no pools"
    r = ctl("-o", "json", "pool", "list")
    assert json.loads(r.stdout) == []


def test_pool_show(ctl, populated):
    r = ctl("pool", "show", "default")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "pool default" in text and "10.0.0.0/24" in text
    assert "blocks: 1 used, 31 free of 32" in text
    rows = [line.split() for line in text.splitlines()]
    assert ["node-1", "1", "1", "7"] in rows           # NODE BLOCKS USED FREE
    assert ["10.0.0.0/29", "node-1", "1", "7"] in rows  # BLOCK NODE USED FREE

    r = ctl("-o", "json", "pool", "show", "global")
    u = json.loads(r.stdout)
    assert u["pool"] == "global" and u["block_size"] == 2
    assert u["subnets"] == ["192.168.10.0/24", "fd00:10::/120"]
    assert (u["blocks_total"], u["blocks_used"], u["blocks_free"]) == (64 + 64, 1, 64 + 63)
    assert [(b["block"], b["node"], b["used"], b["free"]) for b in u["blocks"]] == [
        ("fd00:10::/126", "node-2", 1, 3)]

    r = ctl("-o", "json", "pool", "show", "global", "192.168.10.0/24")
    u = json.loads(r.stdout)
    assert u["subnets"] == ["192.168.10.0/24"] and u["blocks"] == []
    r = ctl("pool", "show", "global", "192.168.10.0/24")
    assert "no blocks in use" in r.stdout


def test_pool_show_json_flag_is_v1s_alias_of_output_json(ctl, populated):
    r = ctl("pool", "show", "global", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(ctl("-o", "json", "pool", "show", "global").stdout)
    # v1's "nodes" key: node -> its blocks
    assert json.loads(r.stdout)["nodes"] == {"node-2": ["fd00:10::/126"]}


def test_node_blocks_of_an_idle_node_prints_nothing(ctl, populated):
    """v1 printed nothing and exited 0 for a node without blocks."""
    r = ctl("node", "blocks", "node-9")
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    r = ctl("-o", "json", "node", "blocks", "node-9")
    assert r.returncode == 0 and json.loads(r.stdout) == []


def test_node_blocks(ctl, populated):
    populated.acquire_block("global", "node-1")
    r = ctl("node", "blocks", "node-1")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0] == ["POOL", "BLOCK", "USED", "FREE"]
    assert rows[1:] == [["default", "10.0.0.0/29", "1", "7"],
                        ["global", "192.168.10.0/30", "0", "4"]]
    r = ctl("-o", "json", "node", "blocks", "node-2")
    data = json.loads(r.stdout)
    assert [(d["pool"], d["block"], d["used"], d["free"]) for d in data] == [
        ("global", "fd00:10::/126", 1, 3)]
    assert data[0]["acquired_at"].endswith("Z")


def test_address_info(ctl, populated):
    r = ctl("address", "info", "10.0.0.2")
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert fields["address"] == "10.0.0.2"
    assert fields["pool"] == "default"
    assert fields["block"] == "10.0.0.0/29"
    assert fields["node"] == "node-1"
    assert (fields["namespace"], fields["pod"], fields["container_id"]) == ("team-a", "web-0",
                                                                          "c0ffee")
    r = ctl("-o", "json", "address", "info", "fd00:10::1")
    info = json.loads(r.stdout)
    assert info["address"] == "fd00:10::1" and info["node"] == "node-2"
    assert info["pool"] == "global" and info["pod"] == "lb-0"


def test_address_free(ctl, populated):
    r = ctl("address", "free", "--yes", "--force", "10.0.0.2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "freed 10.0.0.2 (was team-a/web-0, container c0ffee)"
    assert populated.count_addresses("10.0.0.0/29") == 0
    # the block stays with its node
    assert [b.cidr for b in populated.node_blocks("node-1")] == ["10.0.0.0/29"]
    r = ctl("-o", "json", "address", "free", "-y", "--force", "fd00:10::1")
    assert json.loads(r.stdout)["container_id"] == "beef"
    assert populated.all_addresses()[0] == []


def test_address_free_without_yes_and_without_a_terminal_refuses(ctl, populated):
    before = dump(populated)
    r = ctl("address", "free", "10.0.0.2")
    assert_one_line_error(r, "10.0.0.2", "--yes")
    assert dump(populated) == before


def _free_on_a_terminal(etcd_server, etcd_prefix, answer: str):
    """Run 'coilctl address free --force 10.0.0.2' with a pseudo-terminal as stdin
    (--force: no Kubernetes here to tell whether the Pod is gone)."""
    import pty
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coil", "coilctl", "--etcd-endpoints", etcd_server.endpoint,
             "--etcd-prefix", etcd_prefix, "address", "free", "--force", "10.0.0.2"],
            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(slave)
        slave = None
        os.write(master, answer.encode())
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def test_address_free_asks_for_confirmation_as_v1_did(etcd_server, etcd_prefix, populated):
    before = dump(populated)
    rc, out, err = _free_on_a_terminal(etcd_server, etcd_prefix, "n\n")
    assert rc == 1 and "free 10.0.0.2?" in err and "pod: web-0" in err
    assert dump(populated) == before
    rc, out, err = _free_on_a_terminal(etcd_server, etcd_prefix, "y\n")
    assert rc == 0, err
    assert out.strip() == "freed 10.0.0.2 (was team-a/web-0, container c0ffee)"
    assert populated.count_addresses("10.0.0.0/29") == 0


def test_completion_bash(ctl):
    r = hypercoil("coilctl", "completion", "bash")
    assert r.returncode == 0, r.stderr
    assert "_COILCTL_COMPLETE" in r.stdout
    assert "complete " in r.stdout


def test_completion_without_shell_prints_bash(ctl):
    """v1's habit: 'coilctl completion' alone prints the bash script."""
    r = hypercoil("coilctl", "completion")
    assert r.returncode == 0, r.stderr
    assert r.stdout == hypercoil("coilctl", "completion", "bash").stdout
    assert "_COILCTL_COMPLETE=bash_complete" in r.stdout


def test_output_before_or_after_the_subcommand(ctl, populated):
    """kubectl users put -o last: both places give the same answer."""
    for cmd in (["pool", "list"], ["pool", "show", "global"], ["node", "blocks", "node-2"],
                ["address", "info", "10.0.0.2"]):
        before = ctl("-o", "json", *cmd)
        assert before.returncode == 0, before.stderr
        for after in (["-o", "json"], ["--output", "json"], ["--output=json"]):
            r = ctl(*cmd, *after)
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout) == json.loads(before.stdout), cmd
        human = ctl("-o", "json", *cmd, "-o", "human")     # the later one wins
        assert human.returncode == 0 and human.stdout == ctl(*cmd).stdout
    r = ctl("pool", "list", "-o", "yaml")
    assert r.returncode == 2 and "'yaml' is not one of" in r.stderr


def test_every_command_takes_output_after_it():
    from coil.coilctl.cli import _output_everywhere, cli
    import click
    _output_everywhere(cli)
    _output_everywhere(cli)                  # idempotent (in-process callers run main twice)

    def leaves(group, path):
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                yield from leaves(cmd, path + [name])
            else:
                yield path + [name], cmd
    found = list(leaves(cli, []))
    assert len(found) >= 10
    for path, cmd in found:
        opts = [p for p in cmd.params if p.name == "output"]
        assert len(opts) == 1 and "-o" in opts[0].opts, path


def test_completion_words(ctl):
    r = hypercoil("coilctl", env={"_COILCTL_COMPLETE": "bash_complete",
                                  "COMP_WORDS": "coilctl pool ", "COMP_CWORD": "2"})
    assert r.returncode == 0, r.stderr
    words = {line.split(",", 1)[1] for line in r.stdout.splitlines() if "," in line}
    assert {"create", "add-subnet", "list", "show"} <= words


def test_help_does_not_need_etcd():
    r = hypercoil("coilctl", "--etcd-endpoints", f"http://127.0.0.1:{free_port()}", "--help")
    assert r.returncode == 0
    for word in ("pool", "node", "address", "completion", "--etcd-endpoints", "--output"):
        assert word in r.stdout


# -- where the connection settings come from ------------------------------------------------

def test_environment_endpoints_and_prefix(etcd_server, etcd_prefix, store):
    store.create_pool("default", "10.0.0.0/24", 3)
    r = hypercoil("coilctl", "pool", "list",
                  env={"COILCTL_ETCD_ENDPOINTS": etcd_server.endpoint,
                       "COILCTL_ETCD_PREFIX": etcd_prefix})
    assert r.returncode == 0, r.stderr
    assert "10.0.0.0/24" in r.stdout


def test_flag_beats_environment(etcd_server, etcd_prefix, store):
    store.create_pool("default", "10.0.0.0/24", 3)
    dead = f"http://127.0.0.1:{free_port()}"
    r = hypercoil("coilctl", "--etcd-endpoints", etcd_server.endpoint, "pool", "list",
                  env={"COILCTL_ETCD_ENDPOINTS": dead, "COILCTL_ETCD_PREFIX": etcd_prefix})
    assert r.returncode == 0, r.stderr
    assert "10.0.0.0/24" in r.stdout


def test_config_file(etcd_server, etcd_prefix, store, tmp_path):
    store.create_pool("default", "10.0.0.0/24", 3)
    path = tmp_path / "coilctl.yml"
    path.write_text(f"endpoints: {etcd_server.endpoint}\nprefix: {etcd_prefix}\ntimeout: 5s\n")
    r = hypercoil("coilctl", "--config", str(path), "-o", "json", "pool", "list")
    assert r.returncode == 0, r.stderr
    assert [p["name"] for p in json.loads(r.stdout)] == ["default"]
    # COILCTL_CONFIG names the file too
    r = hypercoil("coilctl", "pool", "list", env={"COILCTL_CONFIG": str(path)})
    assert r.returncode == 0, r.stderr
    assert "default" in r.stdout


def test_default_config_file_in_home(etcd_server, etcd_prefix, store, clean_environment):
    store.create_pool("default", "10.0.0.0/24", 3)
    (clean_environment / ".coilctl.yml").write_text(
        f"endpoints:\n  - {etcd_server.endpoint}\nprefix: {etcd_prefix}\n")
    r = hypercoil("coilctl", "pool", "list")
    assert r.returncode == 0, r.stderr
    assert "10.0.0.0/24" in r.stdout


def test_environment_beats_config_file(etcd_server, etcd_prefix, store, tmp_path):
    store.create_pool("default", "10.0.0.0/24", 3)
    path = tmp_path / "coilctl.yml"
    path.write_text(f"endpoints: http://127.0.0.1:{free_port()}\nprefix: /elsewhere/\n")
    r = hypercoil("coilctl", "--config", str(path), "pool", "list",
                  env={"COILCTL_ETCD_ENDPOINTS": etcd_server.endpoint,
                       "COILCTL_ETCD_PREFIX": etcd_prefix})
    assert r.returncode == 0, r.stderr
    assert "10.0.0.0/24" in r.stdout


# -- bad input: one line, names the value, changes nothing ---------------------------------

BAD = [
    # (id, args, words the error must contain)
    ("invalid-cidr", ["pool", "create", "p2", "10.1.0/24", "3"], ["10.1.0/24"]),
    ("not-a-cidr", ["pool", "create", "p2", "not-a-subnet/24", "3"], ["not-a-subnet/24"]),
    ("no-prefix-length", ["pool", "create", "p2", "10.1.0.0", "3"], ["10.1.0.0"]),
    ("host-bits", ["pool", "create", "p2", "10.1.0.1/24", "3"], ["10.1.0.1/24"]),
    ("host-bits-v6", ["pool", "add-subnet", "global", "fd00:20::1/112"], ["fd00:20::1/112"]),
    ("overlap-contained", ["pool", "create", "p2", "10.0.0.128/25", "3"], ["10.0.0.128/25"]),
    ("overlap-containing", ["pool", "add-subnet", "global", "10.0.0.0/16"], ["10.0.0.0/16"]),
    ("overlap-v6", ["pool", "add-subnet", "default", "fd00::/16"], ["fd00::/16"]),
    ("duplicate", ["pool", "create", "p2", "10.0.0.0/24", "3"], ["10.0.0.0/24"]),
    ("duplicate-add", ["pool", "add-subnet", "global", "10.0.0.0/24"], ["10.0.0.0/24"]),
    ("duplicate-pool", ["pool", "create", "default", "10.7.0.0/24", "3"], ["default"]),
    ("size-too-big", ["pool", "create", "p2", "10.1.0.0/16", "17"], ["17"]),
    ("size-negative", ["pool", "create", "p2", "10.1.0.0/16", "-1"], ["-1"]),
    ("size-not-a-number", ["pool", "create", "p2", "10.1.0.0/16", "five"], ["five"]),
    ("size-over-subnet", ["pool", "create", "p2", "10.1.0.0/24", "9"], ["9", "10.1.0.0/24"]),
    ("subnet-under-block", ["pool", "add-subnet", "default", "10.1.0.0/30"], ["10.1.0.0/30"]),
    ("pool-name-upper", ["pool", "create", "Bad_Name", "10.1.0.0/24", "3"], ["Bad_Name"]),
    ("pool-name-dot", ["pool", "create", "a.b", "10.1.0.0/24", "3"], ["a.b"]),
    ("pool-name-show", ["pool", "show", "x_y"], ["x_y"]),
    ("unknown-pool-show", ["pool", "show", "nope"], ["nope"]),
    ("unknown-pool-add", ["pool", "add-subnet", "nope", "10.1.0.0/24"], ["nope"]),
    ("subnet-not-in-pool", ["pool", "show", "default", "10.9.0.0/24"], ["10.9.0.0/24"]),
    ("invalid-node", ["node", "blocks", "Node_9"], ["Node_9"]),
    ("unassigned-info", ["address", "info", "10.0.0.5"], ["10.0.0.5"]),
    ("unassigned-free", ["address", "free", "10.0.0.5"], ["10.0.0.5"]),
    ("no-pool-address", ["address", "info", "172.16.0.1"], ["172.16.0.1"]),
    ("no-pool-address-free", ["address", "free", "172.16.0.1"], ["172.16.0.1"]),
    ("invalid-address", ["address", "info", "10.0.0.300"], ["10.0.0.300"]),
    ("invalid-address-free", ["address", "free", "bogus"], ["bogus"]),
    ("missing-argument", ["pool", "create", "p2", "10.1.0.0/24"], ["SIZE"]),
    ("unknown-command", ["pool", "rename", "default"], ["rename"]),
    ("bad-output", ["-o", "yaml", "pool", "list"], ["yaml"]),
    ("bad-shell", ["completion", "tcsh"], ["tcsh"]),
]


@pytest.mark.parametrize("args,named", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(ctl, populated, args, named):
    before = dump(populated)
    r = ctl(*args)
    assert_one_line_error(r, *named)
    assert dump(populated) == before


@pytest.mark.parametrize("flag,value", [
    ("--etcd-prefix", "no-leading-slash/"),
    ("--etcd-timeout", "soon"),
    ("--etcd-timeout", "0s"),
    ("--etcd-endpoints", "ftp://127.0.0.1:2379"),
    ("--etcd-endpoints", "127.0.0.1:2379"),
    ("--etcd-tls-ca", "/nonexistent/ca.pem"),
    ("--config", "/nonexistent/coilctl.yml"),
])
def test_bad_connection_setting(ctl, populated, flag, value):
    before = dump(populated)
    r = ctl(flag, value, "pool", "create", "p2", "10.1.0.0/24", "3")
    assert_one_line_error(r, value)
    assert dump(populated) == before


def test_bad_config_file(ctl, populated, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("endpionts: http://127.0.0.1:2379\n")
    before = dump(populated)
    r = ctl("--config", str(path), "pool", "list")
    assert_one_line_error(r, "endpionts", str(path))
    assert dump(populated) == before


def test_etcd_unreachable(ctl, populated):
    dead = f"http://127.0.0.1:{free_port()}"
    before = dump(populated)
    for args in (["pool", "list"], ["pool", "create", "p2", "10.1.0.0/24", "3"],
                 ["address", "free", "--yes", "10.0.0.2"]):
        r = hypercoil("coilctl", "--etcd-endpoints", dead, "--etcd-timeout", "2s", *args)
        line = assert_one_line_error(r, dead)
        assert "etcd" in line
    assert dump(populated) == before


# -- credentials -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_etcd():
    """A second etcd with authentication enabled (user root, password rootpw)."""
    with auth_etcd_in_tmpdir() as server:
        yield server


@pytest.fixture
def auth_store(auth_etcd, etcd_prefix):
    from coil.config import EtcdConfig
    from coil.store import IPAMStore
    from coil.store.etcd import Etcd
    s = IPAMStore(Etcd(EtcdConfig(endpoints=(auth_etcd.endpoint,), prefix=etcd_prefix,
                                  username="root", password="rootpw")))
    try:
        yield s
    finally:
        s.close()


def test_wrong_credentials(auth_etcd, auth_store, etcd_prefix):
    auth_store.create_pool("default", "10.0.0.0/24", 3)
    before = dump(auth_store)
    for user, password in (("root", "wrong"), ("nobody", "rootpw")):
        for args in (["pool", "list"], ["pool", "create", "p2", "10.1.0.0/24", "3"]):
            r = hypercoil("coilctl", "--etcd-endpoints", auth_etcd.endpoint,
                          "--etcd-prefix", etcd_prefix, "--etcd-username", user,
                          "--etcd-password", password, *args)
            line = assert_one_line_error(r, auth_etcd.endpoint)
            assert "credentials" in line
            assert "wrong" not in line.replace("--etcd-password", ""), "password leaked"
    assert dump(auth_store) == before


def test_missing_credentials(auth_etcd, auth_store, etcd_prefix):
    before = dump(auth_store)
    r = hypercoil("coilctl", "--etcd-endpoints", auth_etcd.endpoint,
                  "--etcd-prefix", etcd_prefix, "pool", "create", "p2", "10.1.0.0/24", "3")
    line = assert_one_line_error(r, auth_etcd.endpoint)
    assert "credentials" in line
    assert dump(auth_store) == before


def test_right_credentials(auth_etcd, auth_store, etcd_prefix):
    base = ["coilctl", "--etcd-endpoints", auth_etcd.endpoint, "--etcd-prefix", etcd_prefix]
    r = hypercoil(*base, "--etcd-username", "root", "--etcd-password", "rootpw",
                  "pool", "create", "default", "10.0.0.0/24", "3")
    assert r.returncode == 0, r.stderr
    r = hypercoil(*base, "-o", "json", "pool", "list",
                  env={"COILCTL_ETCD_USERNAME": "root", "COILCTL_ETCD_PASSWORD": "rootpw"})
    assert r.returncode == 0, r.stderr
    assert [p["name"] for p in json.loads(r.stdout)] == ["default"]
    assert [p.name for p in auth_store.list_pools()] == ["default"]


def test_password_from_a_file_not_the_command_line(auth_etcd, auth_store, etcd_prefix, tmp_path):
    secret = tmp_path / "etcd-password"
    secret.write_text("rootpw\n")
    secret.chmod(0o600)
    base = ["coilctl", "--etcd-endpoints", auth_etcd.endpoint, "--etcd-prefix", etcd_prefix]
    r = hypercoil(*base, "--etcd-username", "root", "--etcd-password-file", str(secret),
                  "pool", "create", "default", "10.0.0.0/24", "3")
    assert r.returncode == 0, r.stderr
    r = hypercoil(*base, "-o", "json", "pool", "list",
                  env={"COILCTL_ETCD_USERNAME": "root",
                       "COILCTL_ETCD_PASSWORD_FILE": str(secret)})
    assert r.returncode == 0, r.stderr
    assert [p["name"] for p in json.loads(r.stdout)] == ["default"]
    # a wrong password in the file: refused like a wrong flag, the password not shown
    secret.write_text("wrong\n")
    r = hypercoil(*base, "--etcd-username", "root", "--etcd-password-file", str(secret),
                  "pool", "list")
    line = assert_one_line_error(r, auth_etcd.endpoint)
    assert "credentials" in line and "wrong" not in line
    # coild takes the same flag, and starts against the auth-enabled etcd
    from harness import Coild, Netns
    secret.write_text("rootpw")
    node = Netns("node")
    c = Coild(node, str(tmp_path), auth_etcd.unix_endpoint, etcd_prefix,
              extra=["--etcd-username", "root", "--etcd-password-file", str(secret)])
    try:
        c.start()
        assert c.rest("GET", "/readyz")[0] == 200
        with open(f"/proc/{c.proc.pid}/cmdline", "rb") as f:
            assert b"rootpw" not in f.read()
    finally:
        c.stop()
        node.delete()


# -- v1's settings -------------------------------------------------------------------------

def test_v1_environment_names_reach_etcd(etcd_server, etcd_prefix, populated, tmp_path):
    """A v1 operator's environment (COILCTL_ENDPOINTS, COILCTL_PREFIX) works as it is."""
    r = hypercoil("coilctl", "pool", "list",
                  env={"COILCTL_ENDPOINTS": etcd_server.endpoint, "COILCTL_PREFIX": etcd_prefix})
    assert r.returncode == 0, r.stderr
    assert "default" in r.stdout and "global" in r.stdout
    # and v1's config-file keys next to it
    conf = tmp_path / "v1.yml"
    conf.write_text(f"endpoints:\n  - {etcd_server.endpoint}\nprefix: {etcd_prefix}\n")
    r = hypercoil("coilctl", "--config", str(conf), "-o", "json", "pool", "list")
    assert r.returncode == 0, r.stderr
    assert [p["name"] for p in json.loads(r.stdout)] == ["default", "global"]
