# ringlb in a container: a Rust build stage, then a slim Debian runtime that
# runs ringlb as the non-root user "ringlb".
#
#   docker build -t ringlb .
#   docker run --rm --security-opt seccomp=config/docker-seccomp.json -p 8080:8080 ringlb
#
# Docker's default seccomp profile (Docker 25+) blocks io_uring; the profile
# in config/docker-seccomp.json is that default plus the three io_uring
# syscalls. The image serves the SPA example (examples/spa/dist) with
# config/docker.toml; mount your own configuration and files over
# /etc/ringlb/ringlb.toml and /srv/app. README.md, "Docker", has the rest.

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what the build reads: the workspace manifests, the lock file and the
# sources of both members (cargo loads every member's manifest).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY loadtest ./loadtest
# The same command .ci/run runs (tests/packaging.rs checks that it does).
RUN cargo build --release --locked -p ringlb

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin ringlb
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
ENTRYPOINT ["/usr/local/bin/ringlb"]
CMD ["run", "--config", "/etc/ringlb/ringlb.toml"]
