#!/usr/bin/env python3
"""Open-loop load sweep (issue #18): proxy CPU per message against offered load.

    python3 bench/sweep.py [--workers 1,2] [--clients ringlb-load,indep]
                           [--fractions 0.1,0.25,0.5,0.75,1.0] [--reps 3]
                           [--targets ringlb,nginx,haproxy] [--duration 8] [--perf-stat]
                           [--out DIR] [--quick]

For every worker count and load client:
1. calibrate: nginx's saturated (closed-loop) ping-pong rate with that client,
   median of --reps runs (the 100% point);
2. for each fraction of it, rep by rep, targets interleaved: an open-loop run
   (`rate` scenario of bench/run.py) at that offered rate.
Each point reports proxy CPU per message split into user and system time,
p50/p99 latency and, with --perf-stat, context switches, syscalls and
io_uring_enter / epoll_wait calls per message (perf stat over the same window
as the CPU figures). Writes sweep.json, summary.md and one SVG per worker count
and client into the results directory; the raw per-run records stay under it.

Standard library only; uses bench/run.py's measurement code unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procutil  # noqa: E402
import run  # noqa: E402
import svgplot  # noqa: E402

FRACTIONS = [0.10, 0.25, 0.50, 0.75, 1.00]


def run_args(a, workers: int, client: str) -> argparse.Namespace:
    """The options run.measure() and run.Ctx read."""
    return argparse.Namespace(workers=workers, client=client, wait_quiet=a.wait_quiet,
                              wait_quiet_total=1800.0, foreign_cpu=a.foreign_cpu, perf=None,
                              perf_stat=a.perf_stat, retry_busy=a.retry_busy)


def measure_quiet(ctx, scenario: str, target: str, rep: int, retries: int) -> dict:
    """run.measure(), again (up to `retries` times) when something else used
    the machine during it; the record keeps what was seen."""
    for attempt in range(1 + max(0, retries)):
        rec = run.measure(ctx, scenario, target, rep)
        busy = rec.get("busy_machine") or rec.get("busy_during")
        if not busy or rec["status"] == "failed" or attempt == retries:
            rec["attempts"] = attempt + 1
            return rec
        run.log(f"{scenario} {target} rep {rep}: machine busy ({' '.join(busy[:3])}); again")
    return rec


def ensure_tracefs() -> bool:
    """perf's syscall tracepoints need tracefs mounted (root can mount it)."""
    if os.path.isdir("/sys/kernel/tracing/events/syscalls"):
        return True
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                   capture_output=True)
    return os.path.isdir("/sys/kernel/tracing/events/syscalls")


def point_metrics(rec: dict) -> dict:
    """The figures of one open-loop run."""
    L = rec.get("load") or {}
    px = (rec.get("cpu") or {}).get("proxy") or {}
    rate = L.get("msgs_per_s") or 0
    m = {"status": rec.get("status"), "offered": (rec.get("params") or {}).get("rate"),
         "msgs_per_s": rate, "p50_us": (L.get("latency_us") or {}).get("p50"),
         "p99_us": (L.get("latency_us") or {}).get("p99"), "busy": bool(rec.get("busy_during"))}
    if px and rate:
        m["cpu_us"] = px["cpu_cores"] / rate * 1e6
        m["sys_us"] = px["sys_cores"] / rate * 1e6
        m["user_us"] = m["cpu_us"] - m["sys_us"]
    ps = (rec.get("perf_stat") or {}).get("events") or {}
    secs = max(1.0, rec["params"]["duration"] - 1.0)
    if ps and rate:
        n = rate * secs

        def per(k):
            v = ps.get(k)
            return None if v is None else v / n

        m["ctxsw_per_msg"] = per("context-switches")
        m["syscalls_per_msg"] = per("raw_syscalls:sys_enter")
        m["uring_enter_per_msg"] = per("syscalls:sys_enter_io_uring_enter")
        ew = [ps.get("syscalls:sys_enter_epoll_wait"), ps.get("syscalls:sys_enter_epoll_pwait")]
        m["epoll_wait_per_msg"] = None if all(v is None for v in ew) else sum(v or 0 for v in ew) / n
    return m


def median_of(points: list[dict], key: str):
    vals = [p[key] for p in points if p.get(key) is not None and p.get("status") == "ok"]
    return statistics.median(vals) if vals else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--clients", default="ringlb-load,indep")
    ap.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    ap.add_argument("--targets", default="ringlb,nginx,haproxy")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--perf-stat", action="store_true")
    ap.add_argument("--quick", action="store_true", help="1 rep, 3 s runs, fractions 0.25,1.0")
    ap.add_argument("--out", default=None)
    ap.add_argument("--wait-quiet", type=float, default=300.0)
    ap.add_argument("--foreign-cpu", type=float, default=0.25)
    ap.add_argument("--retry-busy", type=int, default=2,
                    help="measure a point again (up to N times) when a build or another process "
                         "used the machine during it")
    a = ap.parse_args(argv)
    if a.quick:
        a.reps, a.duration, a.warmup, a.fractions = 1, 3.0, 1.0, "0.25,1.0"
    workers = [int(x) for x in a.workers.split(",")]
    clients = [c.strip() for c in a.clients.split(",")]
    fractions = [float(x) for x in a.fractions.split(",")]
    targets = [t.strip() for t in a.targets.split(",")]
    if a.perf_stat and not ensure_tracefs():
        print("--perf-stat needs tracefs at /sys/kernel/tracing (mount -t tracefs nodev "
              "/sys/kernel/tracing)", file=sys.stderr)
        return 3
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = os.path.abspath(a.out or os.path.join(HERE, "results", f"{stamp}-sweep"))
    os.makedirs(out, exist_ok=True)
    progs, missing = run.check_tools(targets, False, a.perf_stat)
    if missing:
        print(f"missing: {' '.join(sorted(set(missing)))} (apt-get install -y ...)", file=sys.stderr)
        return 3
    bins = dict(progs)
    bins["ringlb-load"] = run.find_binary("ringlb-load", None)
    bins["ringlb"] = run.find_binary("ringlb", None)
    if "indep" in clients:
        bins["client-indep"] = run.indep_binary()
        if not bins["client-indep"]:
            print("build bench/indep-load first: (cd bench/indep-load && cargo build --release)",
                  file=sys.stderr)
            return 4
    meta = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(), "argv": sys.argv, "workers": workers, "clients": clients,
            "fractions": fractions, "targets": targets, "reps": a.reps, "duration": a.duration,
            "connections": a.connections, "points": []}

    def save():
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(meta, f, indent=1)

    try:
        for w in workers:
            for client in clients:
                args = run_args(a, w, client)
                b = dict(bins)
                if client == "indep":
                    b["client"] = bins["client-indep"]
                base = dict(run.FULL["rate"], connections=a.connections, duration=a.duration,
                            warmup=a.warmup)
                pp = dict(run.FULL["pingpong"], connections=a.connections, duration=a.duration,
                          warmup=a.warmup)
                sub = os.path.join(out, f"w{w}-{client}")
                cal = run.Ctx(args, os.path.join(sub, "calibrate"), b, {"pingpong": pp}, "full")
                sat = []
                for rep in range(a.reps):
                    rec = measure_quiet(cal, "pingpong", "nginx", rep, a.retry_busy)
                    run.log(f"w{w} {client} calibrate nginx rep {rep}: {run.brief(rec)}")
                    if rec["status"] == "ok":
                        sat.append(rec["load"]["msgs_per_s"])
                if not sat:
                    run.log(f"w{w} {client}: nginx calibration failed; skipping")
                    continue
                full = statistics.median(sat)
                meta.setdefault("saturated", {})[f"w{w}-{client}"] = full
                save()
                for frac in fractions:
                    rate = max(100, int(full * frac))
                    ctx = run.Ctx(args, os.path.join(sub, f"f{int(frac * 100):03d}"), b,
                                  {"rate": dict(base, rate=rate)}, "full")
                    for rep in range(a.reps):
                        for t in targets:
                            rec = measure_quiet(ctx, "rate", t, rep, a.retry_busy)
                            m = point_metrics(rec)
                            m.update({"workers": w, "client": client, "fraction": frac,
                                      "target": t, "rep": rep})
                            meta["points"].append(m)
                            save()
                            run.log(f"w{w} {client} {frac:.0%} {t:8s} rep {rep}: {rec['status']} "
                                    f"{run.brief(rec)} cpu/msg {m.get('cpu_us') or 0:.1f}us "
                                    f"(sys {m.get('sys_us') or 0:.1f})"
                                    + (f" !! {rec['error'][:200]}" if rec.get("error") else ""))
    except KeyboardInterrupt:
        meta["status"] = "interrupted"
    finally:
        procutil.REGISTRY.stop_all()
    meta.setdefault("status", "completed")
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    save()
    write_summary(out, meta)
    print(os.path.join(out, "summary.md"))
    return 0


KEYS = ["msgs_per_s", "cpu_us", "user_us", "sys_us", "p50_us", "p99_us", "ctxsw_per_msg",
        "syscalls_per_msg", "uring_enter_per_msg", "epoll_wait_per_msg"]


def write_summary(out: str, meta: dict) -> None:
    pts = meta["points"]
    lines = [f"# Open-loop sweep {meta['started']}", "",
             f"`{' '.join(meta['argv'])}`", "",
             f"{meta['connections']} connections, 64 B binary messages, {meta['duration']} s "
             f"measured per run, median of {meta['reps']} interleaved reps. Offered load as a "
             f"fraction of nginx's saturated ping-pong rate with the same client and workers "
             f"(`saturated` below). CPU per message is the proxy's (all its processes), "
             f"user + system.", ""]
    for key, sat in (meta.get("saturated") or {}).items():
        lines.append(f"- saturated nginx ping-pong, {key}: {sat:.0f} msg/s")
    lines.append("")
    groups = sorted({(p["workers"], p["client"]) for p in pts})
    for w, client in groups:
        lines += [f"## {w} worker{'s' if w > 1 else ''}, client {client}", "",
                  "| load | target | msg/s | CPU/msg µs | user | sys | p50 µs | p99 µs | ctxsw/msg "
                  "| syscalls/msg | io_uring_enter/msg | epoll_wait/msg | ringlb ÷ nginx CPU |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        series: dict[str, list] = {}
        fr = sorted({p["fraction"] for p in pts if p["workers"] == w and p["client"] == client})
        for f in fr:
            med = {}
            for t in meta["targets"]:
                sel = [p for p in pts if (p["workers"], p["client"], p["fraction"], p["target"])
                       == (w, client, f, t)]
                med[t] = {k: median_of(sel, k) for k in KEYS}
                med[t]["n_ok"] = sum(1 for p in sel if p.get("status") == "ok")
            ng = (med.get("nginx") or {}).get("cpu_us")
            for t in meta["targets"]:
                m = med[t]

                def f1(v, d=1):
                    return "-" if v is None else f"{v:.{d}f}"

                ratio = "-" if not (m.get("cpu_us") and ng) else f"{m['cpu_us'] / ng:.2f}"
                lines.append(f"| {f:.0%} | {t} | {f1(m['msgs_per_s'], 0)} | {f1(m['cpu_us'])} | "
                             f"{f1(m['user_us'])} | {f1(m['sys_us'])} | {f1(m['p50_us'], 0)} | "
                             f"{f1(m['p99_us'], 0)} | {f1(m['ctxsw_per_msg'], 2)} | "
                             f"{f1(m['syscalls_per_msg'], 2)} | {f1(m['uring_enter_per_msg'], 2)} | "
                             f"{f1(m['epoll_wait_per_msg'], 2)} | {ratio if t == 'ringlb' else ''} |")
                if m.get("cpu_us") is not None and m.get("msgs_per_s"):
                    series.setdefault(t, []).append((m["msgs_per_s"], m["cpu_us"]))
                if m.get("sys_us") is not None and m.get("msgs_per_s"):
                    series.setdefault(f"{t} sys", []).append((m["msgs_per_s"], m["sys_us"]))
        lines.append("")
        name = f"sweep-w{w}-{client}.svg"
        with open(os.path.join(out, name), "w") as fh:
            fh.write(svgplot.line_chart(
                f"proxy CPU per message vs load ({w} worker{'s' if w > 1 else ''}, {client})",
                "messages per second (achieved)", "µs of proxy CPU per message",
                sorted((k, sorted(v)) for k, v in series.items())))
        lines += [f"![sweep {w} {client}]({name})", ""]
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
