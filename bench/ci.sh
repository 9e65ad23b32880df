#!/usr/bin/env bash
# CI entry for the benchmark harness: quick mode end to end (including the
# static-file scenarios, --static), then a completeness check (every
# applicable scenario x target row present). Asserts that the run completed,
# never any speed.
#
#   bash bench/ci.sh [extra run.py args]
#
# Unlike bench/run.py (which only checks for tools and asks), this CI script
# installs nginx and HAProxy from Debian when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have haproxy; then
    echo "bench/ci.sh: installing nginx and haproxy (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy
fi

cargo build --release --workspace
TARGETS="${BENCH_TARGETS:-direct,ringlb,nginx,nginx-tuned,haproxy}"
OUT="${BENCH_OUT:-$(mktemp -d /tmp/ringlb-bench-ci.XXXXXX)/quick}"
python3 bench/run.py --quick --static --targets "$TARGETS" --out "$OUT" "$@"
python3 bench/check_quick.py "$OUT" --targets "$TARGETS"
