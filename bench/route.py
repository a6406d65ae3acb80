"""Routing latency (issue 23 point 4): ``GET /api/v1/calls/route`` with a warm and a cold cache.

    .venv/bin/python -m bench.route                 # SQLite; --database pg for PostgreSQL
    .venv/bin/python -m bench.route --requests 50   # a quick run

The app runs as in production (the Procfile's gunicorn line: gthread workers, one per core)
on the dispatcher benchmarks' rig (bench/dispatch_rig.py: a private Redis, the database
migrated, the sandbox in its own process). One portal with ``--requests`` CRM contacts, each
with its own number and a responsible at work with an extension. Rows, each ``--requests``
requests sent open-loop (request *i* is due at ``t0 + i/rate``; its latency counts from
then), over real HTTP:

1. hit: every number cached by an earlier ask, at ``--hit-rate`` (200) requests/s;
2. miss, the portal at its realistic latency (log-normal, 50-600 ms a request), at
   ``--miss-rate`` (4) requests/s: each request a new number, answered 200 when Bitrix24
   answers within TELEPHONY_ROUTE_WAIT;
3. miss, the portal at 10 s a request: each answered 204 at the bound, the lookup goes on.

After the slow row the bench waits for the lookups and counts the numbers cached: the
background half of a miss. Output: a table on stdout and ``bench/out/route-<time>.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from bench import loadgen
from bench.dispatch_rig import CLIENT_ID, CLIENT_SECRET, OUT, Rig, _wait, quantile
from sandbox.appsetup import free_port

PATH = "/api/v1/calls/route"
USERS = [{"id": 1, "name": "Ada", "admin": True, "extension": "101", "timeman": "OPENED"},
         {"id": 2, "name": "Bob", "extension": "102", "timeman": "OPENED"}]


def _portal(rig: Rig, contacts: int) -> tuple[Any, str, str]:
    """A sandbox portal (its bucket opened wide: this measures routing, not the rate limit),
    its row, extension map and API key, and ``contacts`` numbers for each row of the table."""
    from app.extensions import db
    from app.ingress import auth
    from app.tenants.models import Portal, PortalSettings
    from app.tenants.users import PortalUser

    info = rig.control.create_portal(client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
                                     users=USERS)
    member = info["member_id"]
    rig.control.set_bucket(member, drain=10_000, burst=10_000)
    rig.control.set_operating_limit(1e9, member)
    row = Portal(member_id=member, domain=info["domain"],
                 client_endpoint=info["client_endpoint"],
                 server_endpoint=info["server_endpoint"], access_token=info["access_token"],
                 refresh_token=info["refresh_token"],
                 expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                 status="active", installed_at=datetime.now(UTC))
    row.settings = PortalSettings(crm_create=False, default_user_id=1)
    db.session.add(row)
    db.session.flush()
    db.session.add_all(PortalUser(portal_id=row.id, user_id=u["id"], name=u["name"],
                                  extension=u["extension"], active=True) for u in USERS)
    db.session.commit()
    key = auth.issue_api_key(row)
    for block in range(3):
        for n in range(contacts):
            rig.control.add_crm(member, "contact", {
                "NAME": f"client {block}-{n}", "PHONE": [{"VALUE": number(block, n)}],
                "ASSIGNED_BY_ID": "2"})
    return row, member, key


def number(block: int, n: int) -> str:
    return f"+4930{block + 1}{n:06d}"


def _requests(base: str, key: str, phones: list[str]) -> list[bytes]:
    """Whole GET requests, rendered up front (bench/loadgen.py writes them to sockets)."""
    host = base.removeprefix("http://")
    return [(f"GET {PATH}?phone={quote(p)} HTTP/1.1\r\nHost: {host}\r\n"
             f"Authorization: Bearer {key}\r\nUser-Agent: b24relay-bench\r\n\r\n").encode()
            for p in phones]


async def _run(base: str, key: str, phones: list[str],
               rate: float) -> list[tuple[int, float]]:
    """Open loop over keep-alive connections (bench/loadgen.py, the intake bench's lean
    client: it shares the two cores with the server); (status, seconds from due time)."""
    out = await loadgen.generate(base + PATH, _requests(base, key, phones), rate)
    return [(status, ms / 1000) for status, ms, _ in out["results"]]


def cached(portal_id: int, phone: str) -> bool:
    from app.extensions import redis_ext
    from app.telephony.routing import KEY

    return bool(redis_ext.client.exists(KEY.format(portal=portal_id, phone=phone)))


async def _rows(rig: Rig, base: str, key: str, member: str, portal_id: int, requests: int,
                hit_rate: float, miss_rate: float
                ) -> list[tuple[str, float, list[tuple[int, float]]]]:
    """The three rows."""
    warm = [number(0, n) for n in range(requests)]
    rig.control.set_latency(member, 0)
    deadline = time.monotonic() + 120
    while (cold := [p for p in warm if not cached(portal_id, p)]) and \
            time.monotonic() < deadline:  # every number cached before the hit row
        await _run(base, key, cold, 20.0)
        await asyncio.sleep(1.0)  # lookups answered 204 at once finish meanwhile
    hits = await _run(base, key, warm, hit_rate)
    rig.control.set_latency(member, "realistic")
    fast = await _run(base, key, [number(1, n) for n in range(requests)], miss_rate)
    rig.control.set_latency(member, 10_000)
    slow = await _run(base, key, [number(2, n) for n in range(requests)], miss_rate)
    return [("hit (warm cache)", hit_rate, hits), ("miss, portal 50-600 ms", miss_rate, fast),
            ("miss, portal 10 s", miss_rate, slow)]


def _row(name: str, rate: float, results: list[tuple[int, float]]) -> str:
    times = [t * 1000 for _, t in results]
    ok = sum(1 for s, _ in results if s == 200)
    none = sum(1 for s, _ in results if s == 204)
    return (f"| {name} | {len(results)} at {rate:g}/s | {ok} / {none} | "
            f"{quantile(times, 0.5):.1f} | {quantile(times, 0.99):.1f} | {max(times):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--hit-rate", type=float, default=200.0)
    parser.add_argument("--miss-rate", type=float, default=4.0)
    args = parser.parse_args()

    rig = Rig(args.database, args.pg).start()
    try:
        row, member, key = _portal(rig, args.requests)
        port = free_port()
        env = {**rig.env, "BIND": f"127.0.0.1:{port}", "DISPATCH_BUCKET_SCALE": "1000"}
        rig._spawn([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                    "wsgi:app"], "web", env)
        base = f"http://127.0.0.1:{port}"
        _wait(lambda: httpx.get(base + "/healthz", timeout=2).status_code < 500, "gunicorn", 60)
        wait = float(rig.app.config["TELEPHONY_ROUTE_WAIT"])
        lines = [f"routing latency, {os.cpu_count()} cores, {args.database}, gunicorn "
                 f"({os.environ.get('WEB_CONCURRENCY') or os.cpu_count()} workers), "
                 f"TELEPHONY_ROUTE_WAIT={wait:g} s",
                 "", "| case | requests | 200 / 204 | p50 ms | p99 ms | max ms |",
                 "|---|---|---|---|---|---|"]

        for name, rate, results in asyncio.run(_rows(rig, base, key, member, row.id, args.requests,
                                                     args.hit_rate, args.miss_rate)):
            lines.append(_row(name, rate, results))
        cold = [number(2, n) for n in range(args.requests)]

        def filled() -> int:
            return sum(1 for p in cold if cached(row.id, p))

        deadline = time.monotonic() + 60
        while filled() < len(cold) and time.monotonic() < deadline:
            time.sleep(0.5)
        lines += ["", f"after the 10 s row: {filled()} of {len(cold)} numbers cached by the "
                      f"lookups that outlived their request (misses beyond "
                      f"TELEPHONY_ROUTE_LOOKUPS in flight are answered without one)",
                  f"bound: every miss p99 <= {wait:g} s + a little; hits in milliseconds"]
        text = "\n".join(lines)
        print(text)
        OUT.mkdir(parents=True, exist_ok=True)
        out = Path(OUT) / f"route-{datetime.now(UTC):%Y%m%dT%H%M%S}.txt"
        out.write_text(text + "\n")
        print(f"written to {out}")
    finally:
        rig.close()


if __name__ == "__main__":
    main()
