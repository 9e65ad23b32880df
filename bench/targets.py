"""Benchmark targets: what sits between the load tool and the echo backends."""

from __future__ import annotations

import os
import re
import shutil

from procutil import Child, StartError, free_port, wait_tcp

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_DIR = os.path.join(HERE, "configs")

# Extra nginx directives for the "nginx-tuned" target (bulk transfers).
NGINX_TUNED_EXTRA = """\
            # nginx-tuned: bigger buffers for 1 MiB messages.
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;"""

TARGETS = {
    # name: (kind, template file or None, extra template vars)
    "direct": ("direct", None, {}),
    "ringlb": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": ""}),
    # ringlb with splice off: every byte through provided buffers (A/B of
    # the zero-copy path for big frames).
    "ringlb-buffers": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": "splice_min = 0"}),
    # ringlb that never parks silent sessions (A/B of park_idle_after).
    "ringlb-noparking": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": "park_idle_after = \"off\""}),
    # Another build of ringlb (run.py --base-bin), same config: a same-run,
    # interleaved A/B of old against new code.
    "ringlb-base": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": "", "binary": "ringlb-base"}),
    # ringlb without TCP_USER_TIMEOUT (A/B of server.tcp_user_timeout).
    "ringlb-nouto": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": "tcp_user_timeout = \"off\""}),
    # ringlb with its shards under the kernel's default policy (A/B of
    # server.scheduling = "batch", the default).
    "ringlb-normal": ("ringlb", "ringlb.toml.tmpl", {"ringlb_extra": "scheduling = \"normal\""}),
    "nginx": ("nginx", "nginx.conf.tmpl", {"nginx_extra": ""}),
    "nginx-tuned": ("nginx", "nginx.conf.tmpl", {"nginx_extra": NGINX_TUNED_EXTRA}),
    # nginx started under `chrt -b 0` (its workers inherit SCHED_BATCH): what
    # ringlb's default scheduling policy would give nginx, for an honest
    # reading of ringlb's ratios.
    "nginx-batch": ("nginx", "nginx.conf.tmpl", {"nginx_extra": "", "sched": "batch"}),
    "haproxy": ("haproxy", "haproxy.cfg.tmpl", {}),
    # TLS termination (issue #15): each proxy with TLS on its listener, the
    # same ECDSA P-256 test certificate (made per run by tlscerts.py), TLS 1.3
    # and TLS_AES_128_GCM_SHA256 only; backends stay plaintext. The load tool
    # connects with --tls and offers only that suite.
    "ringlb-tls": ("ringlb", "ringlb-tls.toml.tmpl", {"ringlb_extra": "", "tls": True}),
    # The --base-bin build with ringlb-tls's configuration: a same-run A/B
    # of old against new code on the TLS path.
    "ringlb-tls-base": ("ringlb", "ringlb-tls.toml.tmpl",
                        {"ringlb_extra": "", "tls": True, "binary": "ringlb-base"}),
    # ringlb-tls with the kernel's default scheduling policy (A/B of
    # server.scheduling).
    "ringlb-tls-normal": ("ringlb", "ringlb-tls.toml.tmpl",
                          {"ringlb_extra": "scheduling = \"normal\"", "tls": True}),
    "nginx-tls": ("nginx", "nginx-tls.conf.tmpl", {"nginx_extra": "", "tls": True}),
    "nginx-tls-batch": ("nginx", "nginx-tls.conf.tmpl",
                        {"nginx_extra": "", "tls": True, "sched": "batch"}),
    "haproxy-tls": ("haproxy", "haproxy-tls.cfg.tmpl", {"tls": True}),
}

# TLS-only scenarios: handshakes that resume a session (tickets).
TLS_SCENARIOS = ("handshake_resumed",)
# What every TLS target must negotiate with the load tool, as ringlb-load
# reports it (version, cipher suite, key exchange group).
TLS_EXPECTED = "TLSv1_3 TLS13_AES_128_GCM_SHA256 X25519"
TLS_LOAD_FLAGS = ["--tls-version", "1.3", "--tls-cipher", "TLS13_AES_128_GCM_SHA256"]


def is_tls(target: str) -> bool:
    return bool(TARGETS.get(target, (None, None, {}))[2].get("tls"))

# Static-file scenarios: the targets that serve files, with their templates.
# direct and HAProxy do not serve files: n/a there. nginx-tuned differs from
# nginx by caching open file descriptors and stat() results, which matters
# for small files (nginx's default, and the plain nginx target, has no cache).
STATIC_SCENARIOS = ("static_small", "static_large")
STATIC_TARGETS = {
    "ringlb": ("ringlb", "ringlb-static.toml.tmpl", {}),
    "nginx": ("nginx", "nginx-static.conf.tmpl", {"open_file_cache": "open_file_cache off;"}),
    "nginx-tuned": ("nginx", "nginx-static.conf.tmpl", {
        "open_file_cache": "# nginx-tuned: cache open fds and stat() results.\n"
                           "    open_file_cache max=1000 inactive=60s;\n"
                           "    open_file_cache_valid 60s;"}),
}


def applies(scenario: str, target: str) -> bool:
    """Whether `target` is measured in `scenario` (static scenarios: file
    servers only; TLS-only scenarios: TLS targets only)."""
    if scenario in TLS_SCENARIOS:
        return is_tls(target)
    return scenario not in STATIC_SCENARIOS or target in STATIC_TARGETS


# Program each target kind needs on PATH (ringlb comes from the build).
TOOL_FOR_KIND = {"nginx": "nginx", "haproxy": "haproxy"}

# HAProxy: 2 fds per connection must fit under the 20000 RLIMIT_NOFILE hard limit.
HAPROXY_MAXCONN = 9900


def render(template_name: str, values: dict) -> str:
    with open(os.path.join(CONFIG_DIR, template_name)) as f:
        text = f.read()

    def sub(m):
        key = m.group(1)
        if key not in values:
            raise KeyError(f"{template_name}: no value for {{{{{key}}}}}")
        return str(values[key])

    return re.sub(r"\{\{(\w+)\}\}", sub, text)


def tls_values(tls: dict) -> dict:
    """Template values of a TLS target (certificate paths; ringlb's
    plaintext listener, which [server] requires and the load never uses)."""
    return {"tls_cert": tls["cert"], "tls_key": tls["key"], "tls_haproxy_pem": tls["haproxy"],
            "plain_port": free_port()}


def ringlb_tls_support(exe: str, tls: dict, workdir: str) -> str | None:
    """None if `exe` accepts ringlb-tls's configuration (`ringlb check`),
    else why not, in one line for the log and the report."""
    import subprocess
    values = {"port": free_port(), "workers": 1, "prefix": workdir, "haproxy_maxconn": HAPROXY_MAXCONN,
              "backend1": 1, "backend2": 2}
    values.update(tls_values(tls))
    values.update(TARGETS["ringlb-tls"][2])
    path = os.path.join(workdir, "ringlb-tls-probe.toml")
    with open(path, "w") as f:
        f.write(render(TARGETS["ringlb-tls"][1], values))
    try:
        r = subprocess.run([exe, "check", "--config", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{exe} check` could not run: {e}"
    if r.returncode == 0:
        return None
    out = " ".join((r.stdout + r.stderr).split())
    if "unknown field `tls`" in out:
        return (f"{exe} has no TLS support (its config rejects the [tls] section); build ringlb "
                f"with TLS (issue #15) and run again")
    return f"{exe} rejects the ringlb-tls configuration: {out[:400]}"


def find_program(name: str) -> str | None:
    p = shutil.which(name)
    if p:
        return p
    for d in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        c = os.path.join(d, name)
        if os.access(c, os.X_OK):
            return c
    return None


class Running:
    """A started target. `child` is None for the direct target."""

    def __init__(self, name, port, child=None, config_path=None):
        self.name = name
        self.port = port
        self.child = child
        self.config_path = config_path

    def stop(self):
        if self.child is not None:
            self.child.stop()


def start_target(name: str, backend_ports: list[int], workdir: str, logdir: str,
                 tag: str, bins: dict, workers: int, cpus: str | None,
                 configs_out: str, ready_timeout: float = 10.0,
                 static_root: str | None = None, tls: dict | None = None) -> Running:
    """Start target `name` in front of the backends (or, with `static_root`,
    serving that directory); return once it accepts TCP. TLS targets need
    `tls`, the certificate paths from tlscerts.make()."""
    if static_root is not None:
        if name not in STATIC_TARGETS:
            raise StartError(f"{name} does not serve static files")
        kind, template, extra = STATIC_TARGETS[name]
    else:
        kind, template, extra = TARGETS[name]
    if kind == "direct":
        return Running(name, backend_ports[0])

    port = free_port()
    prefix = os.path.join(workdir, f"{tag}-{name}")
    os.makedirs(prefix, exist_ok=True)
    values = {"port": port, "workers": workers, "prefix": prefix,
              "haproxy_maxconn": HAPROXY_MAXCONN}
    if static_root is not None:
        values["docroot"] = static_root
    else:
        values.update({"backend1": backend_ports[0], "backend2": backend_ports[1]})
    if extra.get("tls"):
        if not tls:
            raise StartError(f"{name} is a TLS target but no certificates were made")
        values.update(tls_values(tls))
    values.update(extra)
    text = render(template, values)
    ext = {"nginx": "conf", "haproxy": "cfg", "ringlb": "toml"}[kind]
    stem = f"{name}-static" if static_root is not None else name
    config_path = os.path.join(prefix, f"{stem}.{ext}")
    with open(config_path, "w") as f:
        f.write(text)
    # Keep one rendered copy per target in the results (ports differ per run).
    with open(os.path.join(configs_out, f"{stem}.{ext}"), "w") as f:
        f.write(text)

    env = dict(os.environ)
    if kind == "nginx":
        exe = bins.get("nginx")
        if not exe:
            raise StartError("nginx not found on PATH (apt-get install -y nginx)")
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(prefix, sub), exist_ok=True)
        cmd = [exe, "-p", prefix + "/", "-c", config_path,
               "-e", os.path.join(prefix, "error.log"), "-g", "daemon off;"]
    elif kind == "haproxy":
        exe = bins.get("haproxy")
        if not exe:
            raise StartError("haproxy not found on PATH (apt-get install -y haproxy)")
        cmd = [exe, "-db", "-f", config_path]
    elif kind == "ringlb":
        exe = bins.get(extra.get("binary", "ringlb"))
        if not exe:
            raise StartError("ringlb binary not found (cargo build --release --workspace)")
        cmd = [exe, "run", "--config", config_path]
        env.setdefault("RUST_LOG", "warn")
    else:  # pragma: no cover
        raise StartError(f"unknown target kind {kind}")

    if extra.get("sched") == "batch":
        cmd = ["chrt", "-b", "0"] + cmd
    child = Child(name, cmd, os.path.join(logdir, f"{tag}-{name}.log"), env=env, cpus=cpus)
    try:
        wait_tcp(port, ready_timeout, child)
    except StartError as e:
        tail = child.log_tail()
        if kind == "nginx":
            try:
                with open(os.path.join(prefix, "error.log")) as f:
                    tail += f.read()[-1500:]
            except OSError:
                pass
        child.stop()
        raise StartError(f"{name} did not become ready: {e}; log: {tail.strip()[-1500:]}")
    return Running(name, port, child, config_path)
