#!/usr/bin/env bash
# CI entry for the benchmark harness: quick mode end to end (including the
# static-file scenarios, --static), then a completeness check (every
# applicable scenario x target row present); then the same for the TLS
# targets (--tls; ringlb-tls is skipped, and says why, while the ringlb binary
# has no [tls] support; BENCH_TLS_TARGETS= turns the TLS pass off). Asserts
# that the runs completed, never any speed.
#
#   bash bench/ci.sh [extra run.py args]
#
# Unlike bench/run.py (which only checks for tools and asks), this CI script
# installs nginx, HAProxy and openssl (TLS test certificates) from Debian
# when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
if ! have nginx || ! have haproxy || ! have openssl; then
    echo "bench/ci.sh: installing nginx, haproxy and openssl (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy openssl
fi

cargo build --release --workspace
TARGETS="${BENCH_TARGETS:-direct,ringlb,nginx,nginx-tuned,haproxy}"
OUT="${BENCH_OUT:-$(mktemp -d /tmp/ringlb-bench-ci.XXXXXX)/quick}"
python3 bench/run.py --quick --static --targets "$TARGETS" --out "$OUT" "$@"
python3 bench/check_quick.py "$OUT" --targets "$TARGETS"

TLS_TARGETS="${BENCH_TLS_TARGETS-ringlb-tls,nginx-tls,haproxy-tls}"
if [ -n "$TLS_TARGETS" ]; then
    python3 bench/run.py --quick --tls --targets "$TLS_TARGETS" --out "$OUT-tls" "$@"
    python3 bench/check_quick.py "$OUT-tls" --targets "$TLS_TARGETS"
fi
