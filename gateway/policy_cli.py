"""`nld-gateway policy validate FILE`: check a policy file and print precise errors.

Exit status 0 with a one-line summary when valid; 2 with `field.path: reason` lines on stderr
when not.
"""

from __future__ import annotations

import argparse
import sys


def add_policy_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="work with mode policy files")
    psub = p.add_subparsers(dest="policy_command", required=True)
    v = psub.add_parser("validate", help="validate a policy YAML file")
    v.add_argument("file")
    v.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace, environ: dict[str, str] | None = None) -> int:
    from policies import PolicyFileError, load_policy_file

    try:
        spec = load_policy_file(args.file)
    except PolicyFileError as e:
        print(f"invalid policy {e}", file=sys.stderr)
        return 2
    m = spec.mode
    levels = [m.sparse_mode] + ([m.middle.mode] if m.middle else []) + [m.loaded_mode]
    print(f"{args.file}: valid ({len(spec.signals)} signals; modes {' -> '.join(levels)}; "
          f"loaded above {m.enter_loaded_above:g}, back below {m.leave_loaded_below:g}; dwell {m.min_dwell_s:g} s)")
    return 0
