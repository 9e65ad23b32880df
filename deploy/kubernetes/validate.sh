#!/usr/bin/env bash
# Validates deploy/kubernetes/ without a cluster (.ci/run runs it):
#   1. configmap.yaml embeds ringlb.toml verbatim;
#   2. every manifest here passes kubernetes-validate (PyPI; it bundles the
#      Kubernetes JSON schemas, so it needs no network once installed) in
#      strict mode: unknown fields are errors;
#   3. the ConfigMap's ringlb.toml passes `ringlb check` (with a stand-in
#      admin.token next to it, as the pod's projected volume has).
#
#   bash deploy/kubernetes/validate.sh                    # check
#   bash deploy/kubernetes/validate.sh --write-configmap  # rewrite configmap.yaml from ringlb.toml, then check
#
# Environment:
#   KUBERNETES_VALIDATE_VENV  where to install the validator (default
#                             /tmp/ringlb-kubernetes-validate-$VERSION; reused)
#   RINGLB                    the ringlb binary (default target/release/ringlb,
#                             built with cargo when missing)
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=deploy/kubernetes

# The validator and the Kubernetes version it checks against, pinned.
KV_VERSION=1.37.0
K8S_VERSION=1.37
VENV="${KUBERNETES_VALIDATE_VENV:-/tmp/ringlb-kubernetes-validate-$KV_VERSION}"

T0=$SECONDS
ok() { printf 'ok   %s [%ss]\n' "$*" $((SECONDS - T0)); }
fail() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

if ! "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -qF "$KV_VERSION"; then
  command -v python3 >/dev/null || fail "python3 is needed"
  python3 -m venv "$VENV" || fail "python3 -m venv $VENV (apt-get install python3-venv)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
  ok "installed kubernetes-validate $KV_VERSION from PyPI into $VENV"
fi
PY="$VENV/bin/python"  # has PyYAML (a dependency of kubernetes-validate)

# ---- 1. configmap.yaml embeds ringlb.toml ----
if [ "${1:-}" = "--write-configmap" ]; then
  "$PY" - "$DIR" <<'PY'
import sys, pathlib
d = pathlib.Path(sys.argv[1])
cm = (d / "configmap.yaml").read_text()
head = cm[: cm.index("  ringlb.toml: |\n") + len("  ringlb.toml: |\n")]
body = "".join(("    " + l) if l.strip() else "\n"
               for l in (d / "ringlb.toml").read_text().splitlines(keepends=True))
(d / "configmap.yaml").write_text(head + body)
PY
fi
WORK="$(mktemp -d /tmp/ringlb-k8s-validate.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$DIR" "$WORK/ringlb.toml" <<'PY'
import sys, pathlib, yaml
d = pathlib.Path(sys.argv[1])
cm = yaml.safe_load((d / "configmap.yaml").read_text())
embedded = cm["data"]["ringlb.toml"]
if embedded != (d / "ringlb.toml").read_text():
    sys.exit("configmap.yaml's ringlb.toml differs from deploy/kubernetes/ringlb.toml "
             "(bash deploy/kubernetes/validate.sh --write-configmap rewrites it)")
pathlib.Path(sys.argv[2]).write_text(embedded)
PY
ok "configmap.yaml embeds ringlb.toml verbatim"

# ---- 2. the manifests against the Kubernetes schemas ----
manifests=("$DIR"/*.yaml)
if ! out="$("$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "${manifests[@]}" 2>&1)"; then
  printf '%s\n' "$out" >&2
  fail "kubernetes-validate --strict"
fi
n="$(grep -c ' passed for resource ' <<<"$out" || true)"
[ "$n" -ge "${#manifests[@]}" ] || { printf '%s\n' "$out" >&2; fail "expected ${#manifests[@]} resources to pass, $n did"; }
ok "kubernetes-validate $KV_VERSION --strict, Kubernetes $K8S_VERSION: $n resources in ${#manifests[@]} files"

# ---- 3. ringlb check on the ConfigMap's config ----
RINGLB="${RINGLB:-target/release/ringlb}"
if [ ! -x "$RINGLB" ]; then
  cargo build --release --locked -p ringlb
fi
# The pod's /etc/ringlb has admin.token from the Secret next to ringlb.toml.
printf 'stand-in-token-for-ringlb-check\n' >"$WORK/admin.token"
"$RINGLB" check --config "$WORK/ringlb.toml" >"$WORK/check.out" 2>&1 || { cat "$WORK/check.out" >&2; fail "ringlb check on configmap.yaml's ringlb.toml"; }
ok "ringlb check on configmap.yaml's ringlb.toml: $(tail -n 1 "$WORK/check.out")"
