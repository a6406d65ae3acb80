"""bench.pbx_day's chart: card latency over the day, one line pair (p50, p99) per mode.

Plain SVG like bench/chart.py: x is the time of day (the call's start, in the day's own
hours), y the seconds from the start's 202 to its card, per half-hour of the day; the goal
as a dashed red line.
"""

from __future__ import annotations

import math
from typing import Any

W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 420, 70, 190, 40, 50
BUCKET = 1800.0  # seconds of the day per point
COLOURS = {"parallel": "#1f77b4", "sequential": "#ff7f0e"}


def points(series: list[tuple[float, float]], q: float) -> list[tuple[float, float]]:
    """(hour of day, the q-quantile of the latencies of calls started in that half-hour)."""
    buckets: dict[int, list[float]] = {}
    for start, value in series:
        buckets.setdefault(int(start // BUCKET), []).append(value)
    out = []
    for b in sorted(buckets):
        values = sorted(buckets[b])
        value = values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]
        out.append(((b + 0.5) * BUCKET / 3600.0, value))
    return out


def render(runs: list[dict[str, Any]], goal: float) -> str:
    """The SVG for the runs of one scale and portal latency (one per mode)."""
    first = runs[0]
    top = max([goal * 1.5] + [v for r in runs for _, v in points(r["series"], 0.99)])
    top = 10 ** math.ceil(math.log10(top)) if top > 0 else 1.0
    top = next(t for t in (top / 5, top / 2, top) if t >= max(
        [goal * 1.2] + [v for r in runs for _, v in points(r["series"], 0.99)]))

    def x(hour: float) -> float:
        return LEFT + hour / 24.0 * (W - LEFT - RIGHT)

    def y(sec: float) -> float:
        return H - BOTTOM - min(sec, top) / top * (H - TOP - BOTTOM)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{LEFT}" y="22" font-size="14">Card latency over the day: '
             f'{first["calls"]} calls, portal {first["latency"]:g} s per request</text>']
    for i in range(6):
        sec = top * i / 5
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(sec):.1f}" y2="{y(sec):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y(sec) + 4:.1f}" text-anchor="end">'
                     f'{sec:g} s</text>')
    for hour in range(0, 25, 3):
        parts.append(f'<text x="{x(hour):.1f}" y="{H - BOTTOM + 18}" text-anchor="middle">'
                     f'{hour:02d}:00</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">'
                 'time of day (call start)</text>')
    parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(goal):.1f}" y2="{y(goal):.1f}" '
                 'stroke="#d62728" stroke-dasharray="2 3"/>')
    legend = []
    for r in runs:
        colour = COLOURS.get(r["mode"], "#2ca02c")
        for q, dash, name in ((0.5, "", "p50"), (0.99, "6 3", "p99")):
            pts = points(r["series"], q)
            if not pts:
                continue
            line = " ".join(f"{x(h):.1f},{y(v):.1f}" for h, v in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" '
                         f'stroke-width="2" stroke-dasharray="{dash}"/>')
            legend.append((colour, dash, f"{r['mode']} {name}"))
    legend.append(("#d62728", "2 3", f"goal p99 {goal:.2f} s"))
    for i, (colour, dash, label) in enumerate(legend):
        ly = TOP + 20 + i * 20
        parts.append(f'<line x1="{W - RIGHT + 15}" x2="{W - RIGHT + 45}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
        parts.append(f'<text x="{W - RIGHT + 52}" y="{ly + 4}">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)
