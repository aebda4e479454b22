#!/usr/bin/env python3
"""The chart's values table, generated from the `# --` comments in values.yaml.

    python deploy/helm/values_doc.py          # rewrite the table in deploy/helm/nld-gateway/README.md
    python deploy/helm/values_doc.py --check  # exit 1 when the README is stale or a value lacks a comment

Conventions (helm-docs style): every key carries a `# -- description` comment (continued on
following `#` lines). A mapping whose first key is commented is a section: each of its keys
must be commented and gets its own row. A mapping whose keys are not commented (resources,
security contexts, probes) and every list is one value, shown with its default as JSON.
Needs only PyYAML.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

CHART_DIR = Path(__file__).resolve().parent / "nld-gateway"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_][A-Za-z0-9_.\-/]*):(?:\s|$)")


class UndocumentedValue(ValueError):
    pass


def comments_by_path(text: str) -> dict[tuple[str, ...], str]:
    """Key path -> its `# --` comment, for every key outside list items."""
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    list_indent: int | None = None  # inside a list value: the indent of the key that owns it
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip(" "))
        if list_indent is not None:
            if not stripped or indent > list_indent or (stripped.startswith("- ") and indent == list_indent):
                continue
            list_indent = None
        if not stripped:
            pending = None
            continue
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        if stripped.startswith("- "):
            list_indent = stack[-1][0] if stack else -1
            pending = None
            continue
        m = KEY.match(line)
        if not m:
            pending = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        if pending is not None:
            out[tuple(k for _, k in stack)] = " ".join(pending).strip()
        pending = None
    return out


def _type(value) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def value_rows(values_file: Path) -> list[tuple[str, str, str, str]]:
    """(key, type, default as JSON, description) for every documented value; raises
    UndocumentedValue naming the first key without a comment."""
    text = values_file.read_text()
    values = yaml.safe_load(text)
    comments = comments_by_path(text)
    rows: list[tuple[str, str, str, str]] = []

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            p = path + (key,)
            if p not in comments or not comments[p]:
                raise UndocumentedValue(f"values.yaml: {'.'.join(p)} has no '# --' comment")
            if isinstance(value, dict) and value and (p + (next(iter(value)),)) in comments:
                walk(value, p)
            else:
                rows.append((".".join(p), _type(value), json.dumps(value), comments[p]))

    walk(values, ())
    return rows


def render_table(rows) -> str:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, typ, default, desc in rows:
        cell = default.replace("|", "\\|")
        lines.append(f"| `{key}` | {typ} | `{cell}` | {desc.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    readme = CHART_DIR / "README.md"
    table = render_table(value_rows(CHART_DIR / "values.yaml"))
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    updated = f"{head}{START}\n{table}\n{END}{tail}"
    if "--check" in argv:
        if updated != text:
            print(f"{readme}: the values table is stale; run python deploy/helm/values_doc.py")
            return 1
        return 0
    readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
