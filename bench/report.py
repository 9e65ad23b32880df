#!/usr/bin/env python3
"""Turn a results dir's raw JSON into summary.md, SETUP.md and SVG plots.

    python3 bench/report.py RESULTS_DIR [--docs docs/BENCHMARKS.md]

Everything in summary.md and the plots is computed from RESULTS_DIR/raw/*.json
and RESULTS_DIR/run.json; nothing is pasted by hand.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import svgplot  # noqa: E402
from targets import STATIC_SCENARIOS, applies  # noqa: E402
from targets import TLS_EXPECTED, is_tls  # noqa: E402

REPO = os.path.dirname(HERE)
ANCHORS = ["nginx", "nginx-tuned", "haproxy"]
TLS_ANCHORS = ["nginx-tls", "haproxy-tls"]
HANDSHAKE_SCENARIOS = ("handshake", "handshake_resumed")
LAT_SCENARIOS = ("pingpong", "rate", "pingpong_pin")

# metric key -> (label, unit, lower_is_better)
METRICS = {
    "msgs_per_s": ("msg/s", "msg/s", False),
    "p50_us": ("p50", "µs", True),
    "p90_us": ("p90", "µs", True),
    "p99_us": ("p99", "µs", True),
    "p999_us": ("p99.9", "µs", True),
    "max_us": ("max", "µs", True),
    "proxy_cpu_us_per_msg": ("proxy CPU/msg", "µs", True),
    "proxy_sys_us_per_msg": ("of which kernel", "µs", True),
    "proxy_cpu_cores": ("proxy CPU", "cores", True),
    "proxy_rss_mb": ("proxy RSS", "MB", True),
    "backend_cpu_cores": ("backends CPU", "cores", True),
    "load_cpu_cores": ("load tool CPU", "cores", True),
    "conns_per_s": ("conn/s", "conn/s", False),
    "hs_p50_us": ("handshake p50", "µs", True),
    "hs_p99_us": ("handshake p99", "µs", True),
    "proxy_cpu_us_per_conn": ("proxy CPU/conn", "µs", True),
    "proxy_sys_us_per_conn": ("of which kernel", "µs", True),
    "mb_per_s": ("MB/s", "MB/s", False),
    "proxy_cpu_s_per_gb": ("proxy CPU/GB", "s", True),
    "proxy_sys_s_per_gb": ("of which kernel", "s", True),
    "held": ("conns held", "", False),
    "alive": ("alive at end", "", False),
    "proxy_rss_per_conn_b": ("proxy RSS/conn", "B", True),
    "machine_per_conn_b": ("machine mem/conn", "B", True),
    "machine_raw_per_conn_b": ("machine mem/conn uncorrected", "B", True),
    "proxy_rss_idle_mb": ("proxy RSS before", "MB", True),
    "proxy_rss_held_mb": ("proxy RSS held", "MB", True),
    "foreign_cpu_cores": ("other procs CPU", "cores", True),
    "threads_before": ("threads before", "", True),
    "threads_held": ("threads held", "", True),
    "proxy_fds_held": ("proxy fds held", "", True),
    "requests_per_s": ("req/s", "req/s", False),
    "proxy_cpu_us_per_req": ("server CPU/request", "µs", True),
    "reconnects": ("reconnects", "", True),
    "closes_unannounced": ("silent closes", "", True),
    "tls_resumed_pct": ("TLS resumed", "%", False),
}

TABLES = {
    "pingpong": ["msgs_per_s", "p50_us", "p99_us", "proxy_cpu_us_per_msg", "proxy_sys_us_per_msg",
                 "proxy_cpu_cores", "proxy_rss_mb", "backend_cpu_cores", "load_cpu_cores", "foreign_cpu_cores"],
    "pingpong_pin": ["msgs_per_s", "p50_us", "p99_us", "proxy_cpu_us_per_msg", "proxy_cpu_cores",
                     "backend_cpu_cores", "load_cpu_cores", "foreign_cpu_cores"],
    "rate": ["msgs_per_s", "p50_us", "p90_us", "p99_us", "p999_us", "max_us",
             "proxy_cpu_us_per_msg", "proxy_cpu_cores", "foreign_cpu_cores"],
    "handshake": ["conns_per_s", "hs_p50_us", "hs_p99_us", "proxy_cpu_us_per_conn",
                  "proxy_sys_us_per_conn", "proxy_cpu_cores", "backend_cpu_cores", "load_cpu_cores", "foreign_cpu_cores"],
    "handshake_resumed": ["conns_per_s", "tls_resumed_pct", "hs_p50_us", "hs_p99_us", "proxy_cpu_us_per_conn",
                          "proxy_sys_us_per_conn", "proxy_cpu_cores", "backend_cpu_cores", "load_cpu_cores",
                          "foreign_cpu_cores"],
    "bulk": ["mb_per_s", "proxy_cpu_s_per_gb", "proxy_sys_s_per_gb", "proxy_cpu_cores", "proxy_rss_mb",
             "backend_cpu_cores", "load_cpu_cores", "foreign_cpu_cores"],
    "static_small": ["requests_per_s", "p50_us", "p99_us", "proxy_cpu_us_per_req", "proxy_cpu_cores",
                     "proxy_rss_mb", "load_cpu_cores", "reconnects", "closes_unannounced",
                     "foreign_cpu_cores"],
    "static_large": ["mb_per_s", "requests_per_s", "p50_us", "p99_us", "proxy_cpu_s_per_gb",
                     "proxy_cpu_cores", "proxy_rss_mb", "load_cpu_cores", "reconnects",
                     "foreign_cpu_cores"],
    "idle": ["held", "alive", "proxy_rss_per_conn_b", "machine_per_conn_b", "machine_raw_per_conn_b", "proxy_rss_idle_mb",
             "proxy_rss_held_mb", "threads_before", "threads_held", "proxy_fds_held"],
}
RATIO_METRICS = {
    "pingpong": ["msgs_per_s", "p99_us", "proxy_cpu_us_per_msg"],
    "pingpong_pin": ["msgs_per_s", "p99_us", "proxy_cpu_us_per_msg"],
    "rate": ["p50_us", "p99_us", "p999_us", "proxy_cpu_us_per_msg"],
    "handshake": ["conns_per_s", "proxy_cpu_us_per_conn"],
    "handshake_resumed": ["conns_per_s", "proxy_cpu_us_per_conn"],
    "bulk": ["mb_per_s", "proxy_cpu_s_per_gb"],
    "idle": ["proxy_rss_per_conn_b", "machine_per_conn_b"],
    "static_small": ["requests_per_s", "p99_us", "proxy_cpu_us_per_req"],
    "static_large": ["mb_per_s", "proxy_cpu_s_per_gb"],
}
SCENARIO_TITLES = {
    "pingpong": "Ping-pong (closed loop)",
    "pingpong_pin": "Ping-pong, proxy pinned to 1 core (load + backends on the other)",
    "rate": "Open-loop fixed rate (latency at equal load)",
    "handshake": "Handshake rate (connect, upgrade, close)",
    "handshake_resumed": "TLS handshake rate, sessions resumed (connect, resumed TLS handshake, upgrade, close)",
    "bulk": "Bulk 1 MiB messages",
    "idle": "Idle connections (memory per connection)",
    "static_small": "Static file, 2 KB (keep-alive GETs)",
    "static_large": "Static file, 10 MiB (keep-alive GETs)",
}


# ------------------------------------------------------------------ loading

def load_run(out: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(out, "run.json")) as f:
        meta = json.load(f)
    recs = []
    for p in sorted(glob.glob(os.path.join(out, "raw", "*.json"))):
        with open(p) as f:
            recs.append(json.load(f))
    return meta, recs


def metrics(rec: dict) -> dict:
    """Derived metrics of one raw record (None where not applicable)."""
    s = rec["scenario"]
    L = rec.get("load") or {}
    cpu = rec.get("cpu") or {}
    px = cpu.get("proxy")
    m: dict = {}
    if cpu.get("backends"):
        m["backend_cpu_cores"] = cpu["backends"]["cpu_cores"]
    if cpu.get("load"):
        m["load_cpu_cores"] = cpu["load"]["cpu_cores"]
    if rec.get("foreign_cpu_cores") is not None:
        m["foreign_cpu_cores"] = rec["foreign_cpu_cores"]
    if px:
        m["proxy_cpu_cores"] = px["cpu_cores"]
        m["proxy_rss_mb"] = px["rss_kb_max"] / 1024
    # CPU of everything else this run made busy (load tool, backends, and
    # other processes: mostly ksoftirqd's share of the TCP work)
    rest = [cpu.get(k, {}).get("cpu_cores") if cpu.get(k) else None for k in ("backends", "load")]
    rest.append(rec.get("foreign_cpu_cores"))
    rest_cores = sum(rest) if None not in rest and cpu.get("backends") else None
    if s in LAT_SCENARIOS:
        rate = L.get("msgs_per_s")
        m["msgs_per_s"] = rate
        lat = L.get("latency_us") or {}
        for k in ("p50", "p90", "p99", "p999", "max"):
            m[f"{k}_us"] = lat.get(k)
        if px and rate:
            m["proxy_cpu_us_per_msg"] = px["cpu_cores"] / rate * 1e6
            if "sys_cores" in px:
                m["proxy_sys_us_per_msg"] = px["sys_cores"] / rate * 1e6
        if rest_cores is not None and rate:
            m["rest_cpu_per_unit"] = rest_cores / rate * 1e6
    elif s in HANDSHAKE_SCENARIOS:
        m["conns_per_s"] = L.get("handshakes_per_s")
        t = L.get("tls")
        if isinstance(t, dict) and t.get("handshakes"):
            m["tls_resumed_pct"] = 100.0 * (t.get("resumed") or 0) / t["handshakes"]
        hl = L.get("handshake_latency_us") or {}
        m["hs_p50_us"] = hl.get("p50")
        m["hs_p99_us"] = hl.get("p99")
        n = L.get("handshakes")
        if px and n:
            # whole-run CPU (connect + upgrade + close) per completed handshake
            m["proxy_cpu_us_per_conn"] = px["cpu_s"] / n * 1e6
            if "sys_s" in px:
                m["proxy_sys_us_per_conn"] = px["sys_s"] / n * 1e6
        if rest_cores is not None and m["conns_per_s"]:
            m["rest_cpu_per_unit"] = rest_cores / m["conns_per_s"] * 1e6
    elif s == "bulk":
        el = L.get("elapsed_s")
        mbps = L.get("bytes") / el / 1e6 if L.get("bytes") and el else L.get("mb_per_s")
        m["mb_per_s"] = mbps
        if px and mbps:
            m["proxy_cpu_s_per_gb"] = px["cpu_cores"] / (mbps / 1000.0)
            if "sys_cores" in px:
                m["proxy_sys_s_per_gb"] = px["sys_cores"] / (mbps / 1000.0)
        if rest_cores is not None and mbps:
            m["rest_cpu_per_unit"] = rest_cores / (mbps / 1000.0)
    elif s in STATIC_SCENARIOS:
        el = L.get("elapsed_s")
        rps = L.get("requests_per_s", L.get("msgs_per_s"))
        mbps = L.get("bytes") / el / 1e6 if L.get("bytes") and el else L.get("mb_per_s")
        m["requests_per_s"] = rps
        m["mb_per_s"] = mbps
        lat = L.get("latency_us") or {}
        for k in ("p50", "p90", "p99", "p999", "max"):
            m[f"{k}_us"] = lat.get(k)
        m["reconnects"] = L.get("reconnects")
        m["closes_unannounced"] = (L.get("server_closes") or {}).get("unannounced")
        if px and rps:
            m["proxy_cpu_us_per_req"] = px["cpu_cores"] / rps * 1e6
        if px and mbps:
            m["proxy_cpu_s_per_gb"] = px["cpu_cores"] / (mbps / 1000.0)
    elif s == "idle":
        i = rec.get("idle") or {}
        conns = L.get("connections") or {}
        n = i.get("established_front") or 0
        m["held"] = n
        m["alive"] = conns.get("alive")
        before = rec.get("proxy_before")
        held = i.get("proxy")
        if n and i.get("all_established"):
            if before and held:
                m["proxy_rss_per_conn_b"] = (held["rss_kb"] - before["rss_kb"]) * 1024 / n
            if i.get("machine_used_kb") and rec.get("machine_used_kb_before"):
                d = i["machine_used_kb"] - rec["machine_used_kb_before"]
                m["machine_raw_per_conn_b"] = d * 1024 / n
                if i.get("others_anon_kb") is not None and rec.get("others_anon_kb_before") is not None:
                    # correct for unrelated processes that grew/shrank meanwhile
                    d -= i["others_anon_kb"] - rec["others_anon_kb_before"]
                m["machine_per_conn_b"] = d * 1024 / n
        if before:
            m["proxy_rss_idle_mb"] = before["rss_kb"] / 1024
            m["threads_before"] = before["threads"]
        if held:
            m["proxy_rss_held_mb"] = held["rss_kb"] / 1024
            m["threads_held"] = held["threads"]
            m["proxy_fds_held"] = held.get("fds")
    return m


def aggregate(recs: list[dict]) -> dict:
    """(scenario, target) -> {"n_ok", "n", "errors", "values": {metric: [..]}}"""
    agg: dict = {}
    for r in recs:
        a = agg.setdefault((r["scenario"], r["target"]),
                           {"n": 0, "n_ok": 0, "errors": [], "values": {}, "recs": []})
        a["n"] += 1
        a["recs"].append(r)
        if r["status"] == "ok":
            a["n_ok"] += 1
        if r.get("error"):
            a["errors"].append(f"rep {r['rep']}: {r['error']}")
        if r["status"] in ("ok", "errors"):
            for k, v in metrics(r).items():
                if v is not None:
                    a["values"].setdefault(k, []).append(v)
    return agg


def med(agg, scenario, target, metric):
    a = agg.get((scenario, target))
    if not a:
        return None
    v = a["values"].get(metric)
    return statistics.median(v) if v else None


def mmm(agg, scenario, target, metric):
    a = agg.get((scenario, target))
    v = (a or {}).get("values", {}).get(metric)
    if not v:
        return None
    return (statistics.median(v), min(v), max(v))


# ------------------------------------------------------------------ formatting

def f3(v) -> str:
    if v is None:
        return "—"
    a = abs(v)
    if float(v).is_integer() and a < 1e5:
        return f"{v:.0f}"
    if a >= 1e5:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def cell(t) -> str:
    if t is None:
        return "—"
    m, lo, hi = t
    if lo == hi:
        return f3(m)
    return f"{f3(m)} ({f3(lo)}..{f3(hi)})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# ------------------------------------------------------------------ goals

def best_anchor(agg, scenario, metric, lower_better, targets):
    vals = [(t, med(agg, scenario, t, metric)) for t in ANCHORS if t in targets]
    vals = [(t, v) for t, v in vals if v is not None]
    if not vals:
        return None, None
    return (min if lower_better else max)(vals, key=lambda x: x[1])


def goals(agg, targets) -> list[dict]:
    g = []

    def add(what, measured, op, limit, detail):
        if measured is None or limit is None:
            status = "n/a (missing data)"
        else:
            ok = measured <= limit if op == "<=" else measured >= limit
            status = "**met**" if ok else "**not met**"
        g.append({"what": what, "measured": measured, "op": op, "limit": limit,
                  "status": status, "detail": detail})

    r = med(agg, "pingpong", "ringlb", "proxy_cpu_us_per_msg")
    n = med(agg, "pingpong", "nginx", "proxy_cpu_us_per_msg")
    add("ping-pong 64 B: ringlb proxy CPU per round trip ≤ 0.5× nginx", ratio(r, n), "<=", 0.5,
        f"ringlb {f3(r)} µs vs nginx {f3(n)} µs")
    r = med(agg, "pingpong", "ringlb", "msgs_per_s")
    n = med(agg, "pingpong", "nginx", "msgs_per_s")
    add("ping-pong 64 B: ringlb msg/s ≥ 1.3× nginx", ratio(r, n), ">=", 1.3,
        f"ringlb {f3(r)} vs nginx {f3(n)} msg/s")
    r = med(agg, "handshake", "ringlb", "proxy_cpu_us_per_conn")
    h = med(agg, "handshake", "haproxy", "proxy_cpu_us_per_conn")
    add("handshake: ringlb proxy CPU per connection ≤ 0.5× HAProxy", ratio(r, h), "<=", 0.5,
        f"ringlb {f3(r)} µs vs haproxy {f3(h)} µs")
    r = med(agg, "handshake", "ringlb", "conns_per_s")
    h = med(agg, "handshake", "haproxy", "conns_per_s")
    add("handshake: ringlb conn/s ≥ 1.5× HAProxy", ratio(r, h), ">=", 1.5,
        f"ringlb {f3(r)} vs haproxy {f3(h)} conn/s")
    r = med(agg, "bulk", "ringlb", "mb_per_s")
    bt, bv = best_anchor(agg, "bulk", "mb_per_s", False, targets)
    add("bulk 1 MiB: ringlb MB/s ≥ 2× best anchor", ratio(r, bv), ">=", 2.0,
        f"ringlb {f3(r)} vs best anchor {bt} {f3(bv)} MB/s")
    r = med(agg, "bulk", "ringlb", "proxy_cpu_s_per_gb")
    bt, bv = best_anchor(agg, "bulk", "proxy_cpu_s_per_gb", True, targets)
    add("bulk 1 MiB: ringlb proxy CPU per GB ≤ 0.5× best anchor", ratio(r, bv), "<=", 0.5,
        f"ringlb {f3(r)} s vs best anchor {bt} {f3(bv)} s")
    r = med(agg, "idle", "ringlb", "proxy_rss_per_conn_b")
    add("idle: ringlb proxy RSS ≤ 1 KB per connection (bytes)", r, "<=", 1024,
        f"ringlb {f3(r)} B/conn")
    r = med(agg, "idle", "ringlb", "machine_per_conn_b")
    h = med(agg, "idle", "haproxy", "machine_per_conn_b")
    # A non-positive delta means other activity on the machine swamped the signal.
    pos = r is not None and h is not None and r > 0 and h > 0
    add("idle: whole-machine memory per connection ≤ 0.7× HAProxy", ratio(r, h) if pos else None, "<=", 0.7,
        f"ringlb {f3(r)} B vs haproxy {f3(h)} B per conn" + ("" if pos or r is None or h is None
                                                               else " (non-positive: swamped by noise)"))
    tb = med(agg, "idle", "ringlb", "threads_before")
    th = med(agg, "idle", "ringlb", "threads_held")
    extra = (th - tb) if tb is not None and th is not None else None
    add("idle: zero extra threads with connections held", extra, "<=", 0,
        f"ringlb threads idle {f3(tb)} → with connections {f3(th)}")
    r = med(agg, "rate", "ringlb", "p99_us")
    n = med(agg, "rate", "nginx", "p99_us")
    add("open loop, equal load: ringlb p99 ≤ nginx p99 (ratio)", ratio(r, n), "<=", 1.0,
        f"ringlb {f3(r)} µs vs nginx {f3(n)} µs")
    return g


def best_of(agg, scenario, metric, lower_better, candidates):
    """(target, median) of the best of `candidates` present in the run."""
    vals = [(t, med(agg, scenario, t, metric)) for t in candidates]
    vals = [(t, v) for t, v in vals if v is not None]
    if not vals:
        return None, None
    return (min if lower_better else max)(vals, key=lambda x: x[1])


def tls_goals(agg, targets, meta) -> list[dict]:
    """Issue #15's targets: ringlb-tls against nginx-tls and HAProxy-tls,
    all terminating TLS 1.3 / AES-128-GCM with the same P-256 certificate."""
    g = []
    skipped = (meta.get("skipped_targets") or {}).get("ringlb-tls")
    anchors = [t for t in TLS_ANCHORS if t in targets]

    def add(what, measured, op, limit, detail):
        if op is None:
            status = "(no target)"
        elif measured is None or limit is None:
            status = "n/a (ringlb-tls skipped)" if skipped else "n/a (missing data)"
        else:
            ok = measured <= limit if op == "<=" else measured >= limit
            status = "**met**" if ok else "**not met**"
        g.append({"what": what, "measured": measured, "op": op, "limit": limit,
                  "status": status, "detail": detail})

    def vs_best(what, scenario, metric, limit, unit):
        r = med(agg, scenario, "ringlb-tls", metric)
        bt, bv = best_of(agg, scenario, metric, True, anchors)
        others = ", ".join(f"{t} {f3(med(agg, scenario, t, metric))}" for t in anchors)
        detail = f"ringlb-tls {f3(r)} {unit}; {others} {unit} (better: {bt})"
        # A memory delta at or below zero means other activity on the
        # machine swamped the signal: no ratio then.
        noise = (r is not None and r <= 0) or (bv is not None and bv <= 0)
        if noise:
            detail += " (non-positive: swamped by noise)"
        add(what, None if noise else ratio(r, bv), "<=" if limit is not None else None, limit, detail)

    vs_best("TLS full handshake: ringlb-tls proxy CPU per connection ≤ 0.8× the better of nginx-tls "
            "and haproxy-tls", "handshake", "proxy_cpu_us_per_conn", 0.8, "µs")
    r = med(agg, "pingpong", "ringlb-tls", "proxy_cpu_us_per_msg")
    n = med(agg, "pingpong", "nginx-tls", "proxy_cpu_us_per_msg")
    add("TLS ping-pong 64 B: ringlb-tls proxy CPU per message ≤ 0.7× nginx-tls", ratio(r, n), "<=", 0.7,
        f"ringlb-tls {f3(r)} µs vs nginx-tls {f3(n)} µs")
    r = med(agg, "idle", "ringlb-tls", "proxy_rss_per_conn_b")
    add("idle TLS: ringlb-tls proxy RSS ≤ 2 KB per session (bytes)", r, "<=", 2048, f"ringlb-tls {f3(r)} B/session")
    vs_best("idle TLS: ringlb-tls proxy RSS per session ≤ 0.5× the better anchor", "idle",
            "proxy_rss_per_conn_b", 0.5, "B")
    vs_best("TLS bulk 1 MiB: ringlb-tls proxy CPU per GB ≤ 0.9× the better anchor", "bulk",
            "proxy_cpu_s_per_gb", 0.9, "s")
    # Measured by the same run, with no target in the issue:
    vs_best("TLS resumed handshake: ringlb-tls proxy CPU per connection ÷ the better anchor",
            "handshake_resumed", "proxy_cpu_us_per_conn", None, "µs")
    vs_best("idle TLS: whole-machine memory per session ÷ the better anchor", "idle",
            "machine_per_conn_b", None, "B")
    return g


def tls_section(agg, meta, recs, targets) -> list[str]:
    """Targets of issue #15 and what every TLS target negotiated."""
    L = ["## TLS targets (issue #15)", ""]
    tl = meta.get("tls") or {}
    if tl:
        L.append(f"Certificate: {tl.get('certificate')}. Load tool: `--tls --ca ca.pem "
                 f"{' '.join(tl.get('load_flags') or [])}`; full handshakes with `--no-tls-resume`, "
                 "every other scenario with `--tls-resume`. Every TLS row must negotiate "
                 f"`{tl.get('expected')}` (checked per run; a row that did not is marked as errors).")
        L.append("")
    for t, why in (meta.get("skipped_targets") or {}).items():
        L.append(f"**{t} skipped:** {why}.")
        L.append("")
    L.append("| target | measured | limit | status | detail |")
    L.append("|---|---|---|---|---|")
    for g in tls_goals(agg, targets, meta):
        lim = f"{g['op']} {f3(g['limit'])}" if g["op"] else "—"
        L.append(f"| {g['what']} | {f3(g['measured'])} | {lim} | {g['status']} | {g['detail']} |")
    L.append("")
    rows = []
    for t in [t for t in targets if is_tls(t)]:
        neg: dict = {}
        full = resumed = 0
        for r in recs:
            if r["target"] != t or not isinstance((r.get("load") or {}).get("tls"), dict):
                continue
            lt = r["load"]["tls"]
            full += lt.get("full") or 0
            resumed += lt.get("resumed") or 0
            for k, n in (lt.get("negotiated") or {}).items():
                neg[k] = neg.get(k, 0) + n
        if neg or full or resumed:
            shown = "; ".join(f"`{k}` × {n}" + ("" if k == TLS_EXPECTED else " **(unexpected)**")
                              for k, n in sorted(neg.items()))
            rows.append(f"| {t} | {full} | {resumed} | {shown} |")
    if rows:
        L += ["TLS handshakes made by the load tool over the whole run:", "",
              "| target | full | resumed | negotiated |", "|---|---|---|---|"] + rows + [""]
    return L


def kernel_floor(agg, targets) -> list[str]:
    """The CPU targets split into kernel and user time: with the same
    system calls and no user-space time at all, ringlb could not go below
    its kernel time, so kernel ÷ anchor's total is the floor of the ratio."""
    rows = []
    specs = [("ping-pong CPU/msg ≤ 0.5× nginx", "pingpong", "proxy_cpu_us_per_msg",
              "proxy_sys_us_per_msg", "nginx", "µs", 0.5),
             ("handshake CPU/conn ≤ 0.5× HAProxy", "handshake", "proxy_cpu_us_per_conn",
              "proxy_sys_us_per_conn", "haproxy", "µs", 0.5)]
    bt, _ = best_anchor(agg, "bulk", "proxy_cpu_s_per_gb", True, targets)
    if bt:
        specs.append(("bulk CPU/GB ≤ 0.5× best anchor", "bulk", "proxy_cpu_s_per_gb",
                      "proxy_sys_s_per_gb", bt, "s", 0.5))
    for what, sc, tot, sysm, anchor, unit, limit in specs:
        if anchor not in targets:
            continue
        rt, rk = med(agg, sc, "ringlb", tot), med(agg, sc, "ringlb", sysm)
        at, ak = med(agg, sc, anchor, tot), med(agg, sc, anchor, sysm)
        if None in (rt, rk, at, ak):
            continue
        floor = ratio(rk, at)
        rows.append(f"| {what} | {anchor} | {f3(rt)} = {f3(rk)} + {f3(rt - rk)} | "
                    f"{f3(at)} = {f3(ak)} + {f3(at - ak)} | {unit} | {f3(floor)} | "
                    f"{f3(ratio(rk, ak))} | {'yes' if floor is not None and floor > limit else 'no'} |")
    if not rows:
        return []
    L = ["## Kernel floor of the CPU targets", "",
         "Proxy CPU split into kernel (stime: system calls, including the TCP receive "
         "work loopback runs inside the sender's call) and user space (utime), medians. "
         "Were ringlb's own code free, its ratio could not drop below its kernel time ÷ "
         "the anchor's total: the *floor*. A floor above the limit means only less kernel "
         "work, not faster user space, could meet the target.", "",
         "| target | anchor | ringlb: total = kernel + user | anchor: total = kernel + user | unit | "
         "floor (ringlb kernel ÷ anchor total) | ringlb kernel ÷ anchor kernel | floor above limit |",
         "|---|---|---|---|---|---|---|---|"]
    return L + rows + [""]


def throughput_ceiling(agg, targets) -> list[str]:
    """What the throughput targets could reach on this machine. The load
    tool, the backends and the proxy share its cores, so at saturation the
    rate is the cores divided by the machine's CPU per unit (proxy + the
    rest). Holding the rest at what ringlb's runs measured, ringlb at zero
    CPU (or at its kernel time alone) gives the ceiling of its ratio."""
    specs = [("ping-pong msg/s ≥ 1.3× nginx", "pingpong", "msgs_per_s", "proxy_cpu_us_per_msg",
              "proxy_sys_us_per_msg", "nginx", 1.3)]
    specs.append(("handshake conn/s ≥ 1.5× HAProxy", "handshake", "conns_per_s", "proxy_cpu_us_per_conn",
                  "proxy_sys_us_per_conn", "haproxy", 1.5))
    bt, _ = best_anchor(agg, "bulk", "mb_per_s", False, targets)
    if bt:
        specs.append(("bulk MB/s ≥ 2× best anchor", "bulk", "mb_per_s", "proxy_cpu_s_per_gb",
                      "proxy_sys_s_per_gb", bt, 2.0))
    rows = []
    for what, sc, rate_m, cpu_m, sys_m, anchor, limit in specs:
        if anchor not in targets:
            continue
        vals = [med(agg, sc, t, m) for t, m in (("ringlb", rate_m), (anchor, rate_m), ("ringlb", cpu_m),
                                                 ("ringlb", "rest_cpu_per_unit"),
                                                 (anchor, cpu_m), (anchor, "rest_cpu_per_unit"))]
        if None in vals:
            continue
        rr, ra, rc, rrest, ac, arest = vals
        rk = med(agg, sc, "ringlb", sys_m)
        machine_a = ac + arest
        rows.append(f"| {what} | {anchor} | {f3(ratio(rr, ra))} | {f3(machine_a / (rc + rrest))} | "
                    f"{f3(machine_a / (rk + rrest)) if rk is not None else '—'} | {f3(machine_a / rrest)} | "
                    f"{'yes' if machine_a / rrest < limit else 'no'} |")
    if not rows:
        return []
    return ["## Throughput ceiling on this machine", "",
            "Load tool, backends and proxy share the cores, so a saturated run's rate is set by "
            "the machine's CPU per unit: the proxy's plus the rest's (load tool, backends, other "
            "processes). *Model* = anchor's machine CPU per unit ÷ ringlb's, to check the model "
            "against the measured ratio; the next columns keep the rest at ringlb's figure and "
            "give ringlb only its kernel time, then no CPU at all.", "",
            "| target | anchor | measured ratio | model | ringlb at kernel time only | ringlb at zero CPU | "
            "out of reach on this machine |",
            "|---|---|---|---|---|---|---|"] + rows + [""]


# ------------------------------------------------------------------ plots

def read_hist(out: str, rel: str | None) -> list[tuple[float, float]] | None:
    """Read a `ringlb-load --hist` CSV as [(percentile 0..100, latency_us)]."""
    if not rel:
        return None
    path = os.path.join(out, rel)
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError:
        return None
    if len(rows) < 2:
        return None
    head = [h.strip().lower() for h in rows[0]]
    pi = next((i for i, h in enumerate(head) if h.startswith("percentile") or h in ("p", "pct", "quantile")), None)
    vi = next((i for i, h in enumerate(head) if h.endswith("_us") or "latency" in h or "value" in h), None)
    if pi is None or vi is None or pi == vi:
        return None
    ki = head.index("kind") if "kind" in head else None
    if ki is not None:  # ringlb-load: kind,percentile,latency_us,count_at_or_below
        rows = [rows[0]] + [r for r in rows[1:] if len(r) > ki and r[ki].strip() == "roundtrip"]
    pts = []
    for r in rows[1:]:
        try:
            p = float(r[pi])
            v = float(r[vi])
        except (ValueError, IndexError):
            continue
        if head[pi] == "quantile" or (p <= 1.0 and all(float(x[pi]) <= 1.0 for x in rows[1:] if x)):
            p *= 100.0
        pts.append((p, v))
    return pts or None


def curve_for(out, agg, scenario, target):
    """Percentile curve of the rep whose p99 is the median (hist CSV if present)."""
    a = agg.get((scenario, target))
    if not a:
        return None
    good = [r for r in a["recs"] if r["status"] in ("ok", "errors") and (r.get("load") or {}).get("latency_us")]
    if not good:
        return None
    good.sort(key=lambda r: r["load"]["latency_us"].get("p99") or 0)
    r = good[len(good) // 2]
    h = read_hist(out, r.get("hist"))
    if h:
        return h
    lat = r["load"]["latency_us"]
    pts = [(50, lat.get("p50")), (90, lat.get("p90")), (99, lat.get("p99")), (99.9, lat.get("p999"))]
    return [(p, v) for p, v in pts if v]


def plots(out: str, agg, targets, scenarios) -> list[tuple[str, str]]:
    made = []

    def save(name, svg, caption):
        with open(os.path.join(out, name), "w") as f:
            f.write(svg)
        made.append((name, caption))

    for s in ("rate", "pingpong", "pingpong_pin", "static_small"):
        if s not in scenarios:
            continue
        curves = {t: c for t in targets if (c := curve_for(out, agg, s, t))}
        note = "rep with the median p99"
        save(f"latency_{s}.svg", svgplot.percentile_curves(f"{SCENARIO_TITLES[s]}: latency percentiles",
                                                           curves, note), f"Latency percentiles, {s}")

    def bars(name, title, unit, scen, metric_list, caption, tgts=None):
        tg = tgts or [t for t in targets if t != "direct"]
        series = [(METRICS[m][0], [mmm(agg, scen, t, m) for t in tg]) for m in metric_list]
        save(name, svgplot.bar_chart(title, unit, tg, series, "bars: median, whiskers: min..max"), caption)

    if "pingpong" in scenarios:
        bars("cpu_per_msg.svg", "Proxy CPU per round trip (ping-pong 64 B)", "µs CPU / message",
             "pingpong", ["proxy_cpu_us_per_msg"], "Proxy CPU per message")
        bars("pingpong_throughput.svg", "Ping-pong throughput (64 B)", "messages / s",
             "pingpong", ["msgs_per_s"], "Ping-pong msg/s", tgts=targets)
    if "handshake" in scenarios:
        bars("cpu_per_conn.svg", "Proxy CPU per connection (handshake)", "µs CPU / connection",
             "handshake", ["proxy_cpu_us_per_conn"], "Proxy CPU per connection")
    if "bulk" in scenarios:
        bars("cpu_per_gb.svg", "Proxy CPU per GB (bulk 1 MiB)", "s CPU / GB",
             "bulk", ["proxy_cpu_s_per_gb"], "Proxy CPU per GB")
        bars("bulk_throughput.svg", "Bulk throughput (1 MiB messages)", "MB / s",
             "bulk", ["mb_per_s"], "Bulk MB/s", tgts=targets)
    st = [t for t in targets if applies("static_small", t)]
    if "static_small" in scenarios:
        bars("static_small_rps.svg", "Static 2 KB file: requests per second", "requests / s",
             "static_small", ["requests_per_s"], "Static 2 KB req/s", tgts=st)
        bars("static_cpu_per_req.svg", "Server CPU per request (static 2 KB file)", "µs CPU / request",
             "static_small", ["proxy_cpu_us_per_req"], "Server CPU per request, 2 KB", tgts=st)
    if "static_large" in scenarios:
        bars("static_large_mbps.svg", "Static 10 MiB file: throughput", "MB / s",
             "static_large", ["mb_per_s"], "Static 10 MiB MB/s", tgts=st)
        bars("static_cpu_per_gb.svg", "Server CPU per GB (static 10 MiB file)", "s CPU / GB",
             "static_large", ["proxy_cpu_s_per_gb"], "Server CPU per GB, 10 MiB", tgts=st)
    if "idle" in scenarios:
        bars("mem_per_conn.svg", "Memory per idle connection", "bytes / connection",
             "idle", ["proxy_rss_per_conn_b", "machine_per_conn_b"], "Memory per connection",
             tgts=targets)
    return made


# ------------------------------------------------------------------ summary

def static_headline(agg, targets, scenarios) -> list[str]:
    """The issue's question in one table: ringlb vs nginx serving files."""
    rows = [("static_small", "requests_per_s", "2 KB file: requests/s"),
            ("static_small", "proxy_cpu_us_per_req", "2 KB file: server CPU per request (µs)"),
            ("static_large", "mb_per_s", "10 MiB file: MB/s"),
            ("static_large", "proxy_cpu_s_per_gb", "10 MiB file: server CPU per GB (s)")]
    others = [t for t in ("nginx", "nginx-tuned") if t in targets]
    L = ["## Static files: ringlb vs nginx", "",
         "Medians over reps; higher req/s and MB/s are better, lower CPU is better.", ""]
    head = "| | ringlb | " + " | ".join(f"{o} | ringlb/{o}" for o in others) + " |"
    L.append(head)
    L.append("|---|---|" + "---|---|" * len(others))
    for s, metric, label in rows:
        if s not in scenarios:
            continue
        r = med(agg, s, "ringlb", metric)
        cells = []
        for o in others:
            v = med(agg, s, o, metric)
            cells += [f3(v), f3(ratio(r, v))]
        L.append(f"| {label} | {f3(r)} | " + " | ".join(cells) + " |")
    L.append("")
    return L


PROBE_HEADERS = ("content-type", "content-length", "connection", "keep-alive", "etag",
                 "last-modified", "accept-ranges", "cache-control", "server")


def probe_table(agg, scenario, targets) -> list[str]:
    """What a plain GET got from each server before the load (rep 0)."""
    rows = []
    for t in targets:
        recs = [r for r in (agg.get((scenario, t)) or {}).get("recs", []) if r.get("probe")]
        if not recs:
            continue
        pr = sorted(recs, key=lambda r: r["rep"])[0]["probe"]
        h = pr.get("headers") or {}
        shown = "; ".join(f"{k}: {h[k]}" for k in PROBE_HEADERS if k in h)
        ka = "yes" if pr.get("keep_alive") else f"no (closed after {pr.get('closed_after')})"
        body = "ok" if pr.get("body_ok") else "WRONG"
        rows.append(f"| {t} | {pr.get('status')} | {body} | {ka} | {shown} |")
    if not rows:
        return []
    return (["Probe before the load (first GET of rep 0):", "",
             "| target | status | body | 2nd GET on the same connection | response headers |",
             "|---|---|---|---|---|"] + rows + [""])


def summary_md(out: str, meta: dict, recs: list[dict], img_prefix: str = "") -> str:
    targets = meta["targets"]
    scenarios = meta["scenarios"]
    agg = aggregate(recs)
    L = []
    L.append(f"# ringlb benchmark summary — {os.path.basename(os.path.normpath(out))}")
    L.append("")
    L.append(f"Mode **{meta['mode']}**, {meta['reps']} rep(s), targets interleaved rep by rep; "
             f"{meta.get('workers')} workers/threads/shards per proxy; run status: **{meta.get('status')}** "
             f"({meta.get('started')} → {meta.get('finished')}).")
    L.append("Cells are median (min..max) over reps. Noise on this shared 2-core machine is large: "
             "compare only within this run. Load generator, backends and proxy share the same 2 cores.")
    if meta.get("note"):
        L.append("")
        L.append(f"> **Note:** {meta['note']}")
        L.append("")
    if meta.get("rate_calibration"):
        rc = meta["rate_calibration"]
        L.append(f"Open-loop rate: {rc['rate']} msg/s ({rc['why']}).")
    L.append("")

    # goals (the WebSocket scenarios' targets; not shown for a static-only run)
    if "ringlb" in targets and any(s in scenarios for s in ("pingpong", "rate", "handshake", "bulk", "idle")):
        L.append("## Targets (from the issue)")
        L.append("")
        L.append("| target | measured | limit | status | detail |")
        L.append("|---|---|---|---|---|")
        for g in goals(agg, targets):
            L.append(f"| {g['what']} | {f3(g['measured'])} | {g['op']} {f3(g['limit'])} | {g['status']} | {g['detail']} |")
        L.append("")
        L += kernel_floor(agg, targets)
        L += throughput_ceiling(agg, targets)

    if any(is_tls(t) for t in targets) or meta.get("skipped_targets"):
        L += tls_section(agg, meta, recs, targets)

    # rows present
    L.append("## Runs")
    L.append("")
    L.append("| scenario | " + " | ".join(targets) + " |")
    L.append("|---|" + "---|" * len(targets))
    for s in scenarios:
        row = []
        for t in targets:
            a = agg.get((s, t))
            if not applies(s, t):
                row.append("n/a")
                continue
            row.append("missing" if not a else f"{a['n_ok']}/{a['n']} ok")
        L.append(f"| {s} | " + " | ".join(row) + " |")
    L.append("")
    for t, why in (meta.get("skipped_targets") or {}).items():
        L.append(f"Not run: {t} ({why}).")
        L.append("")

    if any(s in scenarios for s in STATIC_SCENARIOS) and "ringlb" in targets:
        L += static_headline(agg, targets, scenarios)

    for s in scenarios:
        cols = TABLES.get(s.replace("_pin", "") if s not in TABLES else s, [])
        tg = [t for t in targets if applies(s, t)]
        L.append(f"## {SCENARIO_TITLES.get(s, s)}")
        L.append("")
        p = meta["params"].get(s, {})
        L.append("Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()))
        L.append("")
        L.append("| target | status | " + " | ".join(
            f"{METRICS[c][0]}" + (f" ({METRICS[c][1]})" if METRICS[c][1] and METRICS[c][1] != METRICS[c][0] else "") for c in cols) + " |")
        L.append("|---|---|" + "---|" * len(cols))
        for t in tg:
            a = agg.get((s, t))
            st = "missing" if not a else f"{a['n_ok']}/{a['n']} ok"
            L.append(f"| {t} | {st} | " + " | ".join(cell(mmm(agg, s, t, c)) for c in cols) + " |")
        L.append("")
        na = [t for t in targets if t not in tg]
        if na:
            why = "a plaintext target: no TLS session to resume" if s == "handshake_resumed" \
                else "not a file server"
            L.append(f"n/a here ({why}): {', '.join(na)}.")
            L.append("")
        if s in STATIC_SCENARIOS:
            L += probe_table(agg, s, tg)
        rms = RATIO_METRICS.get(s, [])
        if "ringlb" in targets and rms:
            others = [t for t in ("nginx", "nginx-tuned", "haproxy", "direct") if t in tg]
            L.append(f"Ratios (medians), ringlb / other — for {', '.join(METRICS[m][0] for m in rms)}:")
            L.append("")
            L.append("| ratio | " + " | ".join(METRICS[m][0] for m in rms) + " |")
            L.append("|---|" + "---|" * len(rms))
            for o in others:
                vals = [ratio(med(agg, s, "ringlb", m), med(agg, s, o, m)) for m in rms]
                L.append(f"| ringlb/{o} | " + " | ".join(f3(v) for v in vals) + " |")
            L.append("")
        if "ringlb-tls" in tg and rms:
            others = [t for t in TLS_ANCHORS if t in tg]
            L.append(f"Ratios (medians), ringlb-tls / other — for {', '.join(METRICS[m][0] for m in rms)}:")
            L.append("")
            L.append("| ratio | " + " | ".join(METRICS[m][0] for m in rms) + " |")
            L.append("|---|" + "---|" * len(rms))
            for o in others:
                vals = [ratio(med(agg, s, "ringlb-tls", m), med(agg, s, o, m)) for m in rms]
                L.append(f"| ringlb-tls/{o} | " + " | ".join(f3(v) for v in vals) + " |")
            L.append("")
        busy = [f"{r['target']} rep {r['rep']}" for t in tg for r in (agg.get((s, t)) or {}).get("recs", [])
                if r.get("busy_machine") or r.get("busy_during")]
        if busy:
            L.append("⚠ measured while a build was running on the machine (distorted): " + ", ".join(busy))
            L.append("")
        errs = [(t, e) for t in tg for e in (agg.get((s, t)) or {}).get("errors", [])]
        if errs:
            L.append("Problems:")
            L.append("")
            for t, e in errs:
                L.append(f"- {t} {e.splitlines()[0][:400] if e else ''}")
            L.append("")

    L.append("## Plots")
    L.append("")
    for name, caption in plots(out, agg, targets, scenarios):
        L.append(f"![{caption}]({img_prefix}{name})")
        L.append("")
    L.append("## How the numbers are made")
    L.append("")
    L.append("- Proxy CPU: utime+stime from /proc/PID/stat of every process in the proxy's tree "
             "(\"of which kernel\": stime alone) "
             "(nginx master + workers; HAProxy and ringlb are one process with threads), sampled every "
             "0.25 s; CPU/message = steady-state CPU cores ÷ msg/s (warm-up and teardown excluded). "
             "Handshake CPU/connection = whole-run CPU delta ÷ completed handshakes.")
    L.append("- Proxy RSS: sum of VmRSS over the proxy tree. Idle RSS/connection = (RSS with all "
             "connections held − RSS before the load) ÷ connections; whole-machine memory/connection = "
             "Δ(MemTotal − MemFree − Buffers − Cached − SReclaimable, i.e. free(1) \"used\") over the same interval, minus the change in RssAnon of all unrelated processes, ÷ connections (includes the load tool, "
             "backends and kernel socket memory; direct shows that baseline).")
    L.append("- direct = load tool straight to one echo backend (no proxy): the ceiling of the load tool.")
    if any(s in scenarios for s in STATIC_SCENARIOS):
        L.append("- Static files: ringlb and nginx serve the same directory (pseudo-random `small.bin`, "
                 "2048 B, and `large.bin`, 10 MiB; see SETUP.md for their configs) with the same number of "
                 "workers/shards; `ringlb-load http` sends keep-alive GETs, closed loop. Server CPU/request = "
                 "steady-state server CPU cores ÷ req/s; CPU/GB = cores ÷ (body MB/s ÷ 1000). Before each "
                 "run one plain GET checks the served file byte for byte; its response headers are listed. "
                 "Reconnects: new connections because the server closed one (e.g. after "
                 "`keepalive_requests`); silent closes: closed without `Connection: close`.")
    L.append("")
    return "\n".join(L)


def generate(out: str, docs: str | None = None, note: str | None = None) -> str:
    meta, recs = load_run(out)
    if note is not None:
        meta["note"] = note
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump(meta, f, indent=1)
    text = summary_md(out, meta, recs)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    if docs:
        rel = os.path.relpath(out, os.path.dirname(os.path.abspath(docs)))
        body = summary_md(out, meta, recs, img_prefix=rel + "/")
        hdr = ("# Benchmarks\n\n"
               "Generated by `python3 bench/report.py " + os.path.relpath(out, REPO) + " --docs "
               + os.path.relpath(os.path.abspath(docs), REPO) + "` from the raw data of the latest full run "
               f"(setup: [{rel}/SETUP.md]({rel}/SETUP.md)). See [bench/README.md](../bench/README.md) "
               "for how to reproduce.\n\n")
        body = body.replace("# ringlb benchmark summary", "## Latest run", 1)
        with open(docs, "w") as f:
            f.write(hdr + body)
    return text


# ------------------------------------------------------------------ SETUP.md

def _cmd(args) -> str:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def write_setup(out: str, meta: dict) -> None:
    with open(os.path.join(HERE, "configs", "SETUP.md.tmpl")) as f:
        tmpl = f.read()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "unknown"
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    bins = meta.get("bins", {})
    rev = _cmd(["git", "-C", REPO, "rev-parse", "HEAD"])
    dirty = _cmd(["git", "-C", REPO, "status", "--porcelain", "--", "src", "loadtest", "Cargo.toml", "Cargo.lock"])
    configs = []
    cdir = os.path.join(out, "configs")
    for name in sorted(os.listdir(cdir)) if os.path.isdir(cdir) else []:
        with open(os.path.join(cdir, name)) as f:
            configs.append(f"### configs/{name}\n\n```\n{f.read().rstrip()}\n```\n")
    try:
        import resource
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    except Exception:  # pragma: no cover
        nofile = "?"
    vals = {
        "date": meta.get("started", ""),
        "host": meta.get("host", ""),
        "kernel": " ".join(platform.uname()),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "memtotal": mem,
        "nofile": str(nofile),
        "somaxconn": _read("/proc/sys/net/core/somaxconn"),
        "nginx": _cmd([bins["nginx"], "-v"]) if bins.get("nginx") else "not installed",
        "haproxy": _cmd([bins["haproxy"], "-v"]).splitlines()[0] if bins.get("haproxy") else "not installed",
        "ringlb_rev": rev + (" (+ uncommitted changes in src/loadtest)" if dirty.strip() else ""),
        "ringlb_bin": _bin_desc(bins.get("ringlb")),
        "load_bin": _bin_desc(bins.get("ringlb-load")),
        "rustc": _cmd(["rustc", "-V"]),
        "python": sys.version.split()[0],
        "argv": " ".join(meta.get("argv", [])),
        "mode": meta.get("mode", ""),
        "reps": str(meta.get("reps")),
        "workers": str(meta.get("workers")),
        "targets": ", ".join(meta.get("targets", [])),
        "params": "\n".join(f"- **{s}**: " + ", ".join(f"{k}={v}" for k, v in p.items())
                            for s, p in meta.get("params", {}).items()),
        "rate": str(meta.get("rate_calibration", "n/a")),
        "configs": "\n".join(configs) or "(no proxy configs rendered)",
        "static": _static_desc(meta),
        "tls": _tls_desc(meta),
    }
    import re
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: vals.get(m.group(1), m.group(0)), tmpl)
    with open(os.path.join(out, "SETUP.md"), "w") as f:
        f.write(text)


def _static_desc(meta: dict) -> str:
    st = meta.get("static")
    if not st:
        return "(no static-file scenarios in this run)"
    files = "\n".join(f"- `{n}`: {f['bytes']} bytes, sha256 `{f['sha256']}`" for n, f in st["files"].items())
    na = meta.get("not_applicable") or {}
    skipped = sorted({t for s, ts in na.items() if s in STATIC_SCENARIOS for t in ts})
    return (f"Both servers serve `{st['root']}` (created once per run by the harness, pseudo-random "
            f"contents from a fixed seed):\n\n{files}\n\n"
            "nginx (`configs/nginx-static.conf`): `sendfile on; tcp_nopush on; tcp_nodelay on; "
            "keepalive_timeout 65; keepalive_requests 1000; access_log off; open_file_cache off; gzip off`, "
            "`default_type application/octet-stream`, `worker_processes` = the workers above, "
            "`reuseport`. nginx-tuned (`configs/nginx-tuned-static.conf`) adds "
            "`open_file_cache max=1000 inactive=60s; open_file_cache_valid 60s`.\n"
            "ringlb (`configs/ringlb-static.toml`): one route `path = \"/\"` with "
            "`static = { root = ..., gzip = false }`, `shards` = the workers above, "
            "`keepalive_timeout = \"65s\"`, `keepalive_requests = 1000`.\n"
            "Load: `ringlb-load http` (keep-alive GETs, closed loop, `--expect-length` = the file size)."
            + (f"\nNot applicable there (not file servers, skipped): {', '.join(skipped)}." if skipped else ""))


def _tls_desc(meta: dict) -> str:
    tl = meta.get("tls")
    if not tl:
        return "(no TLS targets in this run)"
    lines = [f"- certificate: {tl.get('certificate')}; made for this run by `bench/tlscerts.py` "
             "(openssl: a test CA and a leaf, ECDSA P-256); every TLS target gets the same leaf and key "
             "and sends the leaf alone",
             f"- load tool: `ringlb-load ... --tls --ca ca.pem {' '.join(tl.get('load_flags') or [])}` "
             "(`--no-tls-resume` for handshake, `--tls-resume` otherwise); the negotiated "
             f"parameters must be `{tl.get('expected')}` on every target",
             "- nginx-tls: `listen ... ssl`, `ssl_protocols TLSv1.3`, "
             "`ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256`, defaults otherwise",
             "- haproxy-tls: `bind ... ssl crt haproxy.pem ssl-min-ver TLSv1.3 ciphersuites "
             "TLS_AES_128_GCM_SHA256 alpn http/1.1`, defaults otherwise",
             "- ringlb-tls: `[tls] listen`, `certificates = [{cert, key}]`, `min_version = \"1.3\"`, "
             "`alpn = [\"http/1.1\"]`, defaults otherwise"]
    for t, why in (meta.get("skipped_targets") or {}).items():
        lines.append(f"- {t}: **skipped**: {why}")
    return "\n".join(lines)


def _bin_desc(path) -> str:
    if not path:
        return "not found"
    try:
        import datetime
        t = datetime.datetime.fromtimestamp(os.path.getmtime(path)).isoformat(timespec="seconds")
        return f"{path} (built {t})"
    except OSError:
        return str(path)


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results_dir")
    ap.add_argument("--docs", help="also write this markdown file (docs/BENCHMARKS.md)")
    ap.add_argument("--note", help="a remark about the run, stored in run.json and shown in summary.md")
    ap.add_argument("--setup", action="store_true", help="regenerate SETUP.md too (uses this machine's info)")
    a = ap.parse_args()
    if a.setup:
        meta, _ = load_run(a.results_dir)
        write_setup(a.results_dir, meta)
    generate(a.results_dir, a.docs, a.note)
    print(os.path.join(a.results_dir, "summary.md"))


if __name__ == "__main__":
    main()
