"""Render RELIABILITY.md's table from a test run's record:

    HOTSWAP_RELIABILITY_JSON=/tmp/reliability.json python -m pytest
    python -m tests.reliability /tmp/reliability.json
"""

from __future__ import annotations

import json
import sys


def table(rows: list[dict]) -> str:
    by: dict[str, dict] = {}
    for row in rows:
        agg = by.setdefault(row["scenario"], {"runs": 0, "requests": 0, "failed": 0, "inputs": 0, "in_flight": 0,
                                              "held": []})
        agg["runs"] += 1
        for key in ("requests", "failed", "inputs", "in_flight"):
            agg[key] += row.get(key, 0)
        if row["held"] not in agg["held"]:
            agg["held"].append(row["held"])
    lines = ["| scenario | runs | requests sent | in flight at the fault | requests failed | inputs tried | "
             "what held |", "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, agg in by.items():
        lines.append(f"| {name} | {agg['runs']} | {agg['requests']} | {agg['in_flight'] or '-'} | {agg['failed']} | "
                     f"{agg['inputs']} | {'; '.join(agg['held'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(open(sys.argv[1]).read())))
