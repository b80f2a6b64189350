"""The three places that ship coil's conflist agree and are CNI 1.1
(issue 14): deploy/coil-config.yaml, coil-installer's default and the example
of docs/cni.md ("Network configuration") carry "cniVersions" ["1.0.0",
"1.1.0"] next to "cniVersion" 1.0.0, the same name and the same chain. The
manifest and the installer's default are identical; the page may spell out
the plugin's defaults (ipv4 true, ipv6 false)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from coil.installer.main import DEFAULT_NETCONF

ROOT = Path(__file__).resolve().parents[2]
COIL_DEFAULTS = {"ipv4": True, "ipv6": False}


def deployed() -> dict:
    doc = yaml.safe_load((ROOT / "deploy" / "coil-config.yaml").read_text())
    return json.loads(doc["data"]["cni_netconf"])


def documented() -> dict:
    text = (ROOT / "docs" / "cni.md").read_text()
    sec = text.split("## Network configuration", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```json\n(.*?)\n```", sec, re.S)
    assert m, "docs/cni.md's Network configuration has no JSON example"
    return json.loads(m.group(1))


def without_defaults(conflist: dict) -> dict:
    out = dict(conflist)
    out["plugins"] = [{k: v for k, v in p.items()
                       if not (p.get("type") == "coil" and COIL_DEFAULTS.get(k, object()) == v)}
                      for p in conflist["plugins"]]
    return out


def test_every_shipped_conflist_is_cni_1_1():
    for where, conf in (("deploy/coil-config.yaml", deployed()),
                        ("the installer's default", DEFAULT_NETCONF),
                        ("docs/cni.md", documented())):
        assert conf.get("cniVersion") == "1.0.0", where
        assert conf.get("cniVersions") == ["1.0.0", "1.1.0"], where
        assert conf["plugins"][0]["type"] == "coil", where


def test_the_shipped_conflists_agree():
    assert deployed() == DEFAULT_NETCONF
    assert without_defaults(documented()) == without_defaults(DEFAULT_NETCONF)
