#!/usr/bin/env python3
"""Compare two kosoku (Autobahn-format) reports case by case.

    compare.py [--expect CASES.txt] [--details] [--names direct,ringlb] DIR_A DIR_B

Each DIR holds a kosoku report: `index.json` ({agent: {case_id: entry}}) and
one `<agent>_case_<id>.json` per case. For every case the verdict fields
`behavior`, `behaviorClose` and `remoteCloseCode` (the close code the server
under test sent) must be equal in both reports. Durations are not compared.
With --details, the per-case reports must also agree on what kosoku received
and on the close details (STRICT_FIELDS below).

Prints the count of each verdict in both reports, then every differing case
with the details from both per-case reports (description, result prose,
close state, received events) so the cause can be read off directly.

Exit status: 0 if both reports hold the same cases (and exactly the ones in
--expect, when given) with identical verdicts; 1 on any difference, on a
missing or empty report, or on a missing case. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")
# Printed for a case whose verdicts differ (where they differ), to show why.
DETAIL_FIELDS = (
    "result",
    "resultClose",
    "wasClean",
    "wasNotCleanReason",
    "closedByMe",
    "failedByMe",
    "droppedByMe",
    "wasServerConnectionDropTimeout",
    "wasCloseHandshakeTimeout",
    "localCloseCode",
    "remoteCloseCode",
    "remoteCloseReason",
    "received",
)
# With --details these must match too, for cases whose verdicts already do:
# what kosoku received (messages, pings, pongs, in order), who closed and how,
# and the opening-handshake response, byte for byte. Timing, octet/frame
# statistics and the wire log are left out: a proxy in between legitimately
# changes TCP segmentation and latency (and the request's Host port).
STRICT_FIELDS = (
    "received",
    "remoteCloseCode",
    "remoteCloseReason",
    "localCloseCode",
    "localCloseReason",
    "closedByMe",
    "failedByMe",
    "droppedByMe",
    "wasClean",
    "wasNotCleanReason",
    "wasServerConnectionDropTimeout",
    "wasOpenHandshakeTimeout",
    "wasCloseHandshakeTimeout",
    "result",
    "resultClose",
    "httpResponse",
)


def case_key(case_id: str) -> list[int]:
    return [int(p) if p.isdigit() else 0 for p in case_id.split(".")]


class ReportError(Exception):
    pass


def load_index(directory: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Return ({case_id: entry}, [agents]); the agent name is the Server header,
    which may legitimately differ between the direct run and the proxied one."""
    path = directory / "index.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (did kosoku run to the end?)")
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable: {e}")
    if not isinstance(raw, dict) or not raw:
        raise ReportError(f"{path}: empty report")
    cases: dict[str, dict[str, Any]] = {}
    for agent, entries in raw.items():
        if not isinstance(entries, dict):
            raise ReportError(f"{path}: agent {agent!r} has no case table")
        for case_id, entry in entries.items():
            if case_id in cases:
                raise ReportError(f"{path}: case {case_id} reported twice (two agents)")
            missing = [f for f in FIELDS if f not in entry]
            if missing:
                raise ReportError(f"{path}: case {case_id} lacks {', '.join(missing)}")
            cases[case_id] = entry
    if not cases:
        raise ReportError(f"{path}: no cases")
    return cases, list(raw)


def load_case(directory: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return json.loads((directory / entry["reportfile"]).read_text())
    except (OSError, ValueError, KeyError):
        return None


def short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def verdict_table(names: tuple[str, str], a: dict, b: dict) -> str:
    lines = []
    for field in ("behavior", "behaviorClose"):
        ca = Counter(str(e[field]) for e in a.values())
        cb = Counter(str(e[field]) for e in b.values())
        labels = sorted(set(ca) | set(cb))
        width = max([len(field)] + [len(x) for x in labels])
        lines.append(f"{field:<{width}}  {names[0]:>8}  {names[1]:>8}")
        for label in labels:
            lines.append(f"{label:<{width}}  {ca[label]:>8}  {cb[label]:>8}")
        lines.append(f"{'total':<{width}}  {sum(ca.values()):>8}  {sum(cb.values()):>8}")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description="Compare two kosoku reports case by case.")
    ap.add_argument("dir_a", type=Path)
    ap.add_argument("dir_b", type=Path)
    ap.add_argument("--names", default="direct,ringlb", help="column names for A,B")
    ap.add_argument("--details", action="store_true",
                    help="also require identical received events and close details per case")
    ap.add_argument("--expect", type=Path, help="file with the case ids both must contain, one a line")
    args = ap.parse_args()
    names = tuple(args.names.split(",", 1)) if "," in args.names else ("A", "B")

    try:
        a, agents_a = load_index(args.dir_a)
        b, agents_b = load_index(args.dir_b)
    except ReportError as e:
        print(f"compare: FAIL: {e}", file=sys.stderr)
        return 1

    print(f"{names[0]}: {len(a)} cases from {args.dir_a} (agent {', '.join(agents_a)})")
    print(f"{names[1]}: {len(b)} cases from {args.dir_b} (agent {', '.join(agents_b)})")
    print()
    print(verdict_table(names, a, b))

    problems = 0
    if args.expect is not None:
        expected = [l.strip() for l in args.expect.read_text().splitlines() if l.strip()]
        if not expected:
            print(f"compare: FAIL: {args.expect} lists no cases")
            return 1
        for name, rep in zip(names, (a, b)):
            missing = [c for c in expected if c not in rep]
            extra = sorted(set(rep) - set(expected), key=case_key)
            if missing:
                problems += len(missing)
                print(f"{name}: {len(missing)} expected cases missing: {' '.join(missing[:40])}"
                      + (" ..." if len(missing) > 40 else ""))
            if extra:
                problems += len(extra)
                print(f"{name}: {len(extra)} unexpected cases: {' '.join(extra[:40])}"
                      + (" ..." if len(extra) > 40 else ""))

    only_a = sorted(set(a) - set(b), key=case_key)
    only_b = sorted(set(b) - set(a), key=case_key)
    for name, only in ((names[0], only_a), (names[1], only_b)):
        if only:
            problems += len(only)
            print(f"only in {name}: {len(only)} cases: {' '.join(only[:40])}"
                  + (" ..." if len(only) > 40 else ""))

    differing = [
        c for c in sorted(set(a) & set(b), key=case_key)
        if any(a[c][f] != b[c][f] for f in FIELDS)
    ]
    for case_id in differing:
        ea, eb = a[case_id], b[case_id]
        print(f"=== case {case_id} differs")
        for f in FIELDS:
            mark = "  " if ea[f] == eb[f] else "!="
            print(f"  {mark} {f:<16} {names[0]}: {ea[f]!s:<14} {names[1]}: {eb[f]!s}")
        da, db = load_case(args.dir_a, ea), load_case(args.dir_b, eb)
        if da is not None:
            print(f"     description: {short(da.get('description', ''), 400)}")
            print(f"     expectation: {short(da.get('expectation', ''), 400)}")
        for f in DETAIL_FIELDS:
            va = da.get(f) if da is not None else "<no case report>"
            vb = db.get(f) if db is not None else "<no case report>"
            if va != vb:
                print(f"     {f}:")
                print(f"       {names[0]}: {short(va)}")
                print(f"       {names[1]}: {short(vb)}")
    problems += len(differing)

    detail_diffs = 0
    if args.details:
        for case_id in sorted(set(a) & set(b), key=case_key):
            if case_id in differing:
                continue
            da, db = load_case(args.dir_a, a[case_id]), load_case(args.dir_b, b[case_id])
            if da is None or db is None:
                detail_diffs += 1
                print(f"=== case {case_id}: per-case report missing "
                      f"({names[0] if da is None else names[1]})")
                continue
            fields = [f for f in STRICT_FIELDS if da.get(f) != db.get(f)]
            if not fields:
                continue
            detail_diffs += 1
            print(f"=== case {case_id}: same verdict ({a[case_id]['behavior']}, "
                  f"{a[case_id]['behaviorClose']}) but details differ")
            print(f"     description: {short(da.get('description', ''), 400)}")
            for f in fields:
                print(f"     {f}:")
                print(f"       {names[0]}: {short(da.get(f))}")
                print(f"       {names[1]}: {short(db.get(f))}")
        problems += detail_diffs

    print()
    common = len(set(a) & set(b))
    if problems:
        print(f"compare: FAIL: {len(differing)} of {common} cases have different verdicts"
              + (f", {detail_diffs} more differ in details" if args.details else "")
              + f", {problems - len(differing) - detail_diffs} missing/extra")
        return 1
    print(f"compare: OK: all {common} cases have identical verdicts"
          + (" and details" if args.details else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
