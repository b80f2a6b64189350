"""Human tables and JSON for coilctl. Domain code never prints; this does."""

from __future__ import annotations

import json


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def as_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
