#!/usr/bin/env bash
# Autobahn|Testsuite conformance through ringlb, with kosoku (PyPI) as the
# fuzzing client: every case except 9.* (performance) is run against a
# `ringlb-load echo` backend directly, then through `ringlb run` in front of
# that same backend, and compare.py requires the verdicts to be identical
# case by case. See conformance/README.md.
#
# Builds nothing. Environment (all optional):
#   RINGLB_BIN_DIR      dir holding the release `ringlb` and `ringlb-load`
#                       binaries (default: target/release, relative to the
#                       repo root; build them with
#                       `cargo build --release -p ringlb -p ringlb-load`)
#   KOSOKU_VENV         venv to use/create (default: /tmp/ringlb-kosoku-venv)
#   KOSOKU_VERSION      kosoku version installed into a new venv (default 0.1.0)
#   KOSOKU_PARALLELISM  kosoku -p (default: 4)
#   KOSOKU_TIMEOUT      seconds one kosoku run may take (default: 300)
#   CONFORMANCE_OUT     report dir (default: a new /tmp/ringlb-conformance.*);
#                       reports land in $CONFORMANCE_OUT/{direct,ringlb}
#   PYTHON              interpreter that creates the venv (default: python3)
#   COMPARE_DETAILS     1 (default): compare.py --details, i.e. the received
#                       events and close details must match too; 0: verdicts only
#   CONFORMANCE_WSS     1 (default): a third run over TLS (see below); 0: skip it
#
# kosoku is built without TLS ("TLS support not compiled in"), so it cannot
# speak wss:// itself. The third run puts TLS in the middle instead: kosoku ->
# ringlb B (plaintext listener, [upstream] tls to A) -> ringlb A ([tls]
# listener, certificate from a CA made here with the openssl CLI) -> the same
# echo backend. Every frame crosses ringlb's TLS server and TLS client, and
# its verdicts must equal the direct run's too.
#
# Exit status: 0 only if both runs completed and every verdict is identical.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HERE="$ROOT/conformance"
cd "$ROOT"

BIN_DIR="${RINGLB_BIN_DIR:-target/release}"
case "$BIN_DIR" in /*) ;; *) BIN_DIR="$ROOT/$BIN_DIR" ;; esac
VENV="${KOSOKU_VENV:-/tmp/ringlb-kosoku-venv}"
KOSOKU_VERSION="${KOSOKU_VERSION:-0.1.0}"
PAR="${KOSOKU_PARALLELISM:-4}"
KTIMEOUT="${KOSOKU_TIMEOUT:-300}"
PYTHON="${PYTHON:-python3}"
OUT="${CONFORMANCE_OUT:-$(mktemp -d /tmp/ringlb-conformance.XXXXXX)}"
# Same selection for both runs: the whole suite except the performance cases.
INCLUDE='*'
EXCLUDE='9.*'

START=$(date +%s)
log() { echo "conformance: $*"; }
die() { echo "conformance: FAIL: $*" >&2; exit 1; }

for b in ringlb ringlb-load; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b not found (set RINGLB_BIN_DIR or build: cargo build --release -p ringlb -p ringlb-load)"
done

# --- kosoku venv ----------------------------------------------------------
if ! "$VENV/bin/python" -c 'import kosoku' >/dev/null 2>&1; then
  log "creating venv $VENV with kosoku==$KOSOKU_VERSION"
  "$PYTHON" -m venv "$VENV" || die "cannot create venv $VENV with $PYTHON (Debian: apt-get install python3-venv)"
  timeout 300 "$VENV/bin/pip" install --quiet --disable-pip-version-check "kosoku==$KOSOKU_VERSION" \
    || die "pip install kosoku==$KOSOKU_VERSION failed"
fi
KOSOKU="$VENV/bin/kosoku"
[ -x "$KOSOKU" ] || die "$KOSOKU missing"
log "kosoku $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("kosoku"))') in $VENV"

mkdir -p "$OUT"
rm -rf "$OUT/direct" "$OUT/ringlb" "$OUT/wss"
"$VENV/bin/python" "$HERE/list_cases.py" -x "$EXCLUDE" > "$OUT/expected-cases.txt" \
  || die "cannot list kosoku's cases"
log "$(wc -l < "$OUT/expected-cases.txt") cases selected (-i '$INCLUDE' -x '$EXCLUDE'); reports in $OUT"

# --- processes: started here, stopped by PID on exit -----------------------
ECHO_PID=""
LB_PID=""
TLS_A_PID=""
TLS_B_PID=""
KOSOKU_PID=""  # the `timeout` wrapping kosoku; it passes a SIGTERM on to kosoku
cleanup() {
  local pid
  for pid in $KOSOKU_PID $TLS_B_PID $TLS_A_PID $LB_PID $ECHO_PID; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $KOSOKU_PID $TLS_B_PID $TLS_A_PID $LB_PID $ECHO_PID; do
    # Bounded wait (5 s), then SIGKILL that same PID.
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX PID: up to 10 s for a readiness line from a live PID.
wait_for() {
  local _
  for _ in $(seq 100); do
    grep -qE "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

"$BIN_DIR/ringlb-load" echo --listen 127.0.0.1:0 >"$OUT/echo.stdout" 2>"$OUT/echo.stderr" &
ECHO_PID=$!
wait_for "$OUT/echo.stdout" '^listening 127\.0\.0\.1:[0-9]+' "$ECHO_PID" \
  || { cat "$OUT/echo.stdout" "$OUT/echo.stderr" >&2; die "echo backend did not start"; }
ECHO_ADDR=$(sed -nE 's/^listening (127\.0\.0\.1:[0-9]+).*/\1/p' "$OUT/echo.stdout" | head -n1)

"$BIN_DIR/ringlb" run --listen 127.0.0.1:0 --upstream "$ECHO_ADDR" --shards 2 \
  >"$OUT/ringlb.stdout" 2>"$OUT/ringlb.stderr" &
LB_PID=$!
wait_for "$OUT/ringlb.stderr" 'listening on 127\.0\.0\.1:[0-9]+' "$LB_PID" \
  || { cat "$OUT/ringlb.stderr" >&2; die "ringlb did not start"; }
LB_ADDR=$(grep -oE 'listening on 127\.0\.0\.1:[0-9]+' "$OUT/ringlb.stderr" | head -n1 | sed 's/^listening on //')
log "echo backend $ECHO_ADDR (pid $ECHO_PID), ringlb $LB_ADDR -> $ECHO_ADDR (pid $LB_PID)"

# run_kosoku NAME ADDR: kosoku exits 1 when some case is not OK, which the echo
# backend itself causes (see README); that is not an error here, a missing
# report or any other status is.
run_kosoku() {
  local name=$1 addr=$2 rc=0 t0
  t0=$(date +%s)
  # In the background and waited for, so a SIGTERM/SIGINT to this script runs
  # the trap at once (bash defers traps until a foreground child ends).
  timeout --kill-after=10 "$KTIMEOUT" "$KOSOKU" -i "$INCLUDE" -x "$EXCLUDE" -p "$PAR" \
    -o "$OUT/$name" "$addr" >"$OUT/kosoku-$name.log" 2>&1 &
  KOSOKU_PID=$!
  wait "$KOSOKU_PID" || rc=$?
  KOSOKU_PID=""
  log "kosoku against $name ($addr): exit $rc, $(( $(date +%s) - t0 )) s; $(tail -n1 "$OUT/kosoku-$name.log")"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
    tail -n 20 "$OUT/kosoku-$name.log" >&2
    [ "$rc" -eq 124 ] && die "kosoku against $name timed out after ${KTIMEOUT}s"
    die "kosoku against $name exited $rc"
  fi
  [ -s "$OUT/$name/index.json" ] || die "kosoku against $name wrote no index.json"
}

run_kosoku direct "$ECHO_ADDR"
kill -0 "$ECHO_PID" 2>/dev/null || die "echo backend died during the direct run"
run_kosoku ringlb "$LB_ADDR"
kill -0 "$LB_PID" 2>/dev/null || { tail -n 20 "$OUT/ringlb.stderr" >&2; die "ringlb died during the run"; }
kill -0 "$ECHO_PID" 2>/dev/null || die "echo backend died during the ringlb run"

WSS="${CONFORMANCE_WSS:-1}"
if [ "$WSS" = 1 ]; then
  # A CA and a certificate for ringlb.test (ECDSA P-256), valid two days.
  command -v openssl >/dev/null || die "the openssl CLI is needed for the wss run (Debian: apt-get install openssl), or set CONFORMANCE_WSS=0"
  PKI="$OUT/pki"
  mkdir -p "$PKI"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=ringlb conformance CA" -keyout "$PKI/ca.key" -out "$PKI/ca.pem" 2>/dev/null \
    || die "openssl: cannot make the CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=ringlb.test" \
    -keyout "$PKI/leaf.key" -out "$PKI/leaf.csr" 2>/dev/null || die "openssl: cannot make the key"
  printf 'subjectAltName=DNS:ringlb.test\nbasicConstraints=CA:FALSE\n' > "$PKI/leaf.ext"
  openssl x509 -req -in "$PKI/leaf.csr" -CA "$PKI/ca.pem" -CAkey "$PKI/ca.key" -CAcreateserial \
    -days 2 -extfile "$PKI/leaf.ext" -out "$PKI/leaf.pem" 2>/dev/null || die "openssl: cannot sign"

  printf '[server]\nlisten = ["127.0.0.1:0"]\nshards = 2\n\n[tls]\nlisten = ["127.0.0.1:0"]\ncertificates = [{ cert = "%s", key = "%s" }]\n\n[[route]]\npath = "/"\nupstream = "echo"\n\n[upstream.echo]\nservers = [{ addr = "%s" }]\n' \
    "$PKI/leaf.pem" "$PKI/leaf.key" "$ECHO_ADDR" > "$OUT/tls-a.toml"
  "$BIN_DIR/ringlb" run --config "$OUT/tls-a.toml" >"$OUT/tls-a.stdout" 2>"$OUT/tls-a.stderr" &
  TLS_A_PID=$!
  wait_for "$OUT/tls-a.stderr" 'listening on 127\.0\.0\.1:[0-9]+ \([0-9]+ shards, TLS\)' "$TLS_A_PID" \
    || { cat "$OUT/tls-a.stderr" >&2; die "ringlb A (TLS) did not start"; }
  TLS_A_ADDR=$(grep -oE 'listening on 127\.0\.0\.1:[0-9]+ \([0-9]+ shards, TLS\)' "$OUT/tls-a.stderr" \
    | head -n1 | sed -E 's/^listening on ([^ ]+) .*/\1/')

  printf '[server]\nlisten = ["127.0.0.1:0"]\nshards = 2\n\n[[route]]\npath = "/"\nupstream = "a"\n\n[upstream.a]\ntls = { server_name = "ringlb.test", ca = "%s" }\nservers = [{ addr = "%s" }]\n' \
    "$PKI/ca.pem" "$TLS_A_ADDR" > "$OUT/tls-b.toml"
  "$BIN_DIR/ringlb" run --config "$OUT/tls-b.toml" >"$OUT/tls-b.stdout" 2>"$OUT/tls-b.stderr" &
  TLS_B_PID=$!
  wait_for "$OUT/tls-b.stderr" 'listening on 127\.0\.0\.1:[0-9]+' "$TLS_B_PID" \
    || { cat "$OUT/tls-b.stderr" >&2; die "ringlb B did not start"; }
  TLS_B_ADDR=$(grep -oE 'listening on 127\.0\.0\.1:[0-9]+' "$OUT/tls-b.stderr" | head -n1 | sed 's/^listening on //')
  log "wss: kosoku -> ringlb B $TLS_B_ADDR (pid $TLS_B_PID) -TLS-> ringlb A $TLS_A_ADDR (pid $TLS_A_PID) -> echo $ECHO_ADDR"
  run_kosoku wss "$TLS_B_ADDR"
  kill -0 "$TLS_A_PID" 2>/dev/null || { tail -n 20 "$OUT/tls-a.stderr" >&2; die "ringlb A died during the wss run"; }
  kill -0 "$TLS_B_PID" 2>/dev/null || { tail -n 20 "$OUT/tls-b.stderr" >&2; die "ringlb B died during the wss run"; }
fi

cleanup
ECHO_PID=""
LB_PID=""
TLS_A_PID=""
TLS_B_PID=""
for f in ringlb tls-a tls-b; do
  if grep -qE 'panick|ERROR' "$OUT/$f.stderr" 2>/dev/null; then
    log "$f logged errors:"
    grep -E 'panick|ERROR' "$OUT/$f.stderr" | head -n 20
  fi
done

rc=0
details=()
if [ "${COMPARE_DETAILS:-1}" = 1 ]; then details=(--details); fi
python3 "$HERE/compare.py" --names direct,ringlb --expect "$OUT/expected-cases.txt" \
  "${details[@]}" "$OUT/direct" "$OUT/ringlb" || rc=$?
if [ "$WSS" = 1 ]; then
  python3 "$HERE/compare.py" --names direct,wss --expect "$OUT/expected-cases.txt" \
    "${details[@]}" "$OUT/direct" "$OUT/wss" || rc=$?
fi
log "wall time $(( $(date +%s) - START )) s; reports in $OUT"
exit "$rc"
