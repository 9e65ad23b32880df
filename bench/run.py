#!/usr/bin/env python3
"""ringlb benchmark harness.

    python3 bench/run.py --targets direct,ringlb,nginx,nginx-tuned,haproxy [--quick]
                         [--reps 3] [--out DIR] [--pin] [--static]
    python3 bench/run.py --tls [--quick]     # TLS termination: ringlb-tls, nginx-tls, haproxy-tls

For every scenario, rep and target (targets interleaved rep by rep) it starts
two `ringlb-load echo` backends, the target proxy in front of them, runs the
load, samples the proxy's CPU time / RSS / threads from /proc and stops
everything it started by process group.  The static-file scenarios
(`--static`) start no backends: ringlb and nginx serve the same directory of
test files and `ringlb-load http` requests one of them.  TLS targets
(`--tls`, or naming ringlb-tls / nginx-tls / haproxy-tls) terminate TLS with
a certificate made for the run (tlscerts.py) and are loaded with
`ringlb-load --tls`; ringlb-tls is skipped, with the reason, when the ringlb
binary has no [tls] support.  Raw JSON goes to
bench/results/<date>-<host>/raw/, then report.py writes summary.md, SETUP.md
and SVG plots from that raw data.

Standard library only. Installs nothing: missing tools are reported with the
command to install them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procutil  # noqa: E402
from procutil import Child, Sampler, StartError  # noqa: E402
import targets as targets_mod  # noqa: E402
from targets import TARGETS, TOOL_FOR_KIND, applies, find_program, start_target  # noqa: E402
from targets import TLS_EXPECTED, TLS_LOAD_FLAGS, is_tls, ringlb_tls_support  # noqa: E402
import tlscerts  # noqa: E402

REPO = os.path.dirname(HERE)
ALL_SCENARIOS = ["pingpong", "rate", "handshake", "bulk", "idle"]
PIN_SCENARIO = "pingpong_pin"
# Static-file serving (ringlb's `static` routes vs nginx); added by --static.
STATIC_SCENARIOS = list(targets_mod.STATIC_SCENARIOS)
# The directory both servers serve: name -> size in bytes. Contents are
# pseudo-random (fixed seed), so gzip could not shrink them even if it were on.
STATIC_FILES = {"small.bin": 2048, "large.bin": 10 * 1024 * 1024}
# TLS termination (issue #15): `--tls` runs these targets and scenarios unless
# --targets/--scenarios say otherwise. handshake is full handshakes there
# (--no-tls-resume); handshake_resumed (TLS targets only) resumes sessions.
TLS_SCENARIOS = list(targets_mod.TLS_SCENARIOS)
HANDSHAKE_SCENARIOS = ("handshake", "handshake_resumed")
TLS_DEFAULT_TARGETS = "ringlb-tls,nginx-tls,haproxy-tls"
TLS_DEFAULT_SCENARIOS = "handshake,handshake_resumed,pingpong,bulk,idle"

# Scenario parameters. Durations in seconds.
FULL = {
    "pingpong": {"connections": 200, "size": 64, "duration": 10, "warmup": 2},
    "rate": {"connections": 200, "size": 64, "duration": 10, "warmup": 2, "rate": None},
    "handshake": {"total": 20000, "concurrency": 50},
    "handshake_resumed": {"total": 20000, "concurrency": 50},
    "bulk": {"connections": 4, "size": "1MiB", "duration": 10, "warmup": 2},
    "idle": {"connections": 9000, "hold": 25, "procs": 2},
    PIN_SCENARIO: {"connections": 200, "size": 64, "duration": 10, "warmup": 2,
                   "proxy_cpus": "0", "other_cpus": "1"},
    "static_small": {"file": "small.bin", "connections": 50, "duration": 10, "warmup": 2},
    "static_large": {"file": "large.bin", "connections": 4, "duration": 10, "warmup": 2},
}
QUICK = {
    "pingpong": {"connections": 50, "size": 64, "duration": 3, "warmup": 1},
    "rate": {"connections": 50, "size": 64, "duration": 3, "warmup": 1, "rate": None},
    "handshake": {"total": 1000, "concurrency": 20},
    "handshake_resumed": {"total": 1000, "concurrency": 20},
    "bulk": {"connections": 2, "size": "1MiB", "duration": 3, "warmup": 1},
    "idle": {"connections": 300, "hold": 8, "procs": 1},
    PIN_SCENARIO: {"connections": 50, "size": 64, "duration": 3, "warmup": 1,
                   "proxy_cpus": "0", "other_cpus": "1"},
    # no warm-up: the CPU window still starts 0.75 s in (CI: ~20 s for all static rows)
    "static_small": {"file": "small.bin", "connections": 20, "duration": 2, "warmup": 0},
    "static_large": {"file": "large.bin", "connections": 2, "duration": 2, "warmup": 0},
}
DEFAULT_RATE = {"full": 20000, "quick": 2000}

_HELP_CACHE: dict[str, str] = {}


def log(msg: str) -> None:
    ts = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", flush=True)


# ------------------------------------------------------------ tool discovery

def find_binary(name: str, bin_dir: str | None) -> str | None:
    dirs = []
    if bin_dir:
        dirs.append(bin_dir)
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release"))
    dirs += [os.path.join(REPO, "target", "release"), os.path.join(REPO, "target-bench", "release")]
    for d in dirs:
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


INDEP_DIR = os.path.join(HERE, "indep-load")


def indep_binary() -> str | None:
    p = os.path.join(INDEP_DIR, "target", "release", "indep-load")
    return p if os.access(p, os.X_OK) else None


def tool_help(load_bin: str, mode: str) -> str:
    if mode not in _HELP_CACHE:
        try:
            r = subprocess.run([load_bin, mode, "--help"], capture_output=True, text=True, timeout=10)
            _HELP_CACHE[mode] = r.stdout + r.stderr
        except (OSError, subprocess.TimeoutExpired):
            _HELP_CACHE[mode] = ""
    return _HELP_CACHE[mode]


def supports(load_bin: str, mode: str, flag: str) -> bool:
    return flag in tool_help(load_bin, mode)


def check_tools(names: list[str], pin: bool, perf: bool = False) -> tuple[dict, list[str]]:
    """Return (programs found, human-readable problems)."""
    found, missing = {}, []
    kinds = {TARGETS[t][0] for t in names}
    for kind, prog in TOOL_FOR_KIND.items():
        p = find_program(prog)
        found[prog] = p
        if kind in kinds and not p:
            missing.append(prog)
    for prog in ["ss"] + (["taskset"] if pin else []) + (["perf"] if perf else []):
        p = find_program(prog)
        found[prog] = p
        if not p:
            missing.append({"ss": "iproute2", "taskset": "util-linux", "perf": "linux-perf"}[prog])
    return found, missing


# ------------------------------------------------------------ one measurement

class Ctx:
    def __init__(self, args, out, bins, params, mode):
        self.args = args
        self.out = out
        self.bins = bins
        self.params = params
        self.mode = mode  # "full" | "quick"
        self.raw = os.path.join(out, "raw")
        self.logs = os.path.join(out, "logs")
        self.configs = os.path.join(out, "configs")
        for d in (self.raw, self.logs, self.configs):
            os.makedirs(d, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="ringlb-bench-")
        self.quiet_budget = float(args.wait_quiet_total)
        self.static_root = None  # made by make_static_root() when a static scenario runs
        self.static_files: dict = {}
        self.tls = None  # certificate paths (tlscerts.make) when a TLS target runs


def make_static_root(ctx: Ctx) -> dict:
    """Create the directory both servers serve, once per run. Returns its
    description for run.json / SETUP.md."""
    import hashlib
    import random
    root = os.path.join(ctx.work, "static-root")
    os.makedirs(root, exist_ok=True)
    rnd = random.Random(20261126)
    files = {}
    for name, size in STATIC_FILES.items():
        data = rnd.randbytes(size)
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        files[name] = {"bytes": size, "sha256": hashlib.sha256(data).hexdigest()}
    os.chmod(ctx.work, 0o755)  # nginx workers must be able to reach the files
    ctx.static_root = root
    ctx.static_files = files
    return {"root": root, "files": files}


def probe_static(port: int, path: str, expect: bytes) -> dict:
    """Two GETs on one connection before the load: the body must be the file,
    byte for byte, and the headers are recorded (keep-alive behaviour)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    out: dict = {"path": path}
    try:
        for i in range(2):
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            hdrs = {k.lower(): v for k, v in resp.getheaders()}
            if i == 0:
                out["status"] = resp.status
                out["version"] = resp.version
                out["headers"] = {k: hdrs[k] for k in sorted(hdrs) if k not in ("date",)}
                out["body_ok"] = body == expect
                out["body_bytes"] = len(body)
            else:
                out["second_status"] = resp.status
                out["second_body_ok"] = body == expect
            if resp.will_close:
                out["closed_after"] = i + 1
                break
        # http.client reconnects silently; a second request on the same socket
        # means the server kept the connection alive.
        out["keep_alive"] = out.get("closed_after") is None
    finally:
        conn.close()
    return out


def start_backends(ctx: Ctx, tag: str, cpus: str | None) -> tuple[list[Child], list[int]]:
    children, ports = [], []
    for i in (1, 2):
        c = Child(f"echo{i}", [ctx.bins["ringlb-load"], "echo", "--listen", "127.0.0.1:0"],
                  os.path.join(ctx.logs, f"{tag}-echo{i}.log"), cpus=cpus, capture_stdout=True)
        children.append(c)
        line = c.read_lines(1, timeout=10.0)[0]
        if not line.startswith("listening "):
            raise StartError(f"echo{i}: unexpected first line {line!r}")
        port = int(line.rsplit(":", 1)[1])
        procutil.wait_tcp(port, 10.0, c)
        ports.append(port)
    return children, ports


def load_cmd(ctx: Ctx, scenario: str, p: dict, url: str, json_path: str, hist_path: str,
             target: str | None = None) -> list[str]:
    cmd = _load_cmd(ctx, scenario, p, url, json_path, hist_path)
    if target is not None and is_tls(target):
        # Verified against the run's CA, by name; only TLS 1.3 with
        # AES-128-GCM offered, so every target negotiates the same.
        cmd += ["--tls", "--ca", ctx.tls["ca"], "--sni", ctx.tls["server_name"]] + TLS_LOAD_FLAGS
        # handshake measures full handshakes; elsewhere sessions resume, as a
        # browser's would (handshake_resumed measures that).
        cmd.append("--no-tls-resume" if scenario == "handshake" else "--tls-resume")
    return cmd


def _load_cmd(ctx: Ctx, scenario: str, p: dict, url: str, json_path: str, hist_path: str) -> list[str]:
    lb = ctx.bins["ringlb-load"]
    if scenario in STATIC_SCENARIOS:
        return [lb, "http", "--url", url, "--json", json_path,
                "--connections", str(p["connections"]), "--duration", f"{p['duration']}s",
                "--warmup", f"{p['warmup']}s",
                "--expect-length", str(STATIC_FILES[p["file"]]), "--hist", hist_path]
    mode = {"pingpong": "pingpong", PIN_SCENARIO: "pingpong", "rate": "rate",
            "handshake": "handshake", "handshake_resumed": "handshake",
            "bulk": "bulk", "idle": "idle"}[scenario]
    if mode in ("pingpong", "rate", "handshake") and ctx.bins.get("client"):
        lb = ctx.bins["client"]  # --client indep: the independent load tool
    cmd = [lb, mode, "--url", url, "--json", json_path]
    if mode in ("pingpong", "rate", "bulk"):
        cmd += ["--connections", str(p["connections"]), "--size", str(p["size"]),
                "--duration", f"{p['duration']}s"]
        if p.get("warmup") and supports(lb, mode, "--warmup"):
            cmd += ["--warmup", f"{p['warmup']}s"]
        if supports(lb, mode, "--binary"):
            cmd += ["--binary"]
        if mode == "rate":
            cmd += ["--rate", str(p["rate"])]
        if mode in ("pingpong", "rate") and supports(lb, mode, "--hist"):
            cmd += ["--hist", hist_path]
    elif mode == "handshake":
        cmd += ["--total", str(p["total"]), "--concurrency", str(p["concurrency"])]
    elif mode == "idle":
        cmd += ["--connections", str(p["connections"]), "--hold", f"{p['hold']}s"]
        if p.get("procs", 1) > 1 and supports(lb, mode, "--procs"):
            cmd += ["--procs", str(p["procs"])]
    return cmd


def load_timeout(scenario: str, p: dict) -> float:
    if scenario in HANDSHAKE_SCENARIOS:
        return 180.0
    if scenario == "idle":
        return p["hold"] + 120.0
    return p["duration"] + p.get("warmup", 0) + 60.0


def wait_quiet(ctx: Ctx) -> list[str]:
    """Wait (bounded) while a build runs on the machine. Returns what was still
    running when we gave up waiting (recorded with the measurement)."""
    def check():
        b = procutil.busy_processes()
        f = procutil.foreign_cpu_cores(0.5)
        if f > ctx.args.foreign_cpu:
            b.append(f"other-processes={f:.2f}cores")
        return b

    busy = check()
    if not busy:
        return []
    deadline = time.monotonic() + min(ctx.args.wait_quiet, max(0.0, ctx.quiet_budget))
    log(f"waiting for a quiet machine before measuring: {' '.join(busy[:6])}")
    t0 = time.monotonic()
    while busy and time.monotonic() < deadline:
        time.sleep(1.5)
        busy = check()
    ctx.quiet_budget -= time.monotonic() - t0
    if busy:
        log(f"still busy, measuring anyway (flagged): {' '.join(busy[:6])}")
    return busy


def measure(ctx: Ctx, scenario: str, target: str, rep: int) -> dict:
    p = dict(ctx.params[scenario])
    tag = f"{scenario}.{target}.r{rep}"
    rec = {"scenario": scenario, "target": target, "rep": rep, "params": p,
           "status": "failed", "error": None, "started": time.time()}
    rec["busy_machine"] = wait_quiet(ctx)
    pinned = "proxy_cpus" in p
    proxy_cpus = p.get("proxy_cpus") if pinned else None
    other_cpus = p.get("other_cpus") if pinned else None
    static = scenario in STATIC_SCENARIOS
    backends, running, load = [], None, None
    try:
        if static:
            bports = []
            running = start_target(target, bports, ctx.work, ctx.logs, tag, ctx.bins,
                                   ctx.args.workers, proxy_cpus, ctx.configs,
                                   static_root=ctx.static_root)
            path = "/" + p["file"]
            with open(os.path.join(ctx.static_root, p["file"]), "rb") as f:
                expect = f.read()
            rec["probe"] = probe_static(running.port, path, expect)
            if rec["probe"].get("status") != 200 or not rec["probe"].get("body_ok"):
                pr = rec["probe"]
                raise StartError(f"{target} did not serve {path} correctly before the load: "
                                 f"status {pr.get('status')}, {pr.get('body_bytes')} bytes, "
                                 f"content {'ok' if pr.get('body_ok') else 'WRONG'}")
            url = f"http://127.0.0.1:{running.port}{path}"
        else:
            backends, bports = start_backends(ctx, tag, other_cpus)
            rec["backend_ports"] = bports
            rec["backend_pids"] = [b.pid for b in backends]
            running = start_target(target, bports, ctx.work, ctx.logs, tag, ctx.bins,
                                   ctx.args.workers, proxy_cpus, ctx.configs, tls=ctx.tls)
            url = f"{'wss' if is_tls(target) else 'ws'}://127.0.0.1:{running.port}/"
        if running.child is not None:
            rec["proxy_cmd"] = running.child.cmd
        proxy_roots = [running.child.pid] if running.child else []
        time.sleep(0.3)  # let workers settle after start
        proxy_pids = []
        for r in proxy_roots:
            proxy_pids += procutil.descendants(r)
        before = procutil.sample_tree(proxy_pids, fds=True) if proxy_pids else None
        rec["proxy_before"] = before
        rec["machine_used_kb_before"] = procutil.machine_used_kb()
        ours = set(proxy_pids) | {q for b in backends for q in procutil.descendants(b.pid)}
        rec["others_anon_kb_before"] = procutil.others_anon_kb(ours)

        json_path = os.path.join(ctx.work, f"{tag}.json")
        hist_path = os.path.join(ctx.raw, "hist", f"{tag}.csv")
        os.makedirs(os.path.dirname(hist_path), exist_ok=True)
        cmd = load_cmd(ctx, scenario, p, url, json_path, hist_path, target=target)
        rec["load_cmd"] = cmd
        t_spawn = time.monotonic()
        load = Child("load", cmd, os.path.join(ctx.logs, f"{tag}-load.log"), cpus=other_cpus)
        roots = {"load": [load.pid]}
        if backends:
            roots["backends"] = [b.pid for b in backends]
        if proxy_roots:
            roots["proxy"] = proxy_roots
        perf = start_perf(ctx, scenario, p, tag, proxy_pids)
        pstat = start_perf_stat(ctx, scenario, p, tag, proxy_pids)
        if pstat is not None:
            roots["perf_stat"] = [pstat.pid]
        if perf is not None:
            # perf's own CPU is not another process's: keep it out of "foreign"
            roots["perf"] = [perf.pid]
        sampler = Sampler(roots, interval=0.25).start()

        if scenario == "idle":
            rec["idle"] = idle_probe(ctx, p, running, bports, proxy_pids, load, rec)

        rc = load.wait(load_timeout(scenario, p))
        t_exit = time.monotonic()
        sampler.stop()
        if perf is not None:
            rec["perf"] = finish_perf(ctx, perf, tag)
        if pstat is not None:
            rec["perf_stat"] = finish_perf_stat(ctx, pstat, tag)
        rec["busy_during"] = sorted(sampler.busy_seen)
        if rc is None:
            load.stop()
            raise StartError(f"load tool did not finish within {load_timeout(scenario, p):.0f}s")
        rec["load_rc"] = rc
        rec["load_wall_s"] = t_exit - t_spawn
        try:
            with open(json_path) as f:
                rec["load"] = json.load(f)
        except (OSError, ValueError) as e:
            raise StartError(f"load tool exit {rc}, no JSON ({e}); log: {load.log_tail()[-800:]}")
        if not os.path.exists(hist_path):
            rec["hist"] = None
        else:
            rec["hist"] = os.path.relpath(hist_path, ctx.out)

        # Steady-state window (skip warmup/connect at the start, teardown at the end).
        if scenario in HANDSHAKE_SCENARIOS + ("idle",):
            t0, t1 = t_spawn - 1.0, t_exit + 1.0
        else:
            warm = p.get("warmup", 0) + 0.75
            t0 = t_spawn + warm
            t1 = min(t_exit, t_spawn + warm + p["duration"] - 1.0)
            if t1 - t0 < 1.0:
                t0, t1 = t_spawn, t_exit
        rec["window"] = {"t0_rel": t0 - t_spawn, "t1_rel": t1 - t_spawn}
        rec["cpu"] = {k: sampler.window(k, t0, t1) for k in roots}
        rec["foreign_cpu_cores"] = sampler.foreign_cores(t0, t1)
        if (rec["foreign_cpu_cores"] or 0) > ctx.args.foreign_cpu:
            rec["busy_during"].append(f"other-processes={rec['foreign_cpu_cores']:.2f}cores")
        rec["samples"] = {k: [{"t": round(s["t"] - t_spawn, 3), "cpu_s": s["cpu_s"], "sys_s": s["sys_s"],
                               "rss_kb": s["rss_kb"], "threads": s["threads"]} for s in v]
                          for k, v in sampler.samples.items()}
        errs = rec["load"].get("error_total", 0) or 0
        rec["status"] = "ok" if rc == 0 and not errs else "errors"
        if rec["status"] == "errors":
            rec["error"] = f"load exit {rc}, error_total={errs}: {rec['load'].get('errors')}"
        if is_tls(target):
            tls_problem = check_tls(scenario, rec)
            if tls_problem and rec["status"] == "ok":
                rec["status"] = "errors"
                rec["error"] = tls_problem
        # The proxy must still be alive at the end of the run.
        if running.child is not None and not running.child.alive():
            rec["status"] = "failed"
            rec["error"] = f"{target} exited during the run: {running.child.log_tail()[-800:]}"
    except StartError as e:
        rec["error"] = str(e)
    except Exception as e:  # keep going: a broken target must not kill the run
        rec["error"] = f"{type(e).__name__}: {e}"
    finally:
        if load is not None:
            load.stop()
        if running is not None:
            running.stop()
        for b in backends:
            b.stop()
    rec["finished"] = time.time()
    with open(os.path.join(ctx.raw, f"{tag}.json"), "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def check_tls(scenario: str, rec: dict) -> str | None:
    """Records what a TLS run negotiated; says what is wrong if it is not
    the same on every target (TLS_EXPECTED), or if a full-handshake run
    resumed sessions, or a resumption run resumed none."""
    t = (rec.get("load") or {}).get("tls")
    if not isinstance(t, dict):
        return "the load tool reported no TLS statistics (is ringlb-load built with --tls?)"
    rec["tls"] = {k: t.get(k) for k in ("handshakes", "full", "resumed", "negotiated")}
    neg = t.get("negotiated") or {}
    other = {k: v for k, v in neg.items() if k != TLS_EXPECTED}
    if other:
        return f"negotiated {other}, expected only {TLS_EXPECTED!r}"
    if scenario == "handshake" and t.get("resumed"):
        return f"full-handshake run resumed {t['resumed']} session(s)"
    if scenario == "handshake_resumed" and not t.get("resumed"):
        return "no session was resumed (the target issued no usable ticket)"
    return None


def start_perf(ctx: Ctx, scenario: str, p: dict, tag: str, proxy_pids: list[int]) -> Child | None:
    """`--perf S`: record call graphs of the proxy's processes for S seconds
    of the load (after its warm-up); None when not asked or not applicable."""
    if not ctx.args.perf or not proxy_pids or scenario == "idle":
        return None
    delay = 0.0 if scenario in HANDSHAKE_SCENARIOS else p.get("warmup", 0) + 0.5
    secs = ctx.args.perf if scenario in HANDSHAKE_SCENARIOS else min(ctx.args.perf, max(1.0, p["duration"] - 1.0))
    os.makedirs(os.path.join(ctx.out, "perf"), exist_ok=True)
    data = os.path.join(ctx.work, f"{tag}.perf.data")
    cmd = [ctx.bins["perf"], "record", "-q", "-g", "-o", data, "-p", ",".join(map(str, proxy_pids)),
           "--", "sleep", f"{delay + secs:.2f}"]
    if delay > 0:
        cmd[2:2] = ["-D", str(int(delay * 1000))]
    return Child("perf", cmd, os.path.join(ctx.logs, f"{tag}-perf.log"))


# Counted per proxy over the measured window by `--perf-stat`: wake-ups
# (context switches), every syscall, and the two that wait for events.
PERF_STAT_EVENTS = ["context-switches", "cpu-migrations", "raw_syscalls:sys_enter",
                    "syscalls:sys_enter_io_uring_enter", "syscalls:sys_enter_epoll_wait",
                    "syscalls:sys_enter_epoll_pwait", "task-clock"]


def start_perf_stat(ctx: Ctx, scenario: str, p: dict, tag: str, proxy_pids: list[int]) -> Child | None:
    """`--perf-stat`: count PERF_STAT_EVENTS in the proxy's processes over the
    same window as the CPU figures (after the warm-up, for duration - 1 s).
    Counting costs far less than `perf record`, but not nothing: compare
    counted runs with counted runs."""
    if not ctx.args.perf_stat or not proxy_pids or scenario not in ("pingpong", "rate", PIN_SCENARIO, "bulk"):
        return None
    delay = p.get("warmup", 0) + 0.75
    secs = max(1.0, p["duration"] - 1.0)
    out = os.path.join(ctx.work, f"{tag}.perfstat.csv")
    cmd = [ctx.bins["perf"], "stat", "-x", ",", "-o", out, "-D", str(int(delay * 1000)),
           "-e", ",".join(PERF_STAT_EVENTS), "-p", ",".join(map(str, proxy_pids)),
           "--", "sleep", f"{delay + secs:.2f}"]
    return Child("perf-stat", cmd, os.path.join(ctx.logs, f"{tag}-perfstat.log"))


def finish_perf_stat(ctx: Ctx, pstat: Child, tag: str) -> dict | None:
    """Event counts and the seconds they were counted over."""
    if pstat.wait(60) is None:
        pstat.stop()
        return None
    path = os.path.join(ctx.work, f"{tag}.perfstat.csv")
    counts: dict = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) < 3 or line.startswith("#"):
                    continue
                try:
                    counts[parts[2]] = float(parts[0])
                except ValueError:
                    counts[parts[2]] = None  # "<not counted>" / "<not supported>"
    except OSError:
        return None
    # task-clock is in ms of CPU; the window length is what -D/sleep gave
    return {"events": counts}


def finish_perf(ctx: Ctx, perf: Child, tag: str) -> str | None:
    """Waits (bounded) for `perf record`, then keeps text reports only."""
    if perf.wait(60) is None:
        perf.stop()
        return None
    data = os.path.join(ctx.work, f"{tag}.perf.data")
    out = os.path.join(ctx.out, "perf", f"{tag}.txt")
    parts = [("perf report --no-children --sort dso", ["--no-children", "--sort", "dso"]),
             ("perf report --no-children --sort dso,symbol (top 60)",
              ["--no-children", "--sort", "dso,symbol"]),
             ("perf report --children --sort symbol (top 60)", ["--children", "--sort", "symbol"])]
    with open(out, "w") as f:
        for title, extra in parts:
            r = subprocess.run([ctx.bins["perf"], "report", "-i", data, "--stdio", "-g", "none",
                                "--percent-limit", "0.3"] + extra,
                               capture_output=True, text=True, timeout=300)
            # drop perf's empty trailing columns ("-  -" with padding)
            lines = [re.sub(r"(\s+-)*\s*$", "", ln) for ln in r.stdout.splitlines()
                     if ln.strip() and not ln.startswith("#")]
            f.write(f"# {title}\n" + "\n".join(lines[:60]) + "\n\n")
    os.unlink(data)
    return os.path.relpath(out, ctx.out)


def idle_probe(ctx, p, running, bports, proxy_pids, load, rec) -> dict:
    """While `idle` holds its connections: wait (bounded) until all are
    established at the proxy and at the backends, then sample memory."""
    n = p["connections"]
    probe_start = time.monotonic()
    deadline = probe_start + max(5.0, p["hold"] - 3.0)
    front = back = 0
    while time.monotonic() < deadline and load.alive():
        front = procutil.established_on_port(running.port)
        back = sum(procutil.established_on_port(bp) for bp in bports) if running.child else front
        if front >= n and back >= n:
            break
        time.sleep(0.25)
    out = {"established_front": front, "established_back": back, "all_established": front >= n and back >= n}
    time.sleep(1.0)  # settle
    # Sampled twice: just after the last connection (fresh) and near the end
    # of the hold (settled: idle for most of it), which is what a fleet of
    # long-idle sessions costs. ringlb parks sessions silent for
    # server.park_idle_after (5 s); nginx and HAProxy do not change. The
    # settled sample is the one reported.
    out["fresh_machine_used_kb"] = procutil.machine_used_kb()
    if proxy_pids:
        out["fresh_proxy"] = procutil.sample_tree(procutil.descendants(running.child.pid), fds=False)
    settle_until = probe_start + max(0.0, p["hold"] - 4.0)
    while time.monotonic() < settle_until and load.alive():
        time.sleep(0.25)
    out["machine_used_kb"] = procutil.machine_used_kb()
    ours = set(procutil.descendants(load.pid)) | set(proxy_pids)
    for bp in rec.get("backend_pids", []):
        ours |= set(procutil.descendants(bp))
    out["others_anon_kb"] = procutil.others_anon_kb(ours)
    if proxy_pids:
        pids = procutil.descendants(running.child.pid)
        out["proxy"] = procutil.sample_tree(pids, fds=True)
    out["established_front_at_sample"] = procutil.established_on_port(running.port)
    return out


# ------------------------------------------------------------ orchestration

def calibrate_rate(records: list[dict], mode: str) -> tuple[int, str]:
    """Open-loop rate: half the lowest proxy's median ping-pong throughput."""
    by_target: dict[str, list[float]] = {}
    for r in records:
        if r["scenario"] == "pingpong" and r["status"] in ("ok", "errors") and r["target"] != "direct":
            v = (r.get("load") or {}).get("msgs_per_s")
            if v:
                by_target.setdefault(r["target"], []).append(v)
    if not by_target:
        return DEFAULT_RATE[mode], "default (no ping-pong results to calibrate from)"
    lowest_t, lowest = min(((t, statistics.median(v)) for t, v in by_target.items()), key=lambda x: x[1])
    rate = 0.5 * lowest
    mag = 10 ** max(0, len(str(int(rate))) - 2)
    rate = max(100, int(rate // mag * mag))
    return rate, f"0.5 x lowest proxy ping-pong median ({lowest_t}: {lowest:.0f} msg/s)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=None,
                    help="comma list of: " + ",".join(TARGETS)
                    + " (default direct,ringlb,nginx,nginx-tuned,haproxy; with --tls " + TLS_DEFAULT_TARGETS + ")")
    ap.add_argument("--scenarios", default=None,
                    help="comma list of: " + ",".join(ALL_SCENARIOS + [PIN_SCENARIO] + STATIC_SCENARIOS
                                                      + TLS_SCENARIOS)
                    + " (default " + ",".join(ALL_SCENARIOS) + "; with --tls " + TLS_DEFAULT_SCENARIOS + ")")
    ap.add_argument("--tls", action="store_true",
                    help="TLS termination: targets " + TLS_DEFAULT_TARGETS + " and scenarios "
                         + TLS_DEFAULT_SCENARIOS + " unless --targets/--scenarios are given")
    ap.add_argument("--quick", action="store_true", help="1 rep, short runs, small idle count (CI)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3, quick 1)")
    ap.add_argument("--out", default=None, help="results dir (default bench/results/<date>-<host>)")
    ap.add_argument("--pin", action="store_true",
                    help=f"add scenario {PIN_SCENARIO}: proxy on CPU 0, load+backends on CPU 1")
    ap.add_argument("--static", action="store_true",
                    help="add scenarios " + ",".join(STATIC_SCENARIOS) + ": ringlb and nginx serving "
                         "the same files (targets that do not serve files are skipped there)")
    ap.add_argument("--workers", type=int, default=2, help="nginx workers = HAProxy threads = ringlb shards")
    ap.add_argument("--rate", type=int, default=None, help="open-loop msg/s (default: calibrated)")
    ap.add_argument("--idle-connections", type=int, default=None)
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per ping-pong/rate/bulk run (overrides the mode's default)")
    ap.add_argument("--hold", type=float, default=None, help="seconds the idle scenario holds")
    ap.add_argument("--handshakes", type=int, default=None, help="handshakes per handshake run")
    ap.add_argument("--bin-dir", default=None, help="dir with ringlb and ringlb-load")
    ap.add_argument("--base-bin", default=None,
                    help="another ringlb binary, run as the target ringlb-base with the same "
                         "config, for a same-run A/B of two builds (old against new)")
    ap.add_argument("--build", action="store_true",
                    help="run `cargo build --release --workspace` first")
    ap.add_argument("--wait-quiet", type=float, default=300.0,
                    help="before each measurement, wait up to this many seconds while a build "
                         "(cargo/rustc/cc/ld) runs on the machine (default 300)")
    ap.add_argument("--wait-quiet-total", type=float, default=1800.0,
                    help="total budget in seconds for such waits and for re-measurements over "
                         "the whole run (default 1800)")
    ap.add_argument("--foreign-cpu", type=float, default=0.25,
                    help="CPU cores used by processes outside the benchmark above which the "
                         "machine counts as busy (default 0.25)")
    ap.add_argument("--retry-busy", type=int, default=2,
                    help="measure again (up to N times) when a build ran during a measurement")
    ap.add_argument("--perf", type=float, default=None, metavar="SECONDS",
                    help="record the proxy with `perf record -g` for SECONDS of each load; text "
                         "reports go to <out>/perf/ (perf costs CPU: such a run is for profiles, "
                         "not for ratios)")
    ap.add_argument("--perf-stat", action="store_true",
                    help="count context switches and syscalls (io_uring_enter, epoll_wait) in the "
                         "proxy over each message run's window with `perf stat` (needs tracefs)")
    ap.add_argument("--client", choices=["ringlb-load", "indep"], default="ringlb-load",
                    help="load tool for pingpong/rate/handshake (and handshake_resumed): ringlb-load, "
                         "or indep (bench/indep-load: tokio-tungstenite, TLS through OpenSSL; built by "
                         "--build or `cargo build --release` there)")
    ap.add_argument("--skip-missing", action="store_true",
                    help="drop targets whose program is not installed instead of stopping")
    args = ap.parse_args(argv)
    if args.targets is None:
        args.targets = TLS_DEFAULT_TARGETS if args.tls else "direct,ringlb,nginx,nginx-tuned,haproxy"
    if args.scenarios is None:
        args.scenarios = TLS_DEFAULT_SCENARIOS if args.tls else ",".join(ALL_SCENARIOS)

    mode = "quick" if args.quick else "full"
    reps = args.reps or (1 if args.quick else 3)
    if reps < 1 or reps > 20:
        ap.error("--reps must be 1..20")
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in names:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.pin and PIN_SCENARIO not in scenarios:
        scenarios.append(PIN_SCENARIO)
    if args.static:
        scenarios += [s for s in STATIC_SCENARIOS if s not in scenarios]
    for s in scenarios:
        if s not in FULL:
            ap.error(f"unknown scenario {s!r}")
    if PIN_SCENARIO in scenarios and (os.cpu_count() or 1) < 2:
        ap.error("--pin needs at least 2 CPUs")

    progs, missing = check_tools(names, PIN_SCENARIO in scenarios, bool(args.perf or args.perf_stat))
    if missing:
        pkgs = " ".join(sorted(set(missing)))
        msg = (f"Missing tools: {pkgs}.\n"
               f"This harness installs nothing itself. Please install them, e.g. on Debian:\n"
               f"    apt-get install -y {pkgs}\n"
               f"(or run with --skip-missing to benchmark only the targets that are available)")
        if not args.skip_missing or any(m in ("iproute2", "util-linux", "linux-perf") for m in missing):
            print(msg, file=sys.stderr)
            return 3
        print(msg, file=sys.stderr)
        names = [t for t in names if TOOL_FOR_KIND.get(TARGETS[t][0]) not in missing]

    if args.build:
        env = dict(os.environ)
        log(f"building: cargo build --release --workspace (CARGO_TARGET_DIR={env.get('CARGO_TARGET_DIR', 'target')})")
        r = subprocess.run(["cargo", "build", "--release", "--workspace"], cwd=REPO, env=env)
        if r.returncode != 0:
            print("cargo build failed", file=sys.stderr)
            return 4
    if args.build and args.client == "indep":
        r = subprocess.run(["cargo", "build", "--release"], cwd=INDEP_DIR)
        if r.returncode != 0:
            print("cargo build of bench/indep-load failed", file=sys.stderr)
            return 4
    bins = dict(progs)
    if args.client == "indep":
        bins["client"] = indep_binary()
        if not bins["client"]:
            print("bench/indep-load is not built: (cd bench/indep-load && cargo build --release)",
                  file=sys.stderr)
            return 4
    bins["ringlb-load"] = find_binary("ringlb-load", args.bin_dir)
    bins["ringlb"] = find_binary("ringlb", args.bin_dir)
    if args.base_bin:
        bins["ringlb-base"] = os.path.abspath(args.base_bin)
    elif any(TARGETS.get(t, (None, None, {}))[2].get("binary") == "ringlb-base" for t in names):
        print("the ringlb-base target needs --base-bin PATH (an older ringlb to compare with)",
              file=sys.stderr)
        return 2
    if not bins["ringlb-load"]:
        print("ringlb-load not found. Build it first:\n"
              "    cargo build --release --workspace\n"
              "(or pass --build, or --bin-dir DIR; CARGO_TARGET_DIR is honoured)", file=sys.stderr)
        return 4

    params = {s: dict((QUICK if args.quick else FULL)[s]) for s in scenarios}
    if args.idle_connections and "idle" in params:
        params["idle"]["connections"] = args.idle_connections
    for sc, pp in params.items():
        if args.duration and "duration" in pp:
            pp["duration"] = args.duration if args.duration != int(args.duration) else int(args.duration)
        if args.hold and "hold" in pp:
            pp["hold"] = int(args.hold)
        if args.handshakes and "total" in pp:
            pp["total"] = args.handshakes

    host = socket.gethostname()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = args.out or os.path.join(HERE, "results", f"{stamp}-{host}" + ("-quick" if args.quick else ""))
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    ctx = Ctx(args, out, bins, params, mode)

    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "host": host,
            "mode": mode, "reps": reps, "targets": names, "scenarios": scenarios,
            "workers": args.workers, "argv": sys.argv, "bins": bins, "params": params,
            "status": "running"}
    if any(is_tls(t) for t in names):
        openssl = find_program("openssl")
        if not openssl:
            print("TLS targets need the openssl command line (apt-get install -y openssl)", file=sys.stderr)
            return 3
        ctx.tls = tlscerts.make(os.path.join(ctx.work, "certs"), openssl)
        meta["tls"] = {"certificate": tlscerts.describe(ctx.tls, openssl), "expected": TLS_EXPECTED,
                       "load_flags": TLS_LOAD_FLAGS + ["--sni", ctx.tls["server_name"]],
                       "server_name": ctx.tls["server_name"]}
        if "ringlb-tls" in names:
            why = (ringlb_tls_support(bins["ringlb"], ctx.tls, ctx.work) if bins.get("ringlb")
                   else "ringlb binary not found (cargo build --release --workspace)")
            if why:
                log(f"ringlb-tls: SKIPPED: {why}")
                meta["skipped_targets"] = {"ringlb-tls": why}
                names = [t for t in names if t != "ringlb-tls"]
                meta["targets"] = names
    skipped = {s: [t for t in names if not applies(s, t)] for s in scenarios}
    skipped = {s: v for s, v in skipped.items() if v}
    if skipped:
        meta["not_applicable"] = skipped
    if any(s in STATIC_SCENARIOS for s in scenarios):
        meta["static"] = make_static_root(ctx)

    def write_meta():
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(meta, f, indent=1)

    write_meta()
    log(f"results -> {out}")
    log(f"targets {names}; scenarios {scenarios}; reps {reps}; mode {mode}")

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    records: list[dict] = []
    rc = 0
    try:
        for scenario in scenarios:
            if scenario == "rate":
                if args.rate:
                    rate, why = args.rate, "--rate"
                else:
                    rate, why = calibrate_rate(records, mode)
                params["rate"]["rate"] = rate
                meta["rate_calibration"] = {"rate": rate, "why": why}
                write_meta()
                log(f"open-loop rate: {rate} msg/s ({why})")
            if skipped.get(scenario):
                log(f"{scenario}: n/a for {', '.join(skipped[scenario])} (skipped)")
            for rep in range(reps):
                for target in names:
                    if not applies(scenario, target):
                        continue
                    t0 = time.monotonic()
                    discarded = []
                    for attempt in range(1 + max(0, args.retry_busy)):
                        rec = measure(ctx, scenario, target, rep)
                        busy = rec.get("busy_machine") or rec.get("busy_during")
                        if (not busy or attempt == args.retry_busy or rec["status"] == "failed"
                                or ctx.quiet_budget <= 0):
                            break
                        # a discarded attempt is paid from the same budget as waiting for builds
                        ctx.quiet_budget -= rec["finished"] - rec["started"]
                        discarded.append({"busy": busy, "brief": brief(rec)})
                        log(f"{scenario} rep {rep} {target}: a build ran during the measurement "
                            f"({' '.join(busy[:4])}); measuring again")
                    if discarded:
                        rec["discarded_attempts"] = discarded
                        with open(os.path.join(ctx.raw, f"{scenario}.{target}.r{rep}.json"), "w") as f:
                            json.dump(rec, f, indent=1)
                    records.append(rec)
                    log(f"{scenario:12s} rep {rep} {target:12s} {rec['status']:7s} "
                        f"{brief(rec)} ({time.monotonic() - t0:.1f}s)"
                        + (f"  !! {rec['error'][:300]}" if rec.get("error") else ""))
        meta["status"] = "completed"
    except KeyboardInterrupt as e:
        meta["status"] = f"interrupted ({e})"
        rc = 130
    finally:
        procutil.REGISTRY.stop_all()
        if ctx.static_root:
            import shutil
            shutil.rmtree(ctx.static_root, ignore_errors=True)  # 10 MiB of test files
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_meta()

    import report  # noqa: E402
    report.write_setup(out, meta)
    report.generate(out)
    log(f"summary: {os.path.join(out, 'summary.md')}")
    return rc


def brief(rec: dict) -> str:
    L = rec.get("load") or {}
    s = rec["scenario"]
    if s in ("pingpong", "rate", PIN_SCENARIO):
        lat = L.get("latency_us") or {}
        return f"{L.get('msgs_per_s', 0):.0f} msg/s p99 {lat.get('p99', 0):.0f}us"
    if s in HANDSHAKE_SCENARIOS:
        t = L.get("tls") or {}
        extra = f" (tls full {t.get('full')} resumed {t.get('resumed')})" if t else ""
        return f"{L.get('handshakes_per_s', 0):.0f} conn/s{extra}"
    if s == "bulk":
        return f"{L.get('mb_per_s', 0):.1f} MB/s"
    if s == "idle":
        i = rec.get("idle") or {}
        return f"held {i.get('established_front')} conns"
    if s in STATIC_SCENARIOS:
        lat = L.get("latency_us") or {}
        return (f"{L.get('requests_per_s', 0):.0f} req/s {L.get('mb_per_s', 0):.1f} MB/s "
                f"p99 {lat.get('p99', 0):.0f}us reconnects {L.get('reconnects', 0)}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
