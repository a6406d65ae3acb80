"""Click-to-call latency (issue 23, "Measured in bench/"): from the click, the sandbox portal
sending ONEXTERNALCALLSTART, to the PBX receiving the signed originate.

    .venv/bin/python -m bench.click                  # 200 clicks at 4/s, SQLite
    .venv/bin/python -m bench.click --clicks 50      # a quick run
    .venv/bin/python -m bench.click --database pg    # a fresh PostgreSQL database

The stack is production's shape, each part its own process (bench/dispatch_rig.py): a
private Redis, the database (migrated), the sandbox (``python -m sandbox``, the portal's
REST at its realistic latency, 50-600 ms a request), gunicorn with the web app
(gunicorn.conf.py), a Dramatiq worker (``--processes 1 --threads 4``, as ``make run``) and a
dispatcher engine (``flask dispatcher run``). The app is installed into the sandbox portal
the way Bitrix24 does it (the installer POST, installFinish, ONAPPINSTALL), which binds its
events and reads the users' extensions; ``pbx_originate_url`` and ``pbx_secret`` are set with
``flask portals settings``. The PBX is the test PBX (sandbox/pbx.py) in this process: it
checks each signature and reports each call (start with ``origin_id``, answer, end), so the
worker joins and finishes the calls while later clicks come in.

Each click is a new number, by one of four users in turn, sent open loop (click *i* is due at
``t0 + i/rate``). Its time runs from just before the sandbox is asked to send the event to
the test PBX's arrival time of the originate naming that click's ``CALL_ID``. The sandbox
delivers events at once here (``event_delay`` 0): Bitrix24's own queue adds 0.5-3 s before
the app hears of a click (protocol §3.2), on top of what is measured, and nothing the app
does can shorten it. Output: a table on stdout and ``bench/out/click-<time>.txt``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

from bench.dispatch_rig import (
    CLIENT_ID,
    CLIENT_SECRET,
    OPERATING_LIMIT,
    OUT,
    ROOT,
    Rig,
    _wait,
    quantile,
)
from sandbox.appsetup import free_port
from sandbox.pbx import Originate, TestPBX

USERS = [{"id": 1, "name": "Ada", "admin": True, "extension": "101"},
         {"id": 2, "name": "Bob", "extension": "102"},
         {"id": 3, "name": "Cy", "extension": "103"},
         {"id": 4, "name": "Di", "extension": "104"}]
SECRET = "bench-click-secret-0123456789abcdef"


def _stack(rig: Rig) -> str:
    """gunicorn, a worker and a dispatcher engine, configured for the sandbox's auth server;
    the web tier's base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    rig.env.update(B24_AUTH_SERVERS=rig.control.base_url, APP_PUBLIC_URL=base,
                   B24_JS_SDK_URL=f"{rig.control.base_url}/bx24.js")
    rig._spawn([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"],
               "web", {**rig.env, "BIND": f"127.0.0.1:{port}"})
    rig._spawn([sys.executable, "-m", "dramatiq", "--processes", "1", "--threads", "4",
                "workers"], "worker", {**rig.env, "DISPATCH_ENABLED": "0"})
    rig.engine("dispatcher")
    _wait(lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200, "gunicorn", 60)
    return base


def _install(rig: Rig, base: str) -> tuple[int, str]:
    """A sandbox portal with the app installed as Bitrix24 installs it; (portal id, member)."""
    from app.extensions import db
    from app.tenants.models import Portal
    from app.tenants.users import extension_map

    info = rig.control.create_portal(users=USERS, client_id=CLIENT_ID,
                                     client_secret=CLIENT_SECRET, app_url=base)
    member = info["member_id"]
    rig.control.set_operating_limit(OPERATING_LIMIT, member)
    rig.control.set_latency(member, 0)  # the install at full speed, then the realistic latency
    installed = rig.control.install_app(member, base)
    if installed["status"] != 200:
        raise RuntimeError(f"install: {installed}")
    rig.control.finish_install(member)

    def ready() -> bool:
        db.session.remove()
        portal = Portal.by_member_id(member)
        return bool(portal and portal.application_token and len(extension_map(portal)) == 4)

    _wait(ready, "the install (ONAPPINSTALL, the users' extensions)", 60)
    rig.control.set_latency(member, "realistic")
    portal = Portal.by_member_id(member)
    assert portal is not None
    return portal.id, member


def _configure(rig: Rig, member: str, pbx_url: str) -> None:
    """The originate settings, set the way an operator sets them."""
    result = subprocess.run([sys.executable, "-m", "flask", "portals", "settings", member,
                             f"pbx_originate_url={pbx_url}", f"pbx_secret={SECRET}"],
                            cwd=ROOT,
                            env=rig.env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)


def _key(portal_id: int) -> str:
    from app.extensions import db
    from app.ingress.auth import issue_api_key
    from app.tenants.models import Portal

    portal = db.session.get(Portal, portal_id)
    assert portal is not None
    return issue_api_key(portal)


def _clicks(rig: Rig, member: str, clicks: int, rate: float) -> list[tuple[str, float]]:
    """Send the clicks open loop; (CALL_ID, when the click was sent) per click."""
    sent: list[tuple[str, float]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        user = USERS[i % len(USERS)]["id"]
        due = start + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        at = time.time()
        out = rig.control.trigger_event(member, "ONEXTERNALCALLSTART", {
            "PHONE_NUMBER": f"+49309{i:06d}", "USER_ID": str(user)}, user_id=user)
        if out["statuses"] != [200]:
            raise RuntimeError(f"click {i}: {out}")
        with lock:
            sent.append((str(out["data"]["CALL_ID"]), at))

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        for future in [pool.submit(one, i) for i in range(clicks)]:
            future.result()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="clicks per second")
    args = parser.parse_args()

    rig = Rig(args.database, args.pg).start()
    pbx: TestPBX | None = None
    try:
        rig.control.settings(event_delay=0)
        base = _stack(rig)
        portal_id, member = _install(rig, base)
        arrived: dict[str, float] = {}
        lock = threading.Lock()

        def took(row: Originate) -> None:
            with lock:
                arrived.setdefault(str(row.body.get("call_id")), row.received)

        pbx = TestPBX(app=base, api_key=_key(portal_id), secret=SECRET, ring=0.5, talk=2.0,
                      on_originate=took).start()
        _configure(rig, member, pbx.url)
        load = os.getloadavg()
        sent = _clicks(rig, member, args.clicks, args.rate)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(c not in arrived for c, _ in sent):
            time.sleep(0.2)
        times = [(arrived[c] - at) * 1000 for c, at in sent if c in arrived]
        extra = len(pbx.originates) - len(arrived)
        lines = [f"click to originate, {os.cpu_count()} cores, load average before "
                 f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), "
                 f"{args.database}, gunicorn + 1 worker (4 threads) + 1 dispatcher engine, "
                 f"portal REST at 50-600 ms",
                 "", "| clicks | rate | originates received | p50 ms | p99 ms | max ms |",
                 "|---|---|---|---|---|---|",
                 f"| {len(sent)} | {args.rate:g}/s | {len(times)} (+{extra} extra) | "
                 f"{quantile(times, 0.5):.0f} | {quantile(times, 0.99):.0f} | "
                 f"{max(times):.0f} |" if times else "| no originate arrived |",
                 "", f"refused by the PBX (signature): {len(pbx.refused)}; "
                     f"PBX reports that failed: {len(pbx.errors)}; load average after "
                     f"{os.getloadavg()[0]:.2f}"]
        text = "\n".join(lines)
        print(text)
        OUT.mkdir(parents=True, exist_ok=True)
        out = Path(OUT) / f"click-{datetime.now(UTC):%Y%m%dT%H%M%S}.txt"
        out.write_text(text + "\n")
        print(f"written to {out}")
    finally:
        if pbx is not None:
            pbx.close(wait=5)
        rig.close()


if __name__ == "__main__":
    main()
