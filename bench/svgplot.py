"""Minimal hand-written SVG charts (standard library only)."""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

PALETTE = {
    "direct": "#7f7f7f",
    "ringlb": "#d62728",
    "nginx": "#2ca02c",
    "nginx-tuned": "#98df8a",
    "haproxy": "#1f77b4",
}
EXTRA = ["#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def color(name: str, i: int) -> str:
    return PALETTE.get(name, EXTRA[i % len(EXTRA)])


def _fmt(v: float) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _svg(w, h, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">\n'
            f'<rect width="{w}" height="{h}" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n")


def bar_chart(title: str, unit: str, categories: list[str],
              series: list[tuple[str, list[tuple | None]]], note: str = "") -> str:
    """Grouped bars. series: [(label, [(median, lo, hi) | None per category])].
    Whiskers show lo..hi; missing values are drawn as 'n/a'."""
    w, h = 640, 360
    ml, mr, mt, mb = 70, 20, 40, 70
    pw, ph = w - ml - mr, h - mt - mb
    vals = [v[2] if v[2] is not None else v[0] for _, vs in series for v in vs if v and v[0] is not None]
    ymax = _nice_max(max(vals) if vals else 1.0)
    body = [f'<text x="{w / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    # axes + grid
    for i in range(6):
        y = mt + ph - ph * i / 5
        body.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{ml + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(ymax * i / 5)}</text>')
    body.append(f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + ph}" stroke="#333"/>')
    body.append(f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" stroke="#333"/>')
    body.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" '
                f'transform="rotate(-90 16 {mt + ph / 2})">{escape(unit)}</text>')
    n = max(1, len(categories))
    gw = pw / n
    ns = max(1, len(series))
    bw = gw * 0.7 / ns
    for ci, cat in enumerate(categories):
        gx = ml + gw * ci + gw * 0.15
        body.append(f'<text x="{ml + gw * ci + gw / 2:.1f}" y="{mt + ph + 18}" '
                    f'text-anchor="middle">{escape(cat)}</text>')
        for si, (label, vs) in enumerate(series):
            v = vs[ci] if ci < len(vs) else None
            x = gx + bw * si
            fill = color(cat, ci) if ns == 1 else EXTRA[si % len(EXTRA)]
            if v is None or v[0] is None:
                body.append(f'<text x="{x + bw / 2:.1f}" y="{mt + ph - 4}" text-anchor="middle" '
                            f'font-size="10" fill="#999">n/a</text>')
                continue
            med, lo, hi = v
            bh = ph * max(med, 0) / ymax
            body.append(f'<rect x="{x:.1f}" y="{mt + ph - bh:.1f}" width="{bw * 0.92:.1f}" '
                        f'height="{bh:.1f}" fill="{fill}"><title>{escape(label)} {escape(cat)}: '
                        f'{_fmt(med)} ({_fmt(lo)}..{_fmt(hi)}) {escape(unit)}</title></rect>')
            cx = x + bw * 0.46
            if lo is not None and hi is not None and hi > lo:
                y1 = mt + ph - ph * lo / ymax
                y2 = mt + ph - ph * hi / ymax
                body.append(f'<line x1="{cx:.1f}" y1="{y1:.1f}" x2="{cx:.1f}" y2="{y2:.1f}" stroke="#000"/>')
                for yy in (y1, y2):
                    body.append(f'<line x1="{cx - 4:.1f}" y1="{yy:.1f}" x2="{cx + 4:.1f}" y2="{yy:.1f}" stroke="#000"/>')
            body.append(f'<text x="{cx:.1f}" y="{mt + ph - bh - 4:.1f}" text-anchor="middle" '
                        f'font-size="10">{_fmt(med)}</text>')
    if ns > 1:
        for si, (label, _) in enumerate(series):
            lx = ml + 10 + si * 200
            body.append(f'<rect x="{lx}" y="{h - 24}" width="12" height="12" fill="{EXTRA[si % len(EXTRA)]}"/>')
            body.append(f'<text x="{lx + 16}" y="{h - 14}">{escape(label)}</text>')
    if note:
        body.append(f'<text x="{w - mr}" y="{h - 4}" text-anchor="end" font-size="10" '
                    f'fill="#666">{escape(note)}</text>')
    return _svg(w, h, body)


def percentile_curves(title: str, curves: dict[str, list[tuple[float, float]]], note: str = "") -> str:
    """Latency (log y, microseconds) vs percentile on a log 1/(1-p) x axis.
    curves: target -> [(percentile 0..100, latency_us)]."""
    w, h = 640, 400
    ml, mr, mt, mb = 70, 120, 40, 55
    pw, ph = w - ml - mr, h - mt - mb

    def xval(pct):
        return math.log10(1.0 / max(1e-6, 1.0 - pct / 100.0))

    pts = {t: [(xval(p), v) for p, v in c if 0 <= p < 100 and v and v > 0] for t, c in curves.items()}
    allx = [x for c in pts.values() for x, _ in c]
    ally = [y for c in pts.values() for _, y in c]
    body = [f'<text x="{(ml + w - mr) / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    if not allx:
        body.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#999">no data</text>')
        return _svg(w, h, body)
    xmax = max(2.0, math.ceil(max(allx)))
    ylo = 10 ** math.floor(math.log10(min(ally)))
    yhi = 10 ** math.ceil(math.log10(max(ally)))
    if yhi <= ylo:
        yhi = ylo * 10

    def X(x):
        return ml + pw * x / xmax

    def Y(y):
        return mt + ph - ph * (math.log10(y) - math.log10(ylo)) / (math.log10(yhi) - math.log10(ylo))

    # grid
    d = ylo
    while d <= yhi * 1.0001:
        body.append(f'<line x1="{ml}" y1="{Y(d):.1f}" x2="{ml + pw}" y2="{Y(d):.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{ml - 6}" y="{Y(d) + 4:.1f}" text-anchor="end">{_fmt(d)}</text>')
        d *= 10
    labels = {0: "0%", 1: "90%", 2: "99%", 3: "99.9%", 4: "99.99%", 5: "99.999%", 6: "99.9999%"}
    for i in range(int(xmax) + 1):
        body.append(f'<line x1="{X(i):.1f}" y1="{mt}" x2="{X(i):.1f}" y2="{mt + ph}" stroke="#ddd"/>')
        body.append(f'<text x="{X(i):.1f}" y="{mt + ph + 16}" text-anchor="middle">{labels.get(i, "")}</text>')
    body.append(f'<line x1="{X(xval(50)):.1f}" y1="{mt + ph}" x2="{X(xval(50)):.1f}" y2="{mt + ph + 4}" stroke="#333"/>')
    body.append(f'<text x="{X(xval(50)):.1f}" y="{mt + ph + 28}" text-anchor="middle" font-size="10">50%</text>')
    body.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    body.append(f'<text x="{ml + pw / 2}" y="{h - 8}" text-anchor="middle">percentile</text>')
    body.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" '
                f'transform="rotate(-90 16 {mt + ph / 2})">latency (µs, log)</text>')
    for i, (t, c) in enumerate(pts.items()):
        c = sorted(c)
        if not c:
            continue
        col = color(t, i)
        path = " ".join(f"{'M' if j == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for j, (x, y) in enumerate(c))
        body.append(f'<path d="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
        for x, y in c:
            if len(c) <= 12:
                body.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{col}"/>')
        ly = mt + 14 + i * 18
        body.append(f'<line x1="{w - mr + 10}" y1="{ly - 4}" x2="{w - mr + 30}" y2="{ly - 4}" stroke="{col}" stroke-width="3"/>')
        body.append(f'<text x="{w - mr + 34}" y="{ly}">{escape(t)}</text>')
    if note:
        body.append(f'<text x="{w - 4}" y="{h - 8}" text-anchor="end" font-size="10" fill="#666">{escape(note)}</text>')
    return _svg(w, h, body)


def line_chart(title: str, xlabel: str, ylabel: str,
               series: list[tuple[str, list[tuple[float, float]]]],
               marks: list[tuple[float, str]] | None = None, note: str = "") -> str:
    """Lines over a linear x axis (time). series: [(label, [(x, y)])];
    marks: vertical lines at x with a label (an event: "backend C added")."""
    w, h = 720, 400
    ml, mr, mt, mb = 70, 160, 40, 55
    pw, ph = w - ml - mr, h - mt - mb
    xs = [x for _, pts in series for x, _ in pts]
    ys = [y for _, pts in series for _, y in pts]
    body = [f'<text x="{(ml + w - mr) / 2}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>']
    if not xs:
        body.append(f'<text x="{w / 2}" y="{h / 2}" text-anchor="middle" fill="#999">no data</text>')
        return _svg(w, h, body)
    xmax = _nice_max(max(xs))
    ymax = _nice_max(max(ys) if ys else 1.0)

    def X(x):
        return ml + pw * x / xmax

    def Y(y):
        return mt + ph - ph * y / ymax

    for i in range(6):
        yv = ymax * i / 5
        body.append(f'<line x1="{ml}" y1="{Y(yv):.1f}" x2="{ml + pw}" y2="{Y(yv):.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{ml - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{_fmt(yv)}</text>')
        xv = xmax * i / 5
        body.append(f'<text x="{X(xv):.1f}" y="{mt + ph + 16}" text-anchor="middle">{_fmt(xv)}</text>')
    body.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    body.append(f'<text x="{ml + pw / 2}" y="{h - 20}" text-anchor="middle">{escape(xlabel)}</text>')
    body.append(f'<text x="16" y="{mt + ph / 2}" text-anchor="middle" '
                f'transform="rotate(-90 16 {mt + ph / 2})">{escape(ylabel)}</text>')
    for x, label in marks or []:
        body.append(f'<line x1="{X(x):.1f}" y1="{mt}" x2="{X(x):.1f}" y2="{mt + ph}" '
                    f'stroke="#999" stroke-dasharray="4 3"/>')
        body.append(f'<text x="{X(x) + 4:.1f}" y="{mt + 12}" font-size="10" fill="#666">{escape(label)}</text>')
    for i, (label, pts) in enumerate(series):
        pts = sorted(pts)
        if not pts:
            continue
        col = EXTRA[i % len(EXTRA)] if label not in PALETTE else PALETTE[label]
        path = " ".join(f"{'M' if j == 0 else 'L'}{X(x):.1f},{Y(y):.1f}" for j, (x, y) in enumerate(pts))
        body.append(f'<path d="{path}" fill="none" stroke="{col}" stroke-width="2"/>')
        ly = mt + 14 + i * 18
        body.append(f'<line x1="{w - mr + 10}" y1="{ly - 4}" x2="{w - mr + 30}" y2="{ly - 4}" stroke="{col}" stroke-width="3"/>')
        body.append(f'<text x="{w - mr + 34}" y="{ly}">{escape(label)}</text>')
    if note:
        body.append(f'<text x="{w - 4}" y="{h - 4}" text-anchor="end" font-size="10" fill="#666">{escape(note)}</text>')
    return _svg(w, h, body)
