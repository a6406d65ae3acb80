"""Draw an ingest result as an SVG: p50 and p99 against the offered rate, app vs bare Flask.

    python -m bench.chart                       # newest bench/out/ingest-*.json
    python -m bench.chart RESULT.json -o FILE.svg

Plain SVG, no plotting library: two polylines per endpoint on a log latency axis,
and the 25 ms target as a dashed line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 400, 70, 170, 40, 50
SERIES = [("app_steps", "p50_ms", "#1f77b4", "app p50", ""),
          ("app_steps", "p99_ms", "#1f77b4", "app p99", "6 3"),
          ("bare_steps", "p50_ms", "#ff7f0e", "bare p50", ""),
          ("bare_steps", "p99_ms", "#ff7f0e", "bare p99", "6 3")]


def _scales(result: dict) -> tuple:
    rates = [s["rate"] for key in ("app_steps", "bare_steps") for s in result[key]]
    lo_r, hi_r = min(rates), max(rates)
    lo_l, hi_l = 0.5, 500.0

    def x(rate: float) -> float:
        return LEFT + (rate - lo_r) / max(hi_r - lo_r, 1) * (W - LEFT - RIGHT)

    def y(ms: float) -> float:
        ms = min(max(ms, lo_l), hi_l)
        frac = (math.log10(ms) - math.log10(lo_l)) / (math.log10(hi_l) - math.log10(lo_l))
        return H - BOTTOM - frac * (H - TOP - BOTTOM)

    return x, y, lo_r, hi_r


def render(result: dict, target_ms: float = 25.0) -> str:
    """The SVG text for one bench.ingest result."""
    x, y, lo_r, hi_r = _scales(result)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{LEFT}" y="22" font-size="14">Event intake latency vs offered rate '
             f'(app/bare peak ratio {result["ratio"]:.2f})</text>']
    for ms in (1, 2, 5, 10, 25, 50, 100, 250):
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(ms):.1f}" y2="{y(ms):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{y(ms) + 4:.1f}" text-anchor="end">{ms} ms</text>')
    step = next(s for s in (50, 100, 250, 500, 1000, 2500) if (hi_r - lo_r) / s <= 10)
    for rate in range(int(lo_r // step * step), int(hi_r) + 1, step):
        if rate >= lo_r:
            parts.append(f'<text x="{x(rate):.1f}" y="{H - BOTTOM + 18}" '
                         f'text-anchor="middle">{rate}</text>')
    parts.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">'
                 'offered events/s</text>')
    parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(target_ms):.1f}" '
                 f'y2="{y(target_ms):.1f}" stroke="#d62728" stroke-dasharray="2 3"/>')
    for i, (key, field, colour, label, dash) in enumerate(SERIES):
        points = " ".join(f"{x(s['rate']):.1f},{y(s[field]):.1f}" for s in result[key])
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                     f'stroke-width="2" stroke-dasharray="{dash}"/>')
        ly = TOP + 20 + i * 20
        parts.append(f'<line x1="{W - RIGHT + 15}" x2="{W - RIGHT + 45}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2" stroke-dasharray="{dash}"/>')
        parts.append(f'<text x="{W - RIGHT + 52}" y="{ly + 4}">{label}</text>')
    ly = TOP + 20 + len(SERIES) * 20
    parts.append(f'<line x1="{W - RIGHT + 15}" x2="{W - RIGHT + 45}" y1="{ly}" y2="{ly}" '
                 'stroke="#d62728" stroke-dasharray="2 3"/>')
    parts.append(f'<text x="{W - RIGHT + 52}" y="{ly + 4}">p99 target</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    """Write the chart of the given (or newest) result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", nargs="?", type=Path)
    parser.add_argument("-o", "--output", type=Path)
    args = parser.parse_args()
    source = args.result or max(OUT.glob("ingest-*.json"))
    target = args.output or source.with_suffix(".svg")
    target.write_text(render(json.loads(source.read_text())))
    print(f"chart: {target}")


if __name__ == "__main__":
    main()
