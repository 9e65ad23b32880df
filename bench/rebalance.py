#!/usr/bin/env python3
"""Moving live WebSocket sessions: scale-out and drain, over time.

    python3 bench/rebalance.py [--quick] [--targets ringlb,nginx,haproxy]
                               [--scenarios scaleout,drain] [--out DIR]

scaleout: N sessions (full: 5000) held by clients that reconnect when
  closed (bench/wsclients.py), through the target to two echo backends; then
  a third backend is added (ringlb: SIGHUP with `rebalance` on; nginx:
  SIGHUP; HAProxy: master-worker reload, SIGUSR2); 2 s later a few new
  sessions (full: 100) open, which go to C everywhere (the reload took:
  only the established sessions differ). Sampled every 0.5 s:
  established sessions per backend (`ss`), and the clients' new connections
  per second. nginx and HAProxy never move an established session; ringlb
  moves them at the configured rate until all three are within the
  threshold.
drain (ringlb): 2 x M sessions (full: M = 2000) on two backends, then one
  backend is drained: paced, `drain?close_rate=R` (full: 200/s), against an
  all-at-once cut (`close_rate=1000000`: every session told at once). Plotted:
  the reconnect rate the remaining backend sees, and sessions per backend.

Raw samples go to OUT/raw/*.json, plots to OUT/*.svg, numbers to
OUT/summary.md (generated from the raw data). Standard library only; uses
the helpers of run.py, procutil.py, targets.py and svgplot.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procutil  # noqa: E402
import svgplot  # noqa: E402
from procutil import Child, StartError, established_on_port, free_port, wait_tcp  # noqa: E402
from run import find_binary, log  # noqa: E402
from targets import find_program, render  # noqa: E402

FULL = {"sessions": 5000, "probe": 100, "threshold": 0.25, "rebalance_rate": 100, "before": 5, "after": 60,
        "drain_sessions": 2000, "drain_rate": 200, "drain_after": 30, "connect_rate": 1000,
        "workers": 2}
QUICK = {"sessions": 300, "probe": 10, "threshold": 0.25, "rebalance_rate": 50, "before": 2, "after": 10,
         "drain_sessions": 200, "drain_rate": 50, "drain_after": 8, "connect_rate": 500,
         "workers": 2}
CUT_RATE = 1_000_000
SAMPLE = 0.5


class Run:
    def __init__(self, args, p, bins, out):
        self.args, self.p, self.bins, self.out = args, p, bins, out
        self.raw = os.path.join(out, "raw")
        self.logs = os.path.join(out, "logs")
        self.configs = os.path.join(out, "configs")
        for d in (self.raw, self.logs, self.configs):
            os.makedirs(d, exist_ok=True)
        self.work = tempfile.mkdtemp(prefix="ringlb-rebalance-")


def start_echo(run: Run, tag: str, i: int) -> tuple[Child, int]:
    c = Child(f"echo{i}", [run.bins["ringlb-load"], "echo", "--listen", "127.0.0.1:0"],
              os.path.join(run.logs, f"{tag}-echo{i}.log"), capture_stdout=True)
    line = c.read_lines(1, timeout=10.0)[0]
    if not line.startswith("listening "):
        raise StartError(f"echo{i}: unexpected first line {line!r}")
    port = int(line.rsplit(":", 1)[1])
    wait_tcp(port, 10.0, c)
    return c, port


class Proxy:
    """A target in front of a list of backends, which can be reconfigured."""

    def __init__(self, run: Run, kind: str, tag: str, rebalance: bool):
        self.run, self.kind, self.tag, self.rebalance = run, kind, tag, rebalance
        self.port = free_port()
        self.admin_port = free_port()
        self.prefix = os.path.join(run.work, f"{tag}-{kind}")
        os.makedirs(self.prefix, exist_ok=True)
        self.child: Child | None = None
        self.config_path = ""

    def render(self, backends: list[int]) -> None:
        p = self.run.p
        values = {"port": self.port, "workers": p["workers"], "prefix": self.prefix,
                  "haproxy_maxconn": 9900, "admin_port": self.admin_port}
        if self.kind == "ringlb":
            values["servers"] = ", ".join(f'{{ addr = "127.0.0.1:{b}" }}' for b in backends)
            values["rebalance"] = (
                f"rebalance = {{ threshold = {p['threshold']}, rate = {p['rebalance_rate']} }}"
                if self.rebalance else "")
            name, ext = "rebalance-ringlb.toml.tmpl", "toml"
        elif self.kind == "nginx":
            values["servers"] = "\n".join(f"        server 127.0.0.1:{b};" for b in backends)
            name, ext = "rebalance-nginx.conf.tmpl", "conf"
        else:
            values["servers"] = "\n".join(f"    server echo{i + 1} 127.0.0.1:{b}"
                                          for i, b in enumerate(backends))
            name, ext = "rebalance-haproxy.cfg.tmpl", "cfg"
        text = render(name, values)
        self.config_path = os.path.join(self.prefix, f"{self.kind}.{ext}")
        with open(self.config_path, "w") as f:
            f.write(text)
        with open(os.path.join(self.run.configs, f"{self.tag}-{self.kind}-{len(backends)}.{ext}"), "w") as f:
            f.write(text)

    def start(self, backends: list[int]) -> None:
        self.render(backends)
        env = dict(os.environ)
        if self.kind == "ringlb":
            cmd = [self.run.bins["ringlb"], "run", "--config", self.config_path]
            env.setdefault("RUST_LOG", "info")
        elif self.kind == "nginx":
            for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                os.makedirs(os.path.join(self.prefix, sub), exist_ok=True)
            cmd = [self.run.bins["nginx"], "-p", self.prefix + "/", "-c", self.config_path,
                   "-e", os.path.join(self.prefix, "error.log"), "-g", "daemon off;"]
        else:
            cmd = [self.run.bins["haproxy"], "-W", "-db", "-f", self.config_path]
        self.child = Child(self.kind, cmd, os.path.join(self.run.logs, f"{self.tag}-{self.kind}.log"),
                           env=env)
        wait_tcp(self.port, 10.0, self.child)

    def reconfigure(self, backends: list[int]) -> None:
        """The new backend list, applied the way each proxy reloads."""
        self.render(backends)
        sig = signal.SIGUSR2 if self.kind == "haproxy" else signal.SIGHUP
        os.kill(self.child.pid, sig)

    def admin(self, path: str) -> str:
        req = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method="POST",
                                     headers={"X-Ringlb-Admin": "1"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


class Clients:
    """bench/wsclients.py in its own process; its report lines collected."""

    def __init__(self, run: Run, tag: str, port: int, sessions: int):
        cmd = [sys.executable, os.path.join(HERE, "wsclients.py"), "--port", str(port),
               "--sessions", str(sessions), "--connect-rate", str(run.p["connect_rate"])]
        self.child = Child("wsclients", cmd, os.path.join(run.logs, f"{tag}-clients.log"),
                           capture_stdout=True)
        self.lines: list[dict] = []
        self.t_start = time.monotonic()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for raw in self.child.proc.stdout:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                pass

    def last(self) -> dict:
        return self.lines[-1] if self.lines else {}

    def stop(self):
        self.child.stop(grace=2.0)


class Sampler:
    """Established sessions per backend port, every SAMPLE seconds."""

    def __init__(self, ports: list[int], t0: float):
        self.ports, self.t0 = ports, t0
        self.samples: list[tuple[float, list[int]]] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while not self.stop_flag.is_set():
            t = time.monotonic() - self.t0
            self.samples.append((round(t, 3), [established_on_port(p) for p in self.ports]))
            self.stop_flag.wait(SAMPLE)

    def stop(self):
        self.stop_flag.set()
        self.thread.join(timeout=5)


def wait_sessions(ports: list[int], want: int, timeout: float, clients: Clients) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(established_on_port(p) for p in ports) >= want:
            return
        if not clients.child.alive():
            raise StartError(f"clients exited: {clients.child.log_tail()}")
        time.sleep(0.25)
    raise StartError(f"only {sum(established_on_port(p) for p in ports)} of {want} sessions "
                     f"after {timeout}s; clients: {clients.last()}")


def scaleout(run: Run, target: str) -> dict:
    p = run.p
    tag = f"scaleout-{target}"
    started: list = []
    try:
        echoes = [start_echo(run, tag, i) for i in (1, 2, 3)]
        started += [c for c, _ in echoes]
        ports = [port for _, port in echoes]
        proxy = Proxy(run, target, tag, rebalance=True)
        proxy.start(ports[:2])
        started.append(proxy)
        t0 = time.monotonic()
        sampler = Sampler(ports, t0)
        clients = Clients(run, tag, proxy.port, p["sessions"])
        started.append(clients)
        wait_sessions(ports[:2], p["sessions"], p["sessions"] / p["connect_rate"] + 60, clients)
        time.sleep(p["before"])
        t_add = time.monotonic() - t0
        log(f"{target}: {p['sessions']} sessions on A and B; adding C")
        proxy.reconfigure(ports)
        # New sessions after the reload show that it took (they go to C
        # everywhere); only the established ones differ.
        time.sleep(2)
        t_probe = time.monotonic() - t0
        probe = Clients(run, f"{tag}-probe", proxy.port, p["probe"])
        started.append(probe)
        time.sleep(max(0.0, p["after"] - 2))
        sampler.stop()
        rec = {"scenario": "scaleout", "target": target, "params": p, "t_add": t_add,
               "t_probe": t_probe, "probe": probe.last(),
               "backends": ["A", "B", "C"], "samples": sampler.samples,
               "clients": [dict(line, t=round(line["t"] + (clients.t_start - t0), 3))
                           for line in clients.lines]}
        return rec
    finally:
        for c in reversed(started):
            c.stop()


def drain(run: Run, mode: str) -> dict:
    p = run.p
    tag = f"drain-{mode}"
    started: list = []
    try:
        echoes = [start_echo(run, tag, i) for i in (1, 2)]
        started += [c for c, _ in echoes]
        ports = [port for _, port in echoes]
        proxy = Proxy(run, "ringlb", tag, rebalance=False)
        proxy.start(ports)
        started.append(proxy)
        t0 = time.monotonic()
        sampler = Sampler(ports, t0)
        n = 2 * p["drain_sessions"]
        clients = Clients(run, tag, proxy.port, n)
        started.append(clients)
        wait_sessions(ports, n, n / p["connect_rate"] + 60, clients)
        time.sleep(p["before"])
        rate = p["drain_rate"] if mode == "paced" else CUT_RATE
        t_drain = time.monotonic() - t0
        held = established_on_port(ports[0])
        log(f"drain {mode}: backend A holds {held}; drain?close_rate={rate}")
        proxy.admin(f"/backends/echo/127.0.0.1:{ports[0]}/drain?close_rate={rate}")
        time.sleep(p["drain_after"])
        sampler.stop()
        return {"scenario": "drain", "mode": mode, "params": p, "t_drain": t_drain,
                "close_rate": rate, "held": held, "backends": ["A (drained)", "B"],
                "samples": sampler.samples,
                "clients": [dict(line, t=round(line["t"] + (clients.t_start - t0), 3))
                            for line in clients.lines]}
    finally:
        for c in reversed(started):
            c.stop()


def rates(clients: list[dict]) -> list[tuple[float, float]]:
    """New connections per second between consecutive client reports."""
    out = []
    for a, b in zip(clients, clients[1:]):
        dt = b["t"] - a["t"]
        if dt > 0:
            out.append((b["t"], (b["connects"] - a["connects"]) / dt))
    return out


def report(out: str, recs: list[dict]) -> None:
    lines = ["# Moving live sessions: scale-out and drain", "",
             f"Generated by bench/rebalance.py from raw/*.json ({datetime.date.today()}).", ""]
    scale = [r for r in recs if r["scenario"] == "scaleout"]
    if scale:
        p = scale[0]["params"]
        lines += ["## Scale-out", "",
                  f"{p['sessions']} sessions on backends A and B, then C added "
                  f"(ringlb: rebalance threshold {p['threshold']}, rate {p['rebalance_rate']}/s); "
                  f"{p['probe']} new sessions 2 s after C was added.", "",
                  "| target | A, B, C at the end | sessions moved (Close frames) | peak new connections/s after C |",
                  "|---|---|---|---|"]
        for r in scale:
            final = r["samples"][-1][1] if r["samples"] else []
            after = [v for t, v in rates(r["clients"]) if t > r["t_add"]]
            moved = r["clients"][-1]["close_frames"] if r["clients"] else 0
            lines.append(f"| {r['target']} | {', '.join(map(str, final))} | {moved} | "
                         f"{max(after) if after else 0:.0f} |")
            series = [(name, [(t, c[i]) for t, c in r["samples"]]) for i, name in enumerate(r["backends"])]
            with open(os.path.join(out, f"scaleout-sessions-{r['target']}.svg"), "w") as f:
                f.write(svgplot.line_chart(f"Sessions per backend: {r['target']}", "seconds",
                                           "established sessions", series, [(r["t_add"], "C added")]))
        with open(os.path.join(out, "scaleout-connects.svg"), "w") as f:
            f.write(svgplot.line_chart("New connections per second (clients)", "seconds",
                                       "connections/s", [(r["target"], rates(r["clients"])) for r in scale],
                                       [(scale[0]["t_add"], "C added")],
                                       note="before C: the clients' first connects"))
        lines += ["", "![sessions per backend, ringlb](scaleout-sessions-ringlb.svg)",
                  "![new connections per second](scaleout-connects.svg)", ""]
    dr = [r for r in recs if r["scenario"] == "drain"]
    if dr:
        p = dr[0]["params"]
        lines += ["## Drain", "",
                  f"Backend A holds about {p['drain_sessions']} of {2 * p['drain_sessions']} sessions; "
                  f"it is drained at {p['drain_rate']}/s (paced) or all at once "
                  f"(close_rate={CUT_RATE}). Reconnects land on B.", "",
                  "| mode | sessions on A at the drain | peak reconnects/s | seconds until A is empty |",
                  "|---|---|---|---|"]
        for r in dr:
            after = [v for t, v in rates(r["clients"]) if t > r["t_drain"]]
            empty = next((t - r["t_drain"] for t, c in r["samples"] if t > r["t_drain"] and c[0] == 0), None)
            lines.append(f"| {r['mode']} | {r['held']} | {max(after) if after else 0:.0f} | "
                         f"{'%.1f' % empty if empty is not None else 'not within the run'} |")
            series = [(name, [(t, c[i]) for t, c in r["samples"]]) for i, name in enumerate(r["backends"])]
            with open(os.path.join(out, f"drain-sessions-{r['mode']}.svg"), "w") as f:
                f.write(svgplot.line_chart(f"Sessions per backend: drain, {r['mode']}", "seconds",
                                           "established sessions", series, [(r["t_drain"], "drain")]))
        with open(os.path.join(out, "drain-reconnects.svg"), "w") as f:
            f.write(svgplot.line_chart("Reconnects per second on the remaining backend", "seconds",
                                       "connections/s",
                                       [(f"paced {r['close_rate']}/s" if r["mode"] == "paced" else "all at once",
                                         rates(r["clients"])) for r in dr],
                                       [(dr[0]["t_drain"], "drain")],
                                       note="before the drain: the clients' first connects"))
        lines += ["", "![reconnects per second](drain-reconnects.svg)",
                  "![sessions, paced](drain-sessions-paced.svg)", ""]
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny scale (proves the harness runs)")
    ap.add_argument("--targets", default="ringlb,nginx,haproxy")
    ap.add_argument("--scenarios", default="scaleout,drain")
    ap.add_argument("--out", default=None)
    ap.add_argument("--bin-dir", default=None, help="where ringlb and ringlb-load are")
    args = ap.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    bins = {"ringlb": find_binary("ringlb", args.bin_dir),
            "ringlb-load": find_binary("ringlb-load", args.bin_dir),
            "nginx": find_program("nginx"), "haproxy": find_program("haproxy")}
    targets = [t for t in args.targets.split(",") if t]
    scenarios = [s for s in args.scenarios.split(",") if s]
    missing = [n for n in ["ringlb", "ringlb-load"] + [t for t in targets if t != "ringlb"] if not bins.get(n)]
    if missing:
        print(f"missing: {', '.join(missing)} (cargo build --release --workspace; "
              f"apt-get install -y nginx haproxy)", file=sys.stderr)
        return 2
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = args.out or os.path.join(HERE, "results", f"{stamp}-{socket.gethostname()}-rebalance"
                                   + ("-quick" if args.quick else ""))
    run = Run(args, p, bins, out)
    log(f"results -> {out}")
    recs = []
    try:
        if "scaleout" in scenarios:
            for t in targets:
                rec = scaleout(run, t)
                recs.append(rec)
                with open(os.path.join(run.raw, f"scaleout-{t}.json"), "w") as f:
                    json.dump(rec, f)
        if "drain" in scenarios:
            for mode in ("paced", "cut"):
                rec = drain(run, mode)
                recs.append(rec)
                with open(os.path.join(run.raw, f"drain-{mode}.json"), "w") as f:
                    json.dump(rec, f)
    finally:
        procutil.REGISTRY.stop_all()
    report(out, recs)
    log(f"wrote {os.path.join(out, 'summary.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
