"""deploy/bird: the per-node BIRD templates of docs/install.md render with
deploy/bird/render.sh and are accepted by BIRD's own parser (bird -p)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RENDER = ROOT / "deploy" / "bird" / "render.sh"

TOR = {"NODE_ADDRESS": "10.69.0.11", "NODE_AS": "64601", "TOR_ADDRESS": "10.69.0.1",
       "TOR_AS": "64600", "POOL_PREFIXES": "10.64.0.0/14{14,32}, 203.0.113.0/26{26,32}"}
RR = {"NODE_ADDRESS": "10.69.0.11", "CLUSTER_AS": "64600", "RR1_ADDRESS": "10.69.0.2",
      "RR2_ADDRESS": "10.69.0.3", "POOL_PREFIXES": "10.64.0.0/14{14,32}"}


def render(template, values):
    env = {k: v for k, v in os.environ.items() if k not in {**TOR, **RR}}
    env.update(values)
    return subprocess.run([str(RENDER), template], env=env, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("template, values", [("bird-tor.conf.tmpl", TOR),
                                              ("bird-rr.conf.tmpl", RR)])
def test_template_renders_to_a_config_bird_accepts(template, values, tmp_path):
    r = render(template, values)
    assert r.returncode == 0, r.stderr
    assert "${" not in r.stdout
    for value in values.values():
        assert value in r.stdout
    conf = tmp_path / "bird.conf"
    conf.write_text(r.stdout)
    check = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True,
                           timeout=30)
    assert check.returncode == 0, check.stderr
    # what coil needs of every node's BIRD (docs/routing.md)
    assert "kernel table 119;" in r.stdout and "learn;" in r.stdout
    assert 'export where proto = "coil_blocks";' in r.stdout


@pytest.mark.parametrize("template, values, missing", [
    ("bird-tor.conf.tmpl", TOR, "TOR_AS"), ("bird-rr.conf.tmpl", RR, "RR2_ADDRESS")])
def test_a_missing_variable_is_named_and_nothing_printed(template, values, missing):
    r = render(template, {k: v for k, v in values.items() if k != missing})
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{missing} is not set" in lines[0]


def test_a_value_bird_rejects_is_reported_and_nothing_printed():
    r = render("bird-tor.conf.tmpl", {**TOR, "NODE_ADDRESS": "10.69.0.x"})
    assert r.returncode == 1 and r.stdout == ""
    assert "bird rejects the result" in r.stderr
