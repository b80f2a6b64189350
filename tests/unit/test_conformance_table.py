"""docs/cni.md's conformance table names, for every spec requirement, the
test that proves it: each named test must exist (a renamed or deleted test
would otherwise leave the table claiming a proof that is gone), every row
names at least one, and every prefix (``t11::`` ...) is defined in the
paragraph above the table and names a test file that exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CNI_MD = ROOT / "docs" / "cni.md"
TESTS = ROOT / "tests" / "integration"
HEADING = "## Conformance to the CNI spec"
REF = re.compile(r"\b([a-z0-9]+)::([A-Za-z0-9_*]+)(?:\[([^\]]+)\])?")


def section(text: str) -> str:
    assert HEADING in text, f"docs/cni.md has no '{HEADING}' section"
    return text.split(HEADING, 1)[1].split("\n## ", 1)[0]


def prefixes(sec: str) -> dict[str, str]:
    """``t11`` -> ``test_cni11.py``, from the paragraph above the table."""
    prose = " ".join(line for line in sec.splitlines() if not line.startswith("|"))
    return dict(re.findall(r"`([a-z0-9]+)::` (?:are )?in\s+`(?:tests/integration/)?"
                           r"(test_\w+\.py)`", prose))


def rows(sec: str) -> list[list[str]]:
    lines = [line for line in sec.splitlines() if line.startswith("|")]
    body = [line for line in lines[1:] if not re.match(r"\|\s*-", line)]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in body]


def defined_tests(path: Path) -> tuple[set[str], str]:
    """The names of the test functions of ``path`` and its source."""
    src = path.read_text()
    tree = ast.parse(src)
    names = {n.name for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
             and n.name.startswith("test_")}
    return names, src


def missing_refs(text: str) -> list[str]:
    """Every problem of the table in ``text`` (the content of cni.md)."""
    sec = section(text)
    where = prefixes(sec)
    problems = []
    if not where:
        problems.append("no 'NAME::` in `test_x.py`' prefix definitions above the table")
    for prefix, fname in where.items():
        if not (TESTS / fname).exists():
            problems.append(f"{prefix}:: names {fname}, which does not exist")
    table = rows(sec)
    if not table:
        problems.append("the conformance table has no rows")
    previous = None
    for cells in table:
        cell = cells[-1]
        refs = REF.findall(cell)
        if not refs:
            # "same test" repeats the row above's proof
            if cell.lower().startswith("same test") and previous:
                continue
            problems.append(f"row {cells[0]!r} names no test")
            continue
        previous = refs
        for prefix, name, param in refs:
            fname = where.get(prefix)
            if fname is None:
                problems.append(f"{prefix}::{name}: prefix {prefix}:: is not defined")
                continue
            if not (TESTS / fname).exists():
                continue
            names, src = defined_tests(TESTS / fname)
            pattern = re.compile(re.escape(name).replace(r"\*", r"\w*") + r"\Z")
            found = [n for n in names if pattern.match(n)]
            if not found:
                problems.append(f"{prefix}::{name}: no such test in {fname}")
            elif param and f'"{param}"' not in src and f"'{param}'" not in src:
                problems.append(f"{prefix}::{name}[{param}]: no parameter {param!r} in {fname}")
    return problems


def test_every_test_the_conformance_table_names_exists():
    problems = missing_refs(CNI_MD.read_text())
    assert not problems, "\n".join(problems)


def test_the_checker_sees_a_missing_test_a_bad_prefix_and_a_bad_parameter():
    text = CNI_MD.read_text()
    sec = section(text)
    row = next(line for line in sec.splitlines() if "t11::test_check_sees_drift" in line)
    for bad, named in (
            (row.replace("t11::test_check_sees_drift", "t11::test_check_sees_no_drift"),
             "test_check_sees_no_drift"),
            (row.replace("t11::test_check_sees_drift", "zz::test_check_sees_drift"),
             "prefix zz::"),
            (row + "\n| a row | with | nothing |", "names no test")):
        problems = missing_refs(text.replace(row, bad))
        assert any(named in p for p in problems), (named, problems)
    gone_param = text.replace("test_check_sees_drift[reservation-gone-from-etcd]",
                              "test_check_sees_drift[no-such-case]")
    assert any("no-such-case" in p for p in missing_refs(gone_param))
