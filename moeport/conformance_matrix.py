"""The conformance matrix once the ranks have run the suite: merged over ranks, judged, printed, saved.

A matrix is {operation: {dtype: {"status", "detail"}}}, a status one of STATUS_ORDER
(worst last); moeport/conformance.py fills one per rank.
"""

from __future__ import annotations

import json
from typing import Any

STATUS_ORDER = ("pass", "fallback", "unsupported", "FAIL")


def merge(per_rank: list[dict[str, dict[str, dict[str, str]]]]) -> dict[str, dict[str, dict[str, str]]]:
    """One matrix from every rank's: a cell takes its worst status; a FAIL names the rank."""
    merged: dict[str, dict[str, dict[str, str]]] = {}
    for rank, matrix in enumerate(per_rank):
        for op, row in matrix.items():
            for dtype, cell in row.items():
                current = merged.setdefault(op, {}).get(dtype)
                if current is None or STATUS_ORDER.index(cell["status"]) > STATUS_ORDER.index(current["status"]):
                    detail = f"rank {rank}: {cell['detail']}" if cell["detail"] else ""
                    merged[op][dtype] = {"status": cell["status"], "detail": detail}
    return merged


def failed(matrix: dict[str, dict[str, dict[str, str]]]) -> bool:
    """Whether any cell failed."""
    return any(cell["status"] == "FAIL" for row in matrix.values() for cell in row.values())


def format_matrix(matrix: dict[str, dict[str, dict[str, str]]]) -> str:
    """The matrix as an aligned text table, failures listed below it."""
    used = list(dict.fromkeys(column for row in matrix.values() for column in row))  # in the order first seen
    width = max(len(op) for op in matrix)
    lines = [f"{'operation':<{width}}  " + "  ".join(f"{c:<11}" for c in used)]
    for op, row in matrix.items():
        lines.append(f"{op:<{width}}  " + "  ".join(f"{row.get(c, {'status': ''})['status']:<11}" for c in used))
    for op, row in matrix.items():
        for dtype, cell in row.items():
            if cell["status"] == "FAIL":
                lines.append(f"FAIL {op} [{dtype}]: {cell['detail']}")
    return "\n".join(line.rstrip() for line in lines)


def report(rt_info: dict[str, Any], matrix: dict[str, dict[str, dict[str, str]]]) -> dict[str, Any]:
    """The JSON document `moeport conformance --json` writes."""
    return {**rt_info, "passed": not failed(matrix), "results": matrix}


def to_json(document: dict[str, Any]) -> str:
    """Stable JSON text of a report."""
    return json.dumps(document, indent=2, sort_keys=False)
