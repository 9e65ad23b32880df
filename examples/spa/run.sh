#!/usr/bin/env bash
# Runs the SPA example on loopback: the API (examples/spa/api.py on :8000), a
# WebSocket echo backend (ringlb-load echo on :9001) and ringlb with
# config/spa.toml in front of both (:8080, admin :9090). Stops all three, by
# PID, on Ctrl-C or when any of them exits.
#
#   cargo build --release -p ringlb -p ringlb-load
#   examples/spa/run.sh
#
# BIN_DIR: where ringlb and ringlb-load are (default: target/release).
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN_DIR="${BIN_DIR:-target/release}"
for b in ringlb ringlb-load; do
  if [ ! -x "$BIN_DIR/$b" ]; then
    echo "run.sh: no $BIN_DIR/$b; build with: cargo build --release -p ringlb -p ringlb-load (or set BIN_DIR)" >&2
    exit 1
  fi
done

LOGS="$(mktemp -d)"
PIDS=()
# SIGTERM makes ringlb drain: it waits for open sessions (a browser's
# WebSocket, say). A second SIGTERM after 3 s ends it at once.
cleanup() {
  local p i alive
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
  done
  for i in $(seq 30); do
    alive=0
    for p in "${PIDS[@]}"; do
      if kill -0 "$p" 2>/dev/null; then alive=1; fi
    done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  echo "run.sh: stopped; logs in $LOGS" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_for NAME PID FILE TEXT: until FILE contains TEXT (at most 10 s); fails
# with the log if the process exits first.
wait_for() {
  local i
  for i in $(seq 100); do
    if grep -q "$4" "$3" 2>/dev/null; then
      return 0
    fi
    if ! kill -0 "$2" 2>/dev/null; then
      echo "run.sh: $1 exited; its output:" >&2
      cat "$LOGS"/"$1".* >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "run.sh: $1 not ready after 10 s; output in $LOGS" >&2
  exit 1
}

python3 examples/spa/api.py 8000 >"$LOGS/api.out" 2>"$LOGS/api.log" &
PIDS+=($!)
wait_for api $! "$LOGS/api.out" "listening on"

"$BIN_DIR/ringlb-load" echo --listen 127.0.0.1:9001 >"$LOGS/echo.out" 2>"$LOGS/echo.log" &
PIDS+=($!)
wait_for echo $! "$LOGS/echo.out" "listening "

"$BIN_DIR/ringlb" run --config config/spa.toml 2>"$LOGS/ringlb.log" &
PIDS+=($!)
wait_for ringlb $! "$LOGS/ringlb.log" "admin listening on"

cat <<EOF
ringlb is serving the SPA example (config/spa.toml):
  http://127.0.0.1:8080/              the app (index.html)
  http://127.0.0.1:8080/deep/link     SPA fallback: index.html again
  http://127.0.0.1:8080/api/hello     the API, seen as /hello
  ws://127.0.0.1:8080/capture         WebSocket echo
  http://127.0.0.1:9090/status        admin status (JSON)
Logs: $LOGS (ringlb.log has the access log). Ctrl-C stops everything.
EOF

# Until Ctrl-C or until one of the three exits.
set +e
wait -n "${PIDS[@]}"
exit 1
