#!/usr/bin/env python3
"""Binary upgrade under load: what live WebSocket sessions see.

    python3 bench/upgrade.py [--sessions 1000,4000,9000] [--targets ringlb,nginx,haproxy]
                             [--grace 10] [--rate-per-session 2] [--out DIR] [--bin-dir DIR]
                             [--tls]

For each target and session count it starts two `ringlb-load echo` backends,
the target in front of them and `ringlb-load rate` with N sessions (each
sending a 64-byte message every 1/rate-per-session s, latency measured from
the intended send time, so a session that stalls shows the stall as
latency). `upgrade_at` seconds in, it upgrades the target the way its
operators do:

- ringlb: `ringlb upgrade --pid PID` (live hand-off); the hand-off time is
  what ringlb reports ("handed N sessions to pid P in X ms");
- nginx: `kill -USR2` on the master (binary upgrade: a new master and
  workers on the same listeners), then `kill -QUIT` on the old master once
  the new one wrote its pid file; `worker_shutdown_timeout` = --grace;
- HAProxy: a new `haproxy -sf OLDPID` (soft stop of the old process once
  the new one listens), `hard-stop-after` = --grace.

With --tls every session is wss://: each target runs its TLS benchmark
configuration (bench/configs/*-tls.*, a certificate made for the run by
tlscerts.py) and the load tool connects with run.py's TLS flags.

It records, per run: sessions cut (connections the load tool saw closed or
failing), the longest stall (the maximum message latency over the run; the
warm-up excluded), how long the old process lingered after the upgrade
started, and ringlb's hand-off time. Raw JSON per run and summary.md go to
bench/results/<date>-upgrade-<host>/.

Standard library only; uses run.py's conventions (procutil, targets) without
changing them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procutil  # noqa: E402
from procutil import Child, StartError, free_port, wait_tcp  # noqa: E402
import tlscerts  # noqa: E402
from targets import HAPROXY_MAXCONN, TLS_LOAD_FLAGS, find_program, render, tls_values  # noqa: E402

REPO = os.path.dirname(HERE)


def log(msg: str) -> None:
    print(f"[upgrade {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def find_bin(name: str, bin_dir: str | None) -> str | None:
    dirs = [bin_dir] if bin_dir else []
    dirs += [os.path.join(REPO, "target", "release"), os.path.join(REPO, "target", "debug")]
    for d in dirs:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def start_backends(bins, logs, tag):
    children, ports = [], []
    for i in (1, 2):
        c = Child(f"echo{i}", [bins["ringlb-load"], "echo", "--listen", "127.0.0.1:0"],
                  os.path.join(logs, f"{tag}-echo{i}.log"), capture_stdout=True)
        children.append(c)
        line = c.read_lines(1, timeout=10.0)[0]
        if not line.startswith("listening "):
            raise StartError(f"echo{i}: unexpected first line {line!r}")
        port = int(line.rsplit(":", 1)[1])
        wait_tcp(port, 10.0, c)
        ports.append(port)
    return children, ports


def start_target(kind, bins, backends, work, logs, configs, tag, workers, grace, tls=None):
    """Render the target's benchmark config (bench/configs; its TLS variant
    with `tls`, the certificates from tlscerts.make), add the upgrade
    settings, start it in the foreground; returns (child, port, prefix)."""
    port = free_port()
    prefix = os.path.join(work, f"{tag}-{kind}")
    os.makedirs(prefix, exist_ok=True)
    values = {"port": port, "workers": workers, "prefix": prefix,
              "haproxy_maxconn": HAPROXY_MAXCONN,
              "backend1": backends[0], "backend2": backends[1]}
    suffix = "-tls" if tls else ""
    if tls:
        values.update(tls_values(tls))
    env = dict(os.environ)
    if kind == "ringlb":
        values["ringlb_extra"] = f'pid_file = "{prefix}/ringlb.pid"\nupgrade_timeout = "10s"'
        text = render(f"ringlb{suffix}.toml.tmpl", values)
        path = os.path.join(prefix, "ringlb.toml")
        cmd = [bins["ringlb"], "run", "--config", path]
        env.setdefault("RUST_LOG", "info")
    elif kind == "nginx":
        values["nginx_extra"] = ""
        text = render(f"nginx{suffix}.conf.tmpl", values)
        # How long old workers may keep sessions after QUIT.
        text = text.replace("worker_rlimit_nofile 20000;",
                            f"worker_rlimit_nofile 20000;\nworker_shutdown_timeout {grace}s;")
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(prefix, sub), exist_ok=True)
        path = os.path.join(prefix, "nginx.conf")
        # Daemonized: nginx ignores USR2 while its master's parent is the
        # process that started it (the check that keeps a new binary from
        # upgrading again), which in the foreground is always true. The
        # daemon leads its own process group; the harness kills that group.
        cmd = [bins["nginx"], "-p", prefix + "/", "-c", path,
               "-e", os.path.join(prefix, "error.log"), "-g", "daemon on;"]
    elif kind == "haproxy":
        text = render(f"haproxy{suffix}.cfg.tmpl", values)
        # How long the old process may keep sessions after the soft stop.
        text = text.replace("global\n", f"global\n    hard-stop-after {grace}s\n", 1)
        path = os.path.join(prefix, "haproxy.cfg")
        cmd = [bins["haproxy"], "-db", "-f", path]
    else:
        raise StartError(f"unknown target {kind}")
    with open(path, "w") as f:
        f.write(text)
    with open(os.path.join(configs, os.path.basename(path)), "w") as f:
        f.write(text)
    child = Child(kind, cmd, os.path.join(logs, f"{tag}-{kind}.log"), env=env)
    main_pid = child.pid
    if kind == "nginx":
        if child.wait(15.0) != 0:
            raise StartError(f"nginx did not start: {child.log_tail()}")
        pidfile = os.path.join(prefix, "nginx.pid")
        t0 = time.monotonic()
        while not os.path.exists(pidfile) and time.monotonic() - t0 < 15:
            time.sleep(0.02)
        with open(pidfile) as f:
            main_pid = int(f.read().strip())
        wait_tcp(port, 15.0)
    else:
        wait_tcp(port, 15.0, child)
    return child, port, prefix, path, main_pid


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return "Z" not in line
    except OSError:
        return False
    return True


def wait_gone(pid: int, child: Child | None, limit: float) -> float | None:
    """Seconds until `pid` is gone (reaping our own child), or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if child is not None and child.proc.poll() is not None:
            return time.monotonic() - t0
        if child is None and not pid_alive(pid):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def upgrade(kind, child, old, bins, prefix, cfg_path, logs, tag, deadline_s):
    """Upgrades the target (its main process `old`); returns what happened."""
    info: dict = {}
    t0 = time.monotonic()
    if kind == "ringlb":
        out = subprocess.run([bins["ringlb"], "upgrade", "--pid", str(old), "--timeout", "60s"],
                             capture_output=True, text=True, timeout=90)
        info["upgrade_stdout"] = out.stdout.strip()
        info["upgrade_stderr"] = out.stderr.strip()[-2000:]
        info["upgrade_ok"] = out.returncode == 0
        m = re.search(r"handed (\d+) sessions to pid (\d+) in (\d+) ms", out.stdout)
        if m:
            info["handed"] = int(m.group(1))
            info["new_pid"] = int(m.group(2))
            info["handoff_ms"] = int(m.group(3))
    elif kind == "nginx":
        pidfile = os.path.join(prefix, "nginx.pid")
        os.kill(old, signal.SIGUSR2)
        # The old master renames its pid file to .oldbin; the new master
        # writes nginx.pid once it runs.
        new = None
        while time.monotonic() - t0 < 15:
            if os.path.exists(pidfile + ".oldbin"):
                try:
                    with open(pidfile) as f:
                        new = int(f.read().strip())
                    break
                except (OSError, ValueError):
                    pass
            time.sleep(0.02)
        info["new_pid"] = new
        info["upgrade_ok"] = new is not None
        if new is not None:
            os.kill(old, signal.SIGQUIT)
    elif kind == "haproxy":
        newc = Child("haproxy-new", [bins["haproxy"], "-db", "-f", cfg_path, "-sf", str(old)],
                     os.path.join(logs, f"{tag}-haproxy-new.log"))
        info["new_pid"] = newc.pid
        info["upgrade_ok"] = True
        info["_new_child"] = newc
    info["upgrade_cmd_s"] = round(time.monotonic() - t0, 3)
    linger = wait_gone(old, None if kind == "nginx" else child, deadline_s)
    info["old_linger_s"] = None if linger is None else round(linger + info["upgrade_cmd_s"], 3)
    return info


def run_one(args, bins, out, kind, n, rep):
    tag = f"{kind}-{n}-r{rep}"
    logs, raw, configs = (os.path.join(out, d) for d in ("logs", "raw", "configs"))
    work = tempfile.mkdtemp(prefix="ringlb-upgrade-")
    started = []
    daemon_group = None
    rec: dict = {"target": kind, "sessions": n, "rep": rep}
    try:
        echoes, ports = start_backends(bins, logs, tag)
        started += echoes
        child, port, prefix, cfg, main_pid = start_target(kind, bins, ports, work, logs, configs,
                                                          tag, args.workers, args.grace, args.tls)
        started.append(child)
        if kind == "nginx":
            daemon_group = main_pid
        warmup = args.warmup
        duration = args.upgrade_at + args.grace + args.tail
        json_path = os.path.join(raw, f"{tag}-load.json")
        scheme = "wss" if args.tls else "ws"
        cmd = [bins["ringlb-load"], "rate", "--url", f"{scheme}://127.0.0.1:{port}/",
               "--connections", str(n), "--rate", str(int(n * args.rate_per_session)),
               "--size", "64", "--duration", f"{duration}s", "--warmup", f"{warmup}s",
               "--procs", str(max(1, n // 5000 + 1)), "--timeout", "10s",
               "--allow-errors", "--json", json_path]
        if args.tls:
            cmd += ["--tls", "--ca", args.tls["ca"], "--sni", args.tls["server_name"]] + TLS_LOAD_FLAGS
        load = Child("load", cmd, os.path.join(logs, f"{tag}-load.log"))
        started.append(load)
        # Opening N sessions takes a while; the upgrade comes upgrade_at
        # seconds into the measured window.
        t_start = time.monotonic()
        time.sleep(warmup + args.upgrade_at)
        if load.proc.poll() is not None:
            raise StartError(f"load exited early: {load.log_tail()}")
        rec["upgrade_at_s"] = round(time.monotonic() - t_start, 3)
        info = upgrade(kind, child, main_pid, bins, prefix, cfg, logs, tag,
                       deadline_s=duration - args.upgrade_at + 5)
        newc = info.pop("_new_child", None)
        if newc is not None:
            started.append(newc)
        rec.update(info)
        if load.wait(duration + warmup + 120) is None:
            raise StartError("load did not finish")
        with open(json_path) as f:
            res = json.load(f)
        errs = res.get("errors", {})
        rec["cut"] = sum(errs.get(k, 0) for k in ("unexpected_close", "io", "timeout", "protocol",
                                                  "mismatched_echo"))
        rec["errors"] = errs
        rec["connections"] = res.get("connections")
        lat = res.get("latency_us") or {}
        rec["max_stall_ms"] = round(lat.get("max", 0) / 1000.0, 1) if lat else None
        rec["p99_ms"] = round(lat.get("p99", 0) / 1000.0, 2) if lat else None
        rec["messages"] = res.get("messages")
        if rec.get("old_linger_s") is None:
            rec["old_linger_s"] = f">{duration - args.upgrade_at}"
    except (StartError, subprocess.SubprocessError, OSError) as e:
        rec["error"] = str(e)
        log(f"{tag}: {e}")
    finally:
        for c in reversed(started):
            c.stop(grace=3.0)
        if daemon_group is not None:
            # The nginx daemon's group: old and new masters and their workers.
            try:
                os.killpg(daemon_group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    with open(os.path.join(raw, f"{tag}.json"), "w") as f:
        json.dump(rec, f, indent=1, default=str)
    return rec


def summary(records, args) -> str:
    lines = [
        "# Binary upgrade under load",
        "",
        f"Generated by bench/upgrade.py from raw/*.json on {platform.node()}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}. Each session sends a "
        f"64-byte message every {1 / args.rate_per_session:.2f} s; the upgrade comes "
        f"{args.upgrade_at} s into the measured window; nginx `worker_shutdown_timeout` and "
        f"HAProxy `hard-stop-after` = {args.grace} s."
        + (" Sessions are wss:// (TLS 1.3, AES-128-GCM, the run's ECDSA P-256 certificate)"
           " through each target's TLS configuration." if args.tls else ""),
        "",
        "| target | sessions | hand-off (ms) | longest stall (ms) | p99 (ms) | sessions cut | old process lingered (s) | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append("| {t} | {n} | {h} | {s} | {p} | {c} | {l} | {e} |".format(
            t=r["target"], n=r["sessions"], h=r.get("handoff_ms", "n/a"),
            s=r.get("max_stall_ms", "?"), p=r.get("p99_ms", "?"), c=r.get("cut", "?"),
            l=r.get("old_linger_s", "?"), e=r.get("error", "") or ("" if r.get("upgrade_ok", True)
                                                                else "upgrade failed")))
    lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1000,4000,9000",
                    help="session counts for ringlb; nginx and HAProxy run --peer-sessions")
    ap.add_argument("--peer-sessions", type=int, default=1000)
    ap.add_argument("--targets", default="ringlb,nginx,haproxy")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--grace", type=int, default=10,
                    help="nginx worker_shutdown_timeout / HAProxy hard-stop-after (s)")
    ap.add_argument("--rate-per-session", type=float, default=2.0)
    ap.add_argument("--warmup", type=int, default=3, help="s before measuring (sessions opening)")
    ap.add_argument("--upgrade-at", type=int, default=3, help="s into the measured window")
    ap.add_argument("--tail", type=int, default=5, help="s measured after the grace period")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bin-dir", default=None, help="where ringlb and ringlb-load are")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tls", action="store_true",
                    help="wss:// sessions through each target's TLS configuration "
                         "(bench/configs/*-tls.*; certificates made for the run)")
    args = ap.parse_args(argv)

    bins = {"ringlb": find_bin("ringlb", args.bin_dir),
            "ringlb-load": find_bin("ringlb-load", args.bin_dir),
            "nginx": find_program("nginx"), "haproxy": find_program("haproxy")}
    targets = [t for t in args.targets.split(",") if t]
    missing = [k for k in ["ringlb", "ringlb-load"] + [t for t in targets if t != "ringlb"]
               if not bins.get(k)]
    if missing:
        log(f"missing: {missing} (cargo build --release --workspace; apt-get install -y nginx haproxy)")
        return 2
    out = args.out or os.path.join(HERE, "results",
                                   f"{datetime.date.today().isoformat()}-upgrade-{platform.node()}")
    for d in ("raw", "logs", "configs"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    sessions = [int(s) for s in args.sessions.split(",") if s]
    if args.tls:
        openssl = find_program("openssl")
        if not openssl:
            log("--tls needs the openssl command line (apt-get install -y openssl)")
            return 2
        args.tls = tlscerts.make(tempfile.mkdtemp(prefix="ringlb-upgrade-certs-"), openssl)
    else:
        args.tls = None
    records = []
    try:
        for rep in range(args.reps):
            for kind in targets:
                counts = sessions if kind == "ringlb" else [args.peer_sessions]
                for n in counts:
                    log(f"{kind}, {n} sessions, rep {rep}")
                    r = run_one(args, bins, out, kind, n, rep)
                    log(f"  -> {json.dumps({k: v for k, v in r.items() if k not in ('errors', 'upgrade_stderr')}, default=str)}")
                    records.append(r)
    finally:
        procutil.REGISTRY.stop_all()
    text = summary(records, args)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
