#!/usr/bin/env python3
"""Verify that a benchmark run completed and produced every scenario x target row.

    python3 bench/check_quick.py RESULTS_DIR [--targets a,b,...] [--scenarios ...] [--allow-errors]

Exits 0 only if run.json says the run completed, every expected
scenario x target x rep has a raw record with status "ok" (or "errors" with
--allow-errors) and its headline metrics, and summary.md, SETUP.md and every
plot it references exist.  Targets that do not apply to a scenario (direct and
HAProxy do not serve static files) are not expected there.  For the static
scenarios the pre-load probe must have found the file served byte for byte.
A target the run skipped on purpose (ringlb-tls when the ringlb binary has no
[tls] support; run.json "skipped_targets") is reported and not expected.
Checks completeness, never speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import report  # noqa: E402
from targets import STATIC_SCENARIOS, applies  # noqa: E402

# Metrics that must be present per scenario (proxy-only ones skipped for direct).
HEADLINE = {
    "pingpong": (["msgs_per_s", "p99_us"], ["proxy_cpu_us_per_msg", "proxy_rss_mb"]),
    "pingpong_pin": (["msgs_per_s", "p99_us"], ["proxy_cpu_us_per_msg"]),
    "rate": (["msgs_per_s", "p99_us"], ["proxy_cpu_us_per_msg"]),
    "handshake": (["conns_per_s"], ["proxy_cpu_us_per_conn"]),
    "handshake_resumed": (["conns_per_s", "tls_resumed_pct"], ["proxy_cpu_us_per_conn"]),
    "bulk": (["mb_per_s"], ["proxy_cpu_s_per_gb"]),
    "idle": (["held", "machine_per_conn_b"], ["proxy_rss_per_conn_b", "threads_before", "threads_held"]),
    "static_small": (["requests_per_s", "p99_us"], ["proxy_cpu_us_per_req"]),
    "static_large": (["mb_per_s", "requests_per_s"], ["proxy_cpu_s_per_gb"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--targets", help="targets that must be present (default: those of the run)")
    ap.add_argument("--scenarios", help="scenarios that must be present (default: those of the run)")
    ap.add_argument("--allow-errors", action="store_true",
                    help="accept rows whose load run reported errors (status 'errors')")
    a = ap.parse_args()
    out = a.results_dir
    problems: list[str] = []
    try:
        meta, recs = report.load_run(out)
    except (OSError, ValueError) as e:
        print(f"FAIL: cannot read {out}/run.json: {e}")
        return 1
    if meta.get("status") != "completed":
        problems.append(f"run status is {meta.get('status')!r}, not 'completed'")
    targets = a.targets.split(",") if a.targets else meta["targets"]
    skipped = meta.get("skipped_targets") or {}
    for t, why in skipped.items():
        print(f"note: {t} was skipped by the run: {why}")
    targets = [t for t in targets if t not in skipped]
    scenarios = a.scenarios.split(",") if a.scenarios else meta["scenarios"]
    reps = meta.get("reps", 1)
    by = {(r["scenario"], r["target"], r["rep"]): r for r in recs}
    okstates = ("ok", "errors") if a.allow_errors else ("ok",)
    rows = 0
    expected = 0
    for s in scenarios:
        for t in targets:
            if not applies(s, t):
                continue
            for rep in range(reps):
                expected += 1
                r = by.get((s, t, rep))
                name = f"{s} x {t} (rep {rep})"
                if r is None:
                    problems.append(f"{name}: missing")
                    continue
                if r["status"] not in okstates:
                    problems.append(f"{name}: status {r['status']}: {(r.get('error') or '')[:300]}")
                    continue
                m = report.metrics(r)
                common, proxy_only = HEADLINE.get(s, ([], []))
                need = common + (proxy_only if t != "direct" else [])
                miss = [k for k in need if m.get(k) is None]
                if miss:
                    problems.append(f"{name}: no value for {', '.join(miss)}")
                    continue
                if s in STATIC_SCENARIOS:
                    pr = r.get("probe") or {}
                    if pr.get("status") != 200 or not pr.get("body_ok"):
                        problems.append(f"{name}: probe did not get the file byte for byte: {pr}")
                        continue
                rows += 1
    summ = os.path.join(out, "summary.md")
    if not os.path.exists(summ):
        problems.append("summary.md missing")
    else:
        text = open(summ).read()
        for s in scenarios:
            title = report.SCENARIO_TITLES.get(s, s)
            if f"## {title}" not in text:
                problems.append(f"summary.md: no section for {s}")
        for t in targets:
            if not any(applies(s, t) for s in scenarios):
                continue
            if not re.search(rf"^\| {re.escape(t)} \|", text, re.M):
                problems.append(f"summary.md: no row for target {t}")
        for img in re.findall(r"\]\(([^)]+\.svg)\)", text):
            p = os.path.join(out, img)
            if not os.path.exists(p) or os.path.getsize(p) < 200:
                problems.append(f"plot {img} missing or empty")
    if not os.path.exists(os.path.join(out, "SETUP.md")):
        problems.append("SETUP.md missing")
    if problems:
        print(f"FAIL: {rows}/{expected} rows complete in {out}")
        for p in problems:
            print(f"  - {p}")
        print(f"bench: {rows} passed, {max(1, expected - rows)} failed")
        return 1
    print(f"OK: {rows}/{expected} rows complete ({len(scenarios)} scenarios x {len(targets)} targets x {reps} reps, "
          f"minus n/a pairs) in {out}")
    print(f"bench: {rows} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
