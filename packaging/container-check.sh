#!/usr/bin/env bash
# Builds the container image from the Dockerfile's runtime stage and runs it,
# with podman and without a registry or a Docker engine (neither is reachable
# on this project's machines; Debian's packages are). .ci/run runs it.
#
#   bash packaging/container-check.sh
#
# What it does, in order; one line per check, and on the first failure the
# container's log and a non-zero exit:
#   1. builds ringlb and ringlb-load on the host (cargo build --release);
#   2. makes a Debian bookworm root with mmdebstrap --variant=minbase and
#      imports it with podman import (cached: see ROOT_IMAGE below);
#   3. builds the Dockerfile's runtime stage (--target runtime) on that root,
#      with the host's binary standing in for the build stage
#      (--build-context build=DIR), then the SPA example's app image FROM it
#      with examples/spa/image_build.sh;
#   4. runs the image under config/docker-seccomp.json with the API and a
#      WebSocket echo backend on the host, and checks the SPA, /api, a proxied
#      WebSocket, /status, the HEALTHCHECK, and that `podman stop` drains;
#   5. runs it under podman's default seccomp profile and checks that ringlb
#      refuses to start, naming the seccomp filter.
#
# Needs root (rootful podman, ip netns). Installs podman, runc and mmdebstrap
# with apt-get when they are missing.
#
# Environment:
#   CONTAINER_CHECK_MIRROR  Debian mirror for mmdebstrap
#                           (default http://deb.debian.org/debian)
#   CONTAINER_CHECK_KEEP=1  keep the built images (localhost/ringlb-container-check:*)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

T0=$SECONDS
say() { printf '%s\n' "$*"; }
# Seconds since the start, for the timing lines.
elapsed() { printf '%ss' $((SECONDS - T0)); }

if [ "$(id -u)" != 0 ]; then
  say "container-check: needs root (rootful podman and a network namespace)" >&2
  exit 1
fi

# ---- packages ----
# The minimal set that works here: podman brings conmon and the containers
# configuration; runc satisfies its "crun | runc" dependency, so crun is not
# installed (and runc is the runtime these machines were tried with);
# mmdebstrap makes the root. Rootful podman uses native overlayfs, so
# neither uidmap nor fuse-overlayfs is needed, and `podman build` has
# buildah built in, so the buildah package is not needed either.
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)
command -v python3 >/dev/null || need+=(python3)
if [ "${#need[@]}" -gt 0 ]; then
  say "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# runc: see above. cgroupfs: systemd is not PID 1 here, so podman's systemd
# cgroup manager has nobody to talk to.
PM=(podman --runtime runc --cgroup-manager cgroupfs)
pm() { "${PM[@]}" "$@"; }

# ---- per-run names and cleanup ----
RUN_ID="$$"
NAME="ringlb-cc-$RUN_ID"
NETNS="ringlb-cc-$RUN_ID"
IMAGE="localhost/ringlb-container-check:ringlb-$RUN_ID"
APP_IMAGE="localhost/ringlb-container-check:app-$RUN_ID"
WORK="$(mktemp -d /tmp/ringlb-container-check.XXXXXX)"
PIDS=()
CONTAINERS=()

cleanup() {
  local c p
  for c in "${CONTAINERS[@]}"; do
    pm rm -f -t 0 "$c" >/dev/null 2>&1 || true
  done
  for p in "${PIDS[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  ip netns delete "$NETNS" 2>/dev/null || true
  if [ "${CONTAINER_CHECK_KEEP:-0}" != 1 ]; then
    pm rmi -f "$APP_IMAGE" "$IMAGE" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ok() { say "ok    $*"; }
# fail WHAT [CONTAINER]: the failed check, the container's log, exit 1.
fail() {
  say "FAIL  $1" >&2
  if [ -n "${2:-}" ]; then
    say "---- podman logs $2" >&2
    pm logs "$2" >&2 2>&1 || true
    say "----" >&2
  fi
  exit 1
}

# ---- 1. binaries ----
say "== building ringlb and ringlb-load on the host"
# The same two builds as .ci/run, so that in CI both are already done. The
# second is the Dockerfile's build command and runs last: target/release/
# ringlb is then the binary that command makes (built together with
# ringlb-load, shared dependencies get other features and another binary).
cargo build --release --locked -p ringlb -p ringlb-load
cargo build --release --locked -p ringlb
BIN="$REPO/target/release"
say "== built [$(elapsed)]"

# ---- 2. the Debian root ----
# One imported root per day: mmdebstrap takes 10-20 s here (longer from a
# cold mirror) and the root changes only with Debian's updates, so a root
# made today is reused by every run today (podman's image store persists on
# the machine; CI's fresh clone does not matter). Older days' roots are
# removed.
MIRROR="${CONTAINER_CHECK_MIRROR:-http://deb.debian.org/debian}"
ROOT_REPO="localhost/ringlb-container-check-root"
ROOT_IMAGE="$ROOT_REPO:bookworm-minbase-$(date -u +%Y%m%d)"
if pm image exists "$ROOT_IMAGE"; then
  ok "root: $ROOT_IMAGE (cached today) [$(elapsed)]"
else
  say "== mmdebstrap --variant=minbase bookworm"
  # Point release, updates and security, like debian:bookworm-slim.
  mmdebstrap --variant=minbase --quiet bookworm "$WORK/root.tar" \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb ${MIRROR%/debian}/debian-security bookworm-security main"
  pm import --quiet "$WORK/root.tar" "$ROOT_IMAGE" >/dev/null
  rm -f "$WORK/root.tar"
  ok "root: $ROOT_IMAGE made with mmdebstrap and podman import [$(elapsed)]"
fi
pm images --format '{{.Repository}}:{{.Tag}}' "$ROOT_REPO" | while read -r old; do
  [ "$old" = "$ROOT_IMAGE" ] || pm rmi -f "$old" >/dev/null 2>&1 || true
done

# ---- 3. the images ----
# The build stage's output, at the path the build stage leaves it
# (WORKDIR /src, target/release/ringlb): the runtime stage's
# `COPY --from=build` then takes the host's binary and the build stage
# itself is skipped. Everything else comes from the Dockerfile unchanged.
mkdir -p "$WORK/build-stage/src/target/release"
cp "$BIN/ringlb" "$WORK/build-stage/src/target/release/ringlb"
# --format docker: the OCI image format has no HEALTHCHECK. --pull=never:
# no registry is reachable; the base is the imported root.
if ! pm build --quiet --format docker --isolation=chroot --pull=never \
  -f Dockerfile --target runtime \
  --build-arg "RUNTIME_BASE=$ROOT_IMAGE" \
  --build-context "build=$WORK/build-stage" \
  -t "$IMAGE" . >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log" >&2
  fail "image: podman build --target runtime"
fi
ok "image: Dockerfile --target runtime on $ROOT_IMAGE, host binary as the build stage [$(elapsed)]"

inspect() { pm image inspect --format "$2" "$1"; }
[ "$(inspect "$IMAGE" '{{.Config.User}}')" = ringlb ] || fail "image: USER is not ringlb"
HEALTH_JSON="$(inspect "$IMAGE" '{{json .Config.Healthcheck.Test}}')"
case "$HEALTH_JSON" in
  '["CMD",'*) ;;
  *) fail "image: no HEALTHCHECK CMD (got $HEALTH_JSON)" ;;
esac

# The seed built its app image FROM its nginx base; the SPA example's
# counterpart builds FROM this image. Its own base build is skipped: that
# is the one above.
if ! examples/spa/image_build.sh --engine podman --skip-base \
  --base-tag "$IMAGE" --tag "$APP_IMAGE" -- --quiet --isolation=chroot --pull=never \
  >"$WORK/app-build.log" 2>&1; then
  cat "$WORK/app-build.log" >&2
  fail "app image: examples/spa/image_build.sh"
fi
for f in '{{json .Config.Healthcheck.Test}}' '{{.Config.User}}' '{{json .Config.Entrypoint}}' '{{json .Config.Cmd}}'; do
  [ "$(inspect "$APP_IMAGE" "$f")" = "$(inspect "$IMAGE" "$f")" ] \
    || fail "app image: $f differs from the ringlb image's"
done
ok "app image: examples/spa/image_build.sh built FROM it; keeps its user, HEALTHCHECK, entrypoint [$(elapsed)]"

# ---- 4. running it ----
# The image's own configuration (config/docker.toml) names fixed ports: the
# public listener, the admin listener its HEALTHCHECK asks, the API and the
# WebSocket backend on 127.0.0.1. On a machine shared with other test runs
# those ports may be taken, and a HEALTHCHECK could even get its 200 from
# someone else's ringlb. So the container gets a network namespace of its
# own, created for this run (`--network ns:`, host networking in every other
# respect: no NAT, no bridge), and the host-side backends and clients join
# it with `ip netns exec`. Nothing is rewritten: the image runs as shipped.
read -r LISTEN_PORT ADMIN API_ADDR CAPTURE_ADDR < <(python3 - config/docker.toml <<'EOF'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
ups = {n: u["servers"][0]["addr"] for n, u in c["upstream"].items()}
print(c["server"]["listen"][0].rsplit(":", 1)[1], c["admin"]["listen"], ups["api"], ups["capture"])
EOF
)
ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
# An array, not a function: `ip netns exec` execs the command, so $! of a
# backgrounded "${INNS[@]}" CMD is CMD's own PID (a function would run in a
# subshell whose PID cleanup would kill, leaving CMD running).
INNS=(ip netns exec "$NETNS")
inns() { "${INNS[@]}" "$@"; }

# wait_for_line FILE TEXT PID WHAT: until FILE has TEXT (10 s at most).
wait_for_line() {
  local i
  for i in $(seq 100); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    kill -0 "$3" 2>/dev/null || { cat "$1" >&2; fail "$4 exited"; }
    sleep 0.1
  done
  cat "$1" >&2
  fail "$4 not ready after 10 s"
}
"${INNS[@]}" python3 examples/spa/api.py "${API_ADDR##*:}" "${API_ADDR%:*}" >"$WORK/api.log" 2>&1 &
PIDS+=($!)
wait_for_line "$WORK/api.log" "listening on" $! "API backend (examples/spa/api.py)"
"${INNS[@]}" "$BIN/ringlb-load" echo --listen "$CAPTURE_ADDR" >"$WORK/echo.log" 2>&1 &
PIDS+=($!)
wait_for_line "$WORK/echo.log" "listening " $! "WebSocket echo backend (ringlb-load echo)"

# --ulimit: rootful podman asks runc for RLIMIT_NOFILE 1048576 and
# RLIMIT_NPROC 4194304, above this machine's hard limits (20000 and ~96000),
# and runc then fails with "error setting rlimit ...: operation not
# permitted"; 16384 leaves ringlb 8000 sessions. --health-interval disable:
# podman schedules health checks with systemd timers, and there is no systemd
# here; `podman healthcheck run` below runs the check itself.
RUN_FLAGS=(--network "ns:/run/netns/$NETNS"
  --ulimit nofile=16384:16384 --ulimit nproc=4096:4096
  --health-interval disable)
CONTAINERS+=("$NAME")
pm run -d --name "$NAME" "${RUN_FLAGS[@]}" \
  --security-opt seccomp=config/docker-seccomp.json "$IMAGE" >"$WORK/run.log" 2>&1 \
  || { cat "$WORK/run.log" >&2; fail "start: podman run"; }
for i in $(seq 100); do
  # Into a file, then grep: under pipefail, `pm logs | grep -q` fails
  # whenever grep stops reading before podman is done writing (SIGPIPE).
  pm logs "$NAME" >"$WORK/start-logs.txt" 2>&1 || true
  grep -q "admin listening on" "$WORK/start-logs.txt" && break
  [ "$(pm inspect --format '{{.State.Running}}' "$NAME")" = true ] \
    || fail "start: ringlb exited under config/docker-seccomp.json" "$NAME"
  [ "$i" = 100 ] && fail "start: no 'admin listening on' after 10 s" "$NAME"
  sleep 0.1
done
[ "$(pm exec "$NAME" grep '^Seccomp:' /proc/1/status | tr -d '[:space:]')" = Seccomp:2 ] \
  || fail "start: no seccomp filter on ringlb in the container" "$NAME"
# The profile must also let the shards set SCHED_BATCH; where it does not,
# ringlb says "batch refused" instead of this line.
grep -q 'shard scheduling: batch' "$WORK/start-logs.txt" \
  || fail "start: shards not under SCHED_BATCH with config/docker-seccomp.json" "$NAME"
ok "start: ringlb runs under config/docker-seccomp.json (Seccomp: 2, $(pm logs "$NAME" 2>&1 | grep -o 'listening on [^ ]* ([0-9]* shards)'), shard scheduling: batch) [$(elapsed)]"

URL="http://127.0.0.1:$LISTEN_PORT"
# get PATH [curl args]: the body, failing on a non-2xx status.
get() { local p="$1"; shift; inns curl -sS --fail --max-time 5 "$@" "$URL$p"; }
INDEX="$(cat examples/spa/dist/index.html)"
[ "$(get /)" = "$INDEX" ] || fail "spa: GET / is not examples/spa/dist/index.html" "$NAME"
[ "$(get /deep/link)" = "$INDEX" ] || fail "spa: GET /deep/link is not the index.html fallback" "$NAME"
JSS=(examples/spa/dist/assets/*.js)
JS="${JSS[0]#examples/spa/dist/}"
get "/$JS" -H 'Accept-Encoding: gzip' -D "$WORK/js.h" -o "$WORK/js.gz" \
  || fail "spa: GET /$JS" "$NAME"
grep -qi '^content-encoding: gzip' "$WORK/js.h" || fail "spa: /$JS not sent gzipped" "$NAME"
gzip -dc "$WORK/js.gz" | cmp -s - "examples/spa/dist/$JS" \
  || fail "spa: /$JS does not decompress to the file" "$NAME"
code="$(inns curl -s -o /dev/null -w '%{http_code}' "$URL/assets/missing.js")"
[ "$code" = 404 ] || fail "spa: /assets/missing.js answered $code, not 404" "$NAME"
ok "spa: / and /deep/link are index.html, /$JS gzipped, a missing asset 404 [$(elapsed)]"

api="$(get /api/hello?x=1)" || fail "api: GET /api/hello" "$NAME"
python3 -c 'import json,sys; d=json.loads(sys.argv[1]); assert d["path"]=="/hello?x=1" and d["headers"]["X-Real-IP"]=="127.0.0.1", d' "$api" \
  || fail "api: the API did not see /hello?x=1 from 127.0.0.1: $api" "$NAME"
ok "api: /api/hello?x=1 reached the API as /hello?x=1 with X-Real-IP [$(elapsed)]"

WS="ws://127.0.0.1:$LISTEN_PORT/capture"
inns "$BIN/ringlb-load" pingpong --url "$WS" --connections 4 --duration 1s \
  --json "$WORK/ws.json" >"$WORK/ws.log" 2>&1 \
  || { cat "$WORK/ws.log" >&2; fail "websocket: ringlb-load pingpong $WS" "$NAME"; }
read -r opened messages errors < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["connections"]["opened"], d["messages"], d["error_total"])' "$WORK/ws.json")
if ! { [ "$opened" = 4 ] && [ "$messages" -gt 0 ] && [ "$errors" = 0 ]; }; then
  fail "websocket: opened $opened of 4, $messages messages, $errors errors" "$NAME"
fi
ok "websocket: $WS echoed $messages messages on 4 sessions, 0 errors [$(elapsed)]"

ADMIN_URL="http://$ADMIN/status"
status="$(inns curl -sS --fail --max-time 5 "$ADMIN_URL")" || fail "admin: GET $ADMIN_URL" "$NAME"
sessions="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(sum(b["connections_total"] for u in d["upstreams"] if u["name"]=="capture" for b in u["backends"]))' "$status")" \
  || fail "admin: /status is not the expected JSON: $status" "$NAME"
[ "$sessions" -ge 4 ] || fail "admin: /status counts $sessions capture sessions, expected 4" "$NAME"
ok "admin: $ADMIN_URL answers JSON counting the $sessions capture sessions [$(elapsed)]"

pm healthcheck run "$NAME" >"$WORK/hc.log" 2>&1 \
  || { cat "$WORK/hc.log" >&2; fail "healthcheck: podman healthcheck run" "$NAME"; }
# The same command by hand: the HEALTHCHECK's CMD arguments, NUL-separated.
mapfile -d '' HC < <(python3 -c 'import json,sys; a=json.loads(sys.argv[1]); sys.stdout.write("\0".join(a[1:]) + "\0")' "$HEALTH_JSON")
pm exec "$NAME" "${HC[@]}" || fail "healthcheck: podman exec of the HEALTHCHECK command" "$NAME"
ok "healthcheck: podman healthcheck run and podman exec of its command both succeed [$(elapsed)]"

# Drain: two WebSocket sessions held idle across `podman stop`. ringlb must
# keep relaying them (ringlb-load idle checks each still echoes after the
# hold), then exit 0 on its own once they close, before the stop timeout
# (podman would SIGKILL it then: exit 137).
STOP_TIMEOUT=20
"${INNS[@]}" "$BIN/ringlb-load" idle --url "$WS" --connections 2 --hold 3s \
  --json "$WORK/idle.json" >"$WORK/idle.log" 2>&1 &
IDLE=$!
PIDS+=("$IDLE")
for i in $(seq 100); do
  n="$(inns curl -s --max-time 2 "$ADMIN_URL" | python3 -c 'import json,sys; print(json.load(sys.stdin)["connections"])' 2>/dev/null || echo 0)"
  [ "$n" = 2 ] && break
  [ "$i" = 100 ] && fail "stop: the 2 idle sessions never showed in /status (saw $n)" "$NAME"
  sleep 0.1
done
t_stop=$SECONDS
# stderr: podman complains that it cannot remove the systemd timer it never
# made (see --health-interval above).
pm stop -t "$STOP_TIMEOUT" "$NAME" >"$WORK/stop.log" 2>&1 \
  || { cat "$WORK/stop.log" >&2; fail "stop: podman stop" "$NAME"; }
took=$((SECONDS - t_stop))
wait "$IDLE" || { cat "$WORK/idle.log" >&2; fail "stop: the held sessions failed during the drain" "$NAME"; }
code="$(pm inspect --format '{{.State.ExitCode}}' "$NAME")"
[ "$code" = 0 ] || fail "stop: exit code $code after ${took}s (stop timeout ${STOP_TIMEOUT}s)" "$NAME"
pm logs "$NAME" >"$WORK/stop-logs.txt" 2>&1 || fail "stop: podman logs" "$NAME"
grep -q 'draining: listeners closed, 2 sessions continue' "$WORK/stop-logs.txt" \
  || fail "stop: no drain line for the 2 sessions in the log" "$NAME"
grep -q 'drained; exiting' "$WORK/stop-logs.txt" || fail "stop: no 'drained; exiting' in the log" "$NAME"
ok "stop: podman stop drained 2 open sessions (still echoing), exit 0 after ${took}s of ${STOP_TIMEOUT}s [$(elapsed)]"

# ---- 5. podman's default seccomp profile ----
# No --security-opt: podman's default profile (containers-common's
# seccomp.json) does not list the io_uring calls and answers them ENOSYS.
# ringlb must refuse and blame the filter, not the kernel.
PROFILE="$(pm info --format '{{.Host.Security.SECCOMPProfilePath}}')"
CONTAINERS+=("$NAME-default")
pm run -d --name "$NAME-default" "${RUN_FLAGS[@]}" "$IMAGE" >"$WORK/run-default.log" 2>&1 \
  || { cat "$WORK/run-default.log" >&2; fail "default seccomp: podman run"; }
timeout 20 "${PM[@]}" wait "$NAME-default" >/dev/null \
  || fail "default seccomp: ringlb still running after 20 s (it should refuse)" "$NAME-default"
code="$(pm inspect --format '{{.State.ExitCode}}' "$NAME-default")"
[ "$code" != 0 ] || fail "default seccomp: ringlb exited 0" "$NAME-default"
msg="$(pm logs "$NAME-default" 2>&1 | grep -m 1 '^ringlb: ' || true)"
case "$msg" in
  *"blocked by a seccomp filter"*"--security-opt seccomp=config/docker-seccomp.json"*) ;;
  *) fail "default seccomp: the refusal does not name the seccomp filter" "$NAME-default" ;;
esac
ok "default seccomp ($PROFILE): refused to start, exit $code: ${msg%% while checking*} [$(elapsed)]"

say "container-check: all checks passed in $(elapsed)"
