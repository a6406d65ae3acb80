"""A real app process that calls one portal from many threads (used by the concurrency tests).

Run as ``python -m tests.tenants.caller_proc MEMBER_ID THREADS``; prints READY,
waits for a line on stdin, lets every thread call ``user.current`` at once and
prints one JSON line: ``{"ok": n, "errors": [...], "seconds": s}``.
``CALLER_CONFIG`` may hold JSON config overrides for the app.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from app import create_app
from app.dispatcher import direct
from app.extensions import db
from app.tenants import service


def main(member_id: str, threads: int) -> None:
    app = create_app({
        "SQLALCHEMY_ENGINE_OPTIONS": {
            "pool_size": 5, "max_overflow": 5, "pool_timeout": 60,
            **({"connect_args": {"timeout": 30}} if "sqlite" in _db_url() else {})},
        **json.loads(os.environ.get("CALLER_CONFIG") or "{}")})
    go = threading.Event()
    ready = threading.Barrier(threads + 1)
    results: list[str | None] = []
    lock = threading.Lock()

    def worker() -> None:
        with app.app_context():
            portal = service.get_portal(member_id)
            db.session.close()  # the portal stays usable detached; no connection held
            ready.wait()
            go.wait()
            try:
                me = direct.call_method(portal, "user.current")
                outcome = None if me.get("ID") == "1" else f"unexpected result {me!r}"
            except Exception as exc:  # noqa: BLE001 - reported to the test
                outcome = f"{type(exc).__name__}: {exc}"
            with lock:
                results.append(outcome)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    ready.wait()
    print("READY", flush=True)
    sys.stdin.readline()
    started = time.monotonic()
    go.set()
    for t in pool:
        t.join()
    errors = [r for r in results if r]
    print(json.dumps({"ok": len(results) - len(errors), "errors": errors[:20],
                      "seconds": round(time.monotonic() - started, 3)}), flush=True)


def _db_url() -> str:
    return os.environ.get("DATABASE_URL", "sqlite")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
