#!/usr/bin/env bash
# Builds the SPA example's app image in the seed's two steps (its build
# script built the nginx base image, then the app image FROM it): first the
# ringlb image from the repository's Dockerfile, then examples/spa/Dockerfile
# FROM that image. image_build.ps1 is the same for PowerShell.
#
#   examples/spa/image_build.sh [--engine docker|podman] [--base-tag TAG]
#                               [--tag TAG] [--skip-base] [-- BUILD-FLAGS...]
#
#   --engine     docker or podman (default: docker if installed, else podman)
#   --base-tag   the ringlb image (default ringlb:latest)
#   --tag        the app image (default app-front:latest)
#   --skip-base  build on an existing --base-tag image instead of building it
#                (packaging/container-check.sh builds its own)
#   -- FLAGS     passed to both builds, e.g. --pull=never
#
# Then run it (Docker's and podman's default seccomp profiles block io_uring;
# the repository's profile allows it):
#   docker run --rm --security-opt seccomp=config/docker-seccomp.json -p 8080:8080 app-front
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"

usage() { sed -n "7,15p" "$0" | sed "s/^# \{0,1\}//" >&2; exit "${1:-2}"; }

ENGINE=""
BASE_TAG="ringlb:latest"
TAG="app-front:latest"
SKIP_BASE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE="${2:?--engine needs a value}"; shift 2 ;;
    --base-tag) BASE_TAG="${2:?--base-tag needs a value}"; shift 2 ;;
    --tag) TAG="${2:?--tag needs a value}"; shift 2 ;;
    --skip-base) SKIP_BASE=1; shift ;;
    --) shift; break ;;
    -h|--help) usage 0 ;;
    *) echo "image_build.sh: unknown argument $1" >&2; usage ;;
  esac
done
EXTRA=("$@")

if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else echo "image_build.sh: neither docker nor podman is installed" >&2; exit 1
  fi
fi
case "$ENGINE" in
  # podman's default OCI image format has no HEALTHCHECK: the app image
  # would lose the base image's.
  podman) FORMAT=(--format docker) ;;
  docker) FORMAT=() ;;
  *) echo "image_build.sh: --engine must be docker or podman" >&2; exit 2 ;;
esac

if [ "$SKIP_BASE" = 0 ]; then
  echo "== $ENGINE build -t $BASE_TAG $REPO"
  "$ENGINE" build "${FORMAT[@]}" "${EXTRA[@]}" -t "$BASE_TAG" "$REPO"
fi
echo "== $ENGINE build -t $TAG $HERE (FROM $BASE_TAG)"
"$ENGINE" build "${FORMAT[@]}" "${EXTRA[@]}" --build-arg "RINGLB_IMAGE=$BASE_TAG" \
  -t "$TAG" "$HERE"
echo "built $TAG; run it with:"
echo "  $ENGINE run --rm --security-opt seccomp=$REPO/config/docker-seccomp.json -p 8080:8080 $TAG"
