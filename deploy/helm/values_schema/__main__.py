"""`python -m deploy.helm.values_schema [--check]`: write the chart's values.schema.json, or check it is current."""

from __future__ import annotations

import sys

from . import SCHEMA_FILE, render


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if SCHEMA_FILE.read_text() != text:
            print(f"{SCHEMA_FILE} is stale: run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_FILE.write_text(text)
    print(f"wrote {SCHEMA_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
