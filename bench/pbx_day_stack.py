"""bench.pbx_day's processes and its replay.

The stack is production's shape, each part its own process (bench/dispatch_rig.py starts the
first three): a private Redis, a database (a fresh PostgreSQL database, or SQLite), the
sandbox portal (``python -m sandbox``), gunicorn with the web app (gunicorn.conf.py), a
Dramatiq worker (``make run``'s ``--processes 1 --threads 4`` unless told otherwise, its
in-process dispatcher off) and one
dispatcher engine (``flask dispatcher run``) started per run with that run's DISPATCH_MODE.
This process holds the app too (to make the portal's row, its users and its API key, and to
read the inbox and outbox counts while it waits), and serves the recordings.

Each run gets a fresh sandbox portal: its users carry the day's extensions, the app reads
them with ``user.get`` (app.installation.user_sync), and the PBX key is issued as
``flask portals api-key`` does.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.dispatch_rig import CLIENT_ID, CLIENT_SECRET, OPERATING_LIMIT, Rig, _wait
from bench.pbx_day_gen import Day
from sandbox.appsetup import free_port
from sandbox.limits import PLANS

RECORDING = b"ID3\x03\x00\x00\x00\x00\x00\x00" + bytes(8000)  # a small stand-in mp3
SETTLED_INBOX = ("received", "queued", "processing")  # still to be handled
RECORDS_PENDING = ("waiting", "queued", "working", "sent")  # app.telephony.recording.RecordState
REQUEST_TRIES = 5
RINGS = ("ring", "ring_end")
REGISTER = "telephony.externalcall.register"
FINISH = "telephony.externalcall.finish"
FAULT_METHODS = (REGISTER, FINISH)  # issue 22: faults "on register and on finish"


def _split(due: list[tuple[float, dict[str, Any]]]) -> list[list[tuple[float, dict[str, Any]]]]:
    """The due events in requests of at most 500, each ring or ring_end in one of its own
    (in posting order)."""
    out: list[list[tuple[float, dict[str, Any]]]] = [[]]
    for item in due:
        if item[1]["event"] in RINGS:
            out += [[item], []]
        elif len(out[-1]) >= 500:
            out.append([item])
        else:
            out[-1].append(item)
    return [b for b in out if b]


class _Recordings(http.server.BaseHTTPRequestHandler):
    """GET /rec/<anything>.mp3: the same small file; counts the downloads."""

    served = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self.path.startswith("/rec/"):
            self.send_error(404)
            return
        type(self).served += 1
        self.send_response(200)
        self.send_header("Content-Type", "audio/mpeg")
        self.send_header("Content-Length", str(len(RECORDING)))
        self.end_headers()
        self.wfile.write(RECORDING)

    def log_message(self, *args: Any) -> None:
        pass


def recordings_server() -> tuple[http.server.ThreadingHTTPServer, str]:
    """The PBX's recordings, on a loopback port; returns (server, base URL)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Recordings)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def sandbox_users(day: Day) -> list[dict[str, Any]]:
    """The sandbox portal's users: one per extension of the day (user 1 the admin)."""
    return [{"id": uid, "name": f"Agent{uid}", "last_name": f"Ext{ext}", "admin": uid == 1,
             "extension": ext} for ext, uid in sorted(day.extensions.items(), key=lambda p: p[1])]


@dataclass
class Scenario:
    """What a run does to the portal besides its latency (issue 22's acceptance).

    ``faults``: sandbox fault kind -> rate, on every request that calls one of
    FAULT_METHODS (a batch holding one). ``finish_cost``: seconds of portal time every
    finish takes, under the portal's own operating-time budget (``operating_budget``
    seconds per method per 10 minutes; None: the sandbox's, Bitrix24's 480) instead of
    the lifted one; None: no such scenario, the budget lifted."""

    faults: dict[str, float] = field(default_factory=dict)
    finish_cost: float | None = None
    operating_budget: float | None = None


class Stack:
    """Rig + gunicorn + a worker; a dispatcher engine and a portal per run."""

    def __init__(self, database: str, pg: str, worker_processes: int = 1,
                 worker_threads: int = 4) -> None:
        self.rig = Rig(database, pg)
        self.worker_argv = ["--processes", str(worker_processes), "--threads",
                            str(worker_threads)]
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.engine: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Stack:
        self.rig.start()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        # The portal's frame page opens the app's pages (bench.pbx_day --screenshot): the
        # web tier verifies iframe POSTs at the sandbox's auth server and loads its BX24.
        sandbox = self.rig.control.base_url
        self.web = self.rig._spawn([sys.executable, "-m", "gunicorn", "--config",
                                    "gunicorn.conf.py", "wsgi:app"], "web",
                                   {**self.rig.env, "BIND": f"127.0.0.1:{port}",
                                    "B24_AUTH_SERVERS": sandbox,
                                    "B24_JS_SDK_URL": f"{sandbox}/bx24.js"})
        self.worker = self.rig._spawn([sys.executable, "-m", "dramatiq", *self.worker_argv,
                                       "workers"], "worker",
                                      {**self.rig.env, "DISPATCH_ENABLED": "0"})
        _wait(lambda: httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200,
              "the web tier", 60)
        return self

    def dispatcher(self, mode: str, bucket_scale: float,
                   operating_limit: float = OPERATING_LIMIT) -> subprocess.Popen[bytes]:
        """A fresh engine in ``mode`` (the previous one stopped first), its rate bucket's
        plans scaled like the sandbox portal's, its operating-time ledger budgeting
        ``operating_limit`` seconds per method per 10 minutes (lifted unless told)."""
        if self.engine is not None:
            self.rig.stop(self.engine)
        self.engine = self.rig.engine(f"dispatcher-{mode}", DISPATCH_MODE=mode,
                                      DISPATCH_BUCKET_SCALE=bucket_scale,
                                      DISPATCH_OPERATING_LIMIT=operating_limit)
        return self.engine

    def portal(self, day: Day, latency_s: float, log_limit: int, bucket_scale: float,
               scenario: Scenario | None = None) -> tuple[Any, str, str]:
        """A sandbox portal at ``latency_s`` per request, its bucket's drain and burst times
        ``bucket_scale``, its row, users and PBX key: (row, member_id, key).

        ``scenario`` (see :class:`Scenario`): faults on the telephony writes, set once the
        users are read; a cost per finish under Bitrix24's operating-time budget."""
        from app.dispatcher import direct
        from app.extensions import db
        from app.ingress.auth import issue_api_key
        from app.installation.plan import as_list
        from app.installation.user_sync import sync_users
        from app.tenants.models import Portal

        control = self.rig.control
        control.settings(log_limit=log_limit)  # the portal's log is sized at its creation
        info = control.create_portal(plan="standard", users=sandbox_users(day),
                                     client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
        member = info["member_id"]
        plan: dict[str, Any] = PLANS["standard"]
        control.set_bucket(member, drain=float(plan["drain"]) * bucket_scale,
                           burst=float(plan["burst"]) * bucket_scale)
        scenario = scenario or Scenario()
        if scenario.finish_cost is None:
            # The sandbox books latency as operating time: a day at 2-10 s per request would
            # pause every method at once. The operating-time scenario (finish_cost) is below.
            control.set_operating_limit(OPERATING_LIMIT, member)
        else:
            # The operating-time scenario: the portal's own budget per method (the sandbox's
            # default is Bitrix24's 480 s per 10 minutes, unless a lower one is asked for),
            # the latency is waiting, not processing (set below with operating=False), and
            # only a finish books time: its cost.
            if scenario.operating_budget is not None:
                control.set_operating_limit(scenario.operating_budget, member)
            control.set_method_cost(member, FINISH, scenario.finish_cost)
        row = Portal(member_id=member, domain=info["domain"],
                     client_endpoint=info["client_endpoint"],
                     server_endpoint=info["server_endpoint"],
                     access_token=info["access_token"], refresh_token=info["refresh_token"],
                     expires_at=datetime.fromtimestamp(info["expires"], UTC), token_version=1,
                     status="active", installed_at=datetime.now(UTC))
        row.set_plan("standard")
        db.session.add(row)
        db.session.commit()
        control.set_latency(member, 0)  # users are read at full speed, then the day's latency
        records: list[dict[str, Any]] = []
        while True:
            page = as_list(direct.call_method(row, "user.get", {"start": len(records)}))
            records += page
            if len(page) < 50:
                break
        sync_users(row, records)
        db.session.commit()
        control.set_latency(member, latency_s * 1000.0,
                            operating=scenario.finish_cost is None)
        for kind, rate in scenario.faults.items():
            control.set_fault(member, kind, rate=rate, methods=list(FAULT_METHODS))
        return row, member, issue_api_key(row)

    def unsettled(self, portal_id: int) -> tuple[int, int, int, int]:
        """(inbox events not yet handled, outbox commands not final or whose outcome is not
        yet handled, outbox commands done, recordings not yet attached, failed or skipped).

        A recording goes through neither table between a finish's outcome and its
        attachRecord (a Dramatiq job downloads it first), hence the last count."""
        from sqlalchemy import func, select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db
        from app.ingress.models import InboxEvent as I
        from app.telephony.models import Call

        with db.engine.connect() as conn:
            inbox = conn.execute(select(func.count()).where(
                I.portal_id == portal_id, I.status.in_(SETTLED_INBOX))).scalar_one()
            rows = dict(conn.execute(select(O.status, func.count()).where(
                O.portal_id == portal_id).group_by(O.status)).all())
            outcomes = conn.execute(select(func.count()).where(
                O.portal_id == portal_id, O.status.in_(("done", "dead")),
                O.settled.is_(False))).scalar_one()
            records = conn.execute(select(func.count()).where(
                Call.portal_id == portal_id, Call.record_state.in_(RECORDS_PENDING))
            ).scalar_one()
        done = int(rows.get("done", 0))
        waiting = sum(v for k, v in rows.items() if k not in ("done", "dead")) + int(outcomes)
        return int(inbox), waiting, done, int(records)

    def writes(self, member: str) -> list[dict[str, Any]]:
        """The sandbox log's register and finish entries, in execution order."""
        entries = [e for method in FAULT_METHODS
                   for e in self.rig.control.log(member, method=method)]
        return sorted(entries, key=lambda e: e["seq"])

    def call_commands(self, portal_id: int, pbx_call_ids: list[str]
                      ) -> dict[str, list[dict[str, Any]]]:
        """Per PBX call id, the outbox commands of its ordering key in submission order:
        what the app sent for it and how each ended (for a call that broke a check)."""
        from sqlalchemy import select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db
        from app.telephony.models import Call

        out: dict[str, list[dict[str, Any]]] = {}
        with db.engine.connect() as conn:
            calls = dict(conn.execute(select(Call.pbx_call_id, Call.id).where(
                Call.portal_id == portal_id, Call.pbx_call_id.in_(pbx_call_ids))).all())
            for pbx_id, row_id in calls.items():
                rows = conn.execute(select(
                    O.id, O.method, O.status, O.attempts, O.batch_id, O.outcome, O.error,
                    O.dead_reason, O.submitted_at, O.completed_at).where(
                    O.portal_id == portal_id, O.key == f"call:{row_id}").order_by(O.id)).all()
                out[pbx_id] = [{"id": r.id, "method": r.method, "status": r.status,
                                "attempts": r.attempts, "batch_id": r.batch_id,
                                "outcome": r.outcome, "error": r.error,
                                "dead_reason": r.dead_reason,
                                "submitted_at": str(r.submitted_at),
                                "completed_at": str(r.completed_at)} for r in rows]
        return out

    def finish_outcomes(self, portal_id: int) -> dict[str, int]:
        """The app's own view of its calls' finishes: calls by ``finish_outcome`` (done,
        dead, unknown; "none": not ended)."""
        from sqlalchemy import func, select

        from app.extensions import db
        from app.telephony.models import Call

        with db.engine.connect() as conn:
            rows = conn.execute(select(Call.finish_outcome, func.count()).where(
                Call.portal_id == portal_id).group_by(Call.finish_outcome)).all()
        return {str(k or "none"): int(v) for k, v in rows}

    def dead_letters(self, portal_id: int) -> list[tuple[int, str, str]]:
        """The portal's dead outbox commands: (id, method, dead_reason)."""
        from sqlalchemy import select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db

        with db.engine.connect() as conn:
            rows = conn.execute(select(O.id, O.method, O.dead_reason).where(
                O.portal_id == portal_id, O.status == "dead").order_by(O.id)).all()
        return [(int(r[0]), str(r[1]), str(r[2] or "")) for r in rows]

    def inbox_statuses(self, portal_id: int) -> dict[str, int]:
        """The portal's PBX inbox rows by status."""
        from sqlalchemy import func, select

        from app.extensions import db
        from app.ingress.models import InboxEvent as I

        with db.engine.connect() as conn:
            rows = conn.execute(select(I.status, func.count()).where(
                I.portal_id == portal_id, I.source == "pbx").group_by(I.status)).all()
        return {str(k): int(v) for k, v in rows}

    def register_times(self, portal_id: int) -> dict[str, tuple[float, float | None,
                                                               float | None]]:
        """Per PBX call id, its register command's (submitted, first sent, completed) epochs:
        where a card's time went (the worker, the dispatcher's queue, the round trip)."""
        from sqlalchemy import select

        from app.dispatcher.models import OutboxCommand as O
        from app.extensions import db
        from app.telephony.models import Call

        def epoch(value: datetime | None) -> float | None:
            if value is None:
                return None
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()

        with db.engine.connect() as conn:
            rows = conn.execute(select(Call.pbx_call_id, O.submitted_at, O.first_sent_at,
                                       O.completed_at)
                                .join(O, O.id == Call.register_command_id)
                                .where(Call.portal_id == portal_id)).all()
        return {r[0]: (epoch(r[1]) or 0.0, epoch(r[2]), epoch(r[3])) for r in rows}

    def pids(self) -> dict[str, int]:
        out = {"web": self.web.pid if self.web else 0,
               "worker": self.worker.pid if self.worker else 0,
               "dispatcher": self.engine.pid if self.engine else 0,
               "sandbox": self.rig.sandbox.pid}
        return {k: v for k, v in out.items() if v}

    def close(self) -> None:
        self.rig.close()


def usage(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """CPU seconds so far and RSS (MiB) per role, its process and its children (psutil)."""
    import psutil

    out: dict[str, dict[str, float]] = {}
    for role, pid in pids.items():
        cpu = rss = 0.0
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                times = proc.cpu_times()
                cpu += times.user + times.system
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        out[role] = {"cpu_s": round(cpu, 2), "rss_mib": round(rss / 2**20, 1),
                     "processes": len(procs)}
    return out


# ------------------------------------------------------------------ the replay


@dataclass
class Replay:
    """What the replay saw: per call the start's 202 time and the ``at`` it was sent with."""

    accepted: dict[str, float] = field(default_factory=dict)  # call_id -> epoch of the 202
    start_at: dict[str, str] = field(default_factory=dict)  # call_id -> the start's at
    events: int = 0
    requests: int = 0
    stored_ids: set[int] = field(default_factory=set)
    duplicates: int = 0
    retries: int = 0
    failed: list[str] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)  # seconds a request left after its due time
    answer_s: list[float] = field(default_factory=list)  # seconds each 202 took to come
    began: float = 0.0
    ended: float = 0.0
    cpu_s: float = 0.0  # this process's CPU while replaying


def compression(rows: list[tuple[float, int, dict[str, Any]]], minutes: float) -> float:
    """How many times faster than the day the replay runs: the day's first to last post in
    ``minutes``."""
    return max(rows[-1][0] - rows[0][0], 1.0) / (minutes * 60.0)


def schedule(day: Day, rows: list[tuple[float, int, dict[str, Any]]], minutes: float,
             t0: float, wall_at: bool) -> list[tuple[float, dict[str, Any]]]:
    """(due epoch, event) in posting order: the day's first to last post spread over
    ``minutes``; with ``wall_at`` every ``at`` moves the same way (the offset kept)."""
    origin, factor = rows[0][0], compression(rows, minutes)
    tz = day.midnight.tzinfo
    out = []
    for send, _, event in rows:
        event = dict(event)
        if wall_at:
            sim = (datetime.fromisoformat(event["at"]) - day.midnight).total_seconds()
            moment = datetime.fromtimestamp(t0 + (sim - origin) / factor, tz)
            event["at"] = moment.isoformat(timespec="milliseconds")
        out.append((t0 + (send - origin) / factor, event))
    return out


async def replay(url: str, key: str, plan: list[tuple[float, dict[str, Any]]],
                 tick: float, progress: Any, concurrency: int = 64) -> Replay:
    """Post the events at their due times: every ``tick`` seconds the due ones in one request
    (at most 500, a call's events in order), up to ``concurrency`` requests at once. A request
    holding a call's event leaves after the 202 of the request with that call's previous
    event (PBX_EVENTS.md "Order": a call's events are applied in order of arrival)."""
    import aiohttp

    result = Replay(began=time.time())
    cpu0 = time.process_time()
    gate = asyncio.Semaphore(concurrency)
    endpoint = f"{url}/api/v1/calls/events"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def post(batch: list[tuple[float, dict[str, Any]]],
                       after: list[asyncio.Task[None]]) -> None:
            if after:  # the calls' earlier events first: their order is arrival order
                await asyncio.gather(*after)
            async with gate:
                result.lag.append(time.time() - batch[0][0])
                body = json.dumps({"events": [e for _, e in batch]}).encode()
                for attempt in range(REQUEST_TRIES):
                    try:
                        sent = time.time()
                        async with session.post(endpoint, data=body, headers=headers) as resp:
                            data = await resp.read()
                            if resp.status == 202:
                                now = time.time()
                                result.answer_s.append(now - sent)
                                answer = json.loads(data)
                                result.stored_ids.update(answer["ids"])
                                result.duplicates += int(answer.get("duplicates") or 0)
                                for _, e in batch:
                                    if e["event"] == "start":
                                        result.accepted[e["call_id"]] = now
                                        result.start_at[e["call_id"]] = e["at"]
                                result.requests += 1
                                result.events += len(batch)
                                return
                            if resp.status != 503:
                                result.failed.append(f"{resp.status} {data[:200]!r}")
                                return
                    except (TimeoutError, aiohttp.ClientError) as err:
                        if attempt == REQUEST_TRIES - 1:
                            result.failed.append(repr(err))
                            return
                    result.retries += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
                result.failed.append("503 after every retry")

        i, n, last_note = 0, len(plan), 0.0
        last: dict[str, asyncio.Task[None]] = {}  # call_id -> the request with its latest event

        def forget(calls: set[str], task: asyncio.Task[None]) -> None:
            for c in calls:
                if last.get(c) is task:
                    del last[c]

        while i < n:
            now = time.time()
            j = i
            while j < n and plan[j][0] <= now:
                j += 1
            # ring/ring_end go alone: an intake that does not know them yet refuses the
            # request, and only that event should be lost
            due = plan[i:j]
            batches = [due[k:k + 500] for k in range(0, len(due), 500)
                       ] if not any(e["event"] in RINGS for _, e in due) else _split(due)
            for batch in batches:
                calls = {e["call_id"] for _, e in batch}
                after = list({id(t): t for c in calls if (t := last.get(c)) is not None
                              and not t.done()}.values())
                task = asyncio.ensure_future(post(batch, after))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                for c in calls:
                    last[c] = task
                task.add_done_callback(functools.partial(forget, calls))
            i = j
            if now - last_note >= 5.0:
                last_note = now
                progress(result, i, n, len(tasks))
            if i < n:  # the next tick, or the next due event if that is later
                await asyncio.sleep(max(now + tick, plan[i][0]) - time.time())
        if tasks:
            await asyncio.gather(*tasks)
    result.ended = time.time()
    result.cpu_s = time.process_time() - cpu0
    return result


def env_note() -> str:
    """A line on the machine: cores, load."""
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
