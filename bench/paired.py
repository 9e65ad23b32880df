#!/usr/bin/env python3
"""Paired, per-rep ratios of two targets of one bench/run.py run.

    python3 bench/paired.py RESULTS_DIR SCENARIO A B [METRIC]

For an A/B (`--targets ringlb,ringlb-base --base-bin ...`) the targets run
back to back within each rep, so the ratio of the two in the same rep
cancels most of the drift that the medians over reps keep. Prints each
rep's A, B and A/B, then the median ratio. METRIC is one of report.py's
keys (default proxy_cpu_us_per_msg; handshake runs: proxy_cpu_us_per_conn).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out, scenario, a, b = argv[:4]
    metric = argv[4] if len(argv) == 5 else "proxy_cpu_us_per_msg"
    _, recs = report.load_run(out)
    by_rep: dict[int, dict[str, float]] = {}
    for r in recs:
        if r.get("scenario") == scenario and r.get("status") == "ok":
            v = report.metrics(r).get(metric)
            if v:
                by_rep.setdefault(r["rep"], {})[r["target"]] = v
    ratios = []
    for rep in sorted(by_rep):
        x, y = by_rep[rep].get(a), by_rep[rep].get(b)
        if x and y:
            ratios.append(x / y)
            print(f"rep {rep}: {a} {x:.2f}  {b} {y:.2f}  ratio {x / y:.3f}")
    if not ratios:
        print(f"no rep has both {a} and {b} with {metric} in {scenario}", file=sys.stderr)
        return 1
    print(f"median {a}/{b}: {statistics.median(ratios):.3f} over {len(ratios)} reps "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
