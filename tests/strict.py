"""Strict mode (``COIL_STRICT=1``, set by ``make test``): a skipped test is
a failure. A missing tool, root or build output must never quietly turn a
test into a skip in CI."""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("COIL_STRICT", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under COIL_STRICT=1: {reason}"
