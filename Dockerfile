# ringlb in a container: a Rust build stage ("build"), then a slim Debian
# runtime stage ("runtime", the default target) that runs ringlb as the
# non-root user "ringlb".
#
#   docker build -t ringlb .
#   docker run --rm --security-opt seccomp=config/docker-seccomp.json -p 8080:8080 ringlb
#
# packaging/container-check.sh builds this same runtime stage with podman and
# no registry: RUNTIME_BASE names a locally imported Debian root, and the
# named build context "build" (--build-context build=DIR, which replaces the
# stage of that name in podman and in Docker's BuildKit) supplies a ringlb
# binary built on the host at the path the build stage leaves it.
#
# Docker's default seccomp profile (Docker 25+) blocks io_uring; the profile
# in config/docker-seccomp.json is that default plus the three io_uring
# syscalls. The image serves the SPA example (examples/spa/dist) with
# config/docker.toml; mount your own configuration and files over
# /etc/ringlb/ringlb.toml and /srv/app. README.md, "Docker", has the rest.

# The runtime's base image. Any Debian bookworm root works: the binary links
# only glibc and libgcc_s, and the stage needs bash (HEALTHCHECK) and useradd.
ARG RUNTIME_BASE=debian:bookworm-slim

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what the build reads: the workspace manifests, the lock file and the
# sources of both members (cargo loads every member's manifest).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY loadtest ./loadtest
# The same command .ci/run runs (tests/packaging.rs checks that it does).
RUN cargo build --release --locked -p ringlb

FROM ${RUNTIME_BASE} AS runtime
RUN useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ringlb
# packaging/container-check.sh's build context "build" has the host's binary
# at this same path.
COPY --from=build /src/target/release/ringlb /usr/local/bin/ringlb
COPY config/docker.toml /etc/ringlb/ringlb.toml
COPY examples/spa/dist /srv/app
# Fails the build if the shipped configuration does not validate.
RUN ["/usr/local/bin/ringlb", "check", "--config", "/etc/ringlb/ringlb.toml"]
USER ringlb
EXPOSE 8080
# The admin listener (127.0.0.1:9090 inside the container, not published).
# The image has no curl: bash's /dev/tcp sends the request. Host must name
# the admin address (ringlb refuses others: DNS rebinding).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9090 && printf 'GET /status HTTP/1.1\\r\\nHost: 127.0.0.1:9090\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]
# SIGTERM drains (docs/OPERATIONS.md): give `docker stop` a --time (or
# --stop-timeout at run) as long as server.drain_timeout. SIGHUP
# (`docker kill -s HUP`) reloads /etc/ringlb/ringlb.toml.
STOPSIGNAL SIGTERM
# ringlb is PID 1, with no init: it handles TERM, INT and HUP itself (PID 1
# gets no default signal actions) and starts no child processes, so there is
# nothing to reap. `docker run --init` works too but is not needed.
ENTRYPOINT ["/usr/local/bin/ringlb"]
CMD ["run", "--config", "/etc/ringlb/ringlb.toml"]
