"""Every CNI error code the plugin can return (an ``ERR_*`` of
coil/cni/spec.py that the code uses) has a row in docs/cni.md's error table
and in docs/troubleshooting.md's "CNI error codes" (cause and action), so
that a code added later cannot go undocumented (issue 15: the table missed
code 3 and causes of 7)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "coil" / "cni" / "spec.py"


def constants() -> dict[str, int]:
    tree = ast.parse(SPEC.read_text())
    return {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id.startswith("ERR_")
            and isinstance(n.value, ast.Constant)}


def used_codes() -> set[int]:
    names = constants()
    uses = {name: 0 for name in names}
    for path in (ROOT / "coil").rglob("*.py"):
        text = path.read_text()
        for name in names:
            n = len(re.findall(rf"\b{name}\b", text))
            uses[name] += n - (1 if path == SPEC else 0)     # minus its definition
    return {names[name] for name, n in uses.items() if n > 0}


def table_codes(text: str, heading: str) -> set[int]:
    sec = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", sec, re.M)}


def test_the_code_uses_the_usual_codes():
    """The scan itself works: codes coild answers with are found."""
    assert {4, 7, 11, 50, 51, 104} <= used_codes()


def test_every_returned_code_is_in_both_tables():
    codes = used_codes()
    cni = table_codes((ROOT / "docs" / "cni.md").read_text(), "## Errors")
    trouble = table_codes((ROOT / "docs" / "troubleshooting.md").read_text(),
                          "## CNI error codes")
    assert not codes - cni, f"docs/cni.md's error table lacks {sorted(codes - cni)}"
    assert not codes - trouble, f"docs/troubleshooting.md lacks {sorted(codes - trouble)}"
