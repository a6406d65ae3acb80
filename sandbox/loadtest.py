"""Drive one standard portal at a fixed request rate and tabulate successes vs QUERY_LIMIT_EXCEEDED.

python -m sandbox.loadtest --rate 300 --seconds 60 [--url http://127.0.0.1:PORT] [--method profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from typing import Any

import aiohttp

from .client import SandboxControl
from .limits import PLANS
from .server import SandboxServer


async def drive(
    endpoint: str, token: str, rate: float, seconds: float, method: str
) -> list[tuple[int, str, float]]:
    """Send rate*seconds requests on a fixed schedule; return (second, outcome, latency) per
    request.
    """
    results: list[tuple[int, str, float]] = []
    connector = aiohttp.TCPConnector(limit=512)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as http:

        async def one(second: int) -> None:
            t0 = time.perf_counter()
            try:
                async with http.post(f"{endpoint}{method}", data={"auth": token}) as resp:
                    body = await resp.json(content_type=None)
                    outcome = (
                        "ok"
                        if resp.status == 200 and "result" in body
                        else str(body.get("error", resp.status))
                    )
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                outcome = type(exc).__name__
            results.append((second, outcome, time.perf_counter() - t0))

        tasks = []
        total = int(rate * seconds)
        start = time.perf_counter()
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(int(i / rate))))
        await asyncio.gather(*tasks)
    return results


def table(results: list[tuple[int, str, float]], seconds: int) -> str:
    """Per-second and total table."""
    per: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for second, outcome, _ in results:
        per[second][outcome] += 1
    kinds = sorted({o for _, o, _ in results} - {"ok", "QUERY_LIMIT_EXCEEDED"})
    head = ["second", "sent", "ok", "QUERY_LIMIT_EXCEEDED", *kinds]
    lines = ["  ".join(f"{h:>20}" if i == 3 else f"{h:>8}" for i, h in enumerate(head))]
    for s in range(seconds):
        c = per.get(s, collections.Counter())
        row = [s, sum(c.values()), c["ok"], c["QUERY_LIMIT_EXCEEDED"], *[c[k] for k in kinds]]
        lines.append("  ".join(f"{v:>20}" if i == 3 else f"{v:>8}" for i, v in enumerate(row)))
    tot = collections.Counter(o for _, o, _ in results)
    row = ["total", len(results), tot["ok"], tot["QUERY_LIMIT_EXCEEDED"], *[tot[k] for k in kinds]]
    lines.append("  ".join(f"{v:>20}" if i == 3 else f"{v:>8}" for i, v in enumerate(row)))
    lat = sorted(x for _, _, x in results)
    if lat:
        lines.append(
            f"latency p50={lat[len(lat) // 2] * 1000:.1f} ms  "
            f"p99={lat[int(len(lat) * 0.99)] * 1000:.1f} ms  "
            f"max={lat[-1] * 1000:.1f} ms"
        )
    return "\n".join(lines)


def run(rate: float, seconds: int, url: str | None, method: str, plan: str) -> dict[str, Any]:
    """Run the load test (starting an in-process sandbox unless `url` is given) and print the
    table.
    """
    server = None if url else SandboxServer().start()
    base = url or server.url  # type: ignore[union-attr]
    try:
        with SandboxControl(base) as control:
            portal = control.create_portal(plan=plan)
            results = asyncio.run(
                drive(portal["client_endpoint"], portal["access_token"], rate, seconds, method)
            )
            print(table(results, seconds))
            counters = control.counters(portal["member_id"])
            ok = sum(1 for _, o, _ in results if o == "ok")
            burst, drain = PLANS[plan]["burst"], PLANS[plan]["drain"]
            print(
                f"expected ok ≈ burst + drain*seconds = "
                f"{burst} + {drain}*{seconds} = {burst + drain * seconds:.0f}; got {ok}; "
                f"server counted {counters['query_limit_exceeded']} QUERY_LIMIT_EXCEEDED, "
                f"max in flight "
                f"{counters['max_in_flight']}"
            )
            return {"ok": ok, "total": len(results), "counters": counters}
    finally:
        if server:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    """CLI entry."""
    ap = argparse.ArgumentParser(prog="python -m sandbox.loadtest")
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--url", default=None, help="an already running sandbox cloud URL")
    ap.add_argument("--method", default="profile")
    ap.add_argument("--plan", default="standard", choices=list(PLANS))
    args = ap.parse_args(argv)
    run(args.rate, args.seconds, args.url, args.method, args.plan)


if __name__ == "__main__":
    main()
