"""Settings from the environment, with safe defaults for the embedded mode.

Order of precedence: defaults in code < environment (and `.env`) < the mapping
given to ``create_app(config)``. Production is recognised by ``B24_CLIENT_ID``
being set (and ``B24_SANDBOX`` not): then secrets must come from the environment, and
``REDIS_URL`` and ``DATABASE_URL`` must name shared servers, loudly (see
:func:`require_shared_services`).

Every setting the app, the workers and the placements read is declared here; other
modules read ``current_app.config`` (or a value handed to them), never ``os.environ``.
Documented exceptions: ``B24RELAY_INSTANCE`` (read by :func:`instance_dir`, before any
app exists) and ``PROMETHEUS_MULTIPROC_DIR``, which ``prometheus_client`` reads itself at
import (it is declared below too, so ``/metrics`` knows to merge the worker processes).
The launchers (``gunicorn.conf.py``, ``sandbox/devrun.py``) read their own variables.
"""

from __future__ import annotations

import os
import secrets
import ssl
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
# Defaults of settings declared below, named where a comment or a launcher refers to them.
DEFAULT_AUTH_SERVERS = "oauth.bitrix.info,oauth.bitrix24.tech"
DEFAULT_JS_SDK_URL = "//api.bitrix24.com/api/v1/"
# The address the app answers at when APP_PUBLIC_URL is unset (make run's default bind too).
DEFAULT_APP_PUBLIC_URL = "http://127.0.0.1:8000"
# A refresh token dies 180 days after its issue (protocol §1.5); a chain nobody used that long
# is lost. The idle keep-alive (hourly) refreshes a portal quiet for IDLE_REFRESH_DAYS: 30
# leaves 150 days for a stopped worker or an auth-server outage and costs one refresh a month
# per idle portal, far from the over-refreshing Bitrix24 warns about. Above
# MAX_IDLE_REFRESH_DAYS the margin is too thin to trust, so the setting is refused.
REFRESH_TOKEN_DAYS = 180
DEFAULT_IDLE_REFRESH_DAYS = 30
MAX_IDLE_REFRESH_DAYS = 150
# The shortest METRICS_TOKEN accepted: /metrics is reachable by anyone who can reach the app.
MIN_METRICS_TOKEN = 16


def instance_dir() -> Path:
    """Where local state lives: ``B24RELAY_INSTANCE`` or ``./instance``."""
    return Path(os.environ.get("B24RELAY_INSTANCE") or ROOT / "instance")


# The instance folder holds customer data (the SQLite database and its WAL, the embedded
# Redis's AOF with queued events) and the dev secrets: only the user running the app may
# read it, whatever the umask (022 on most hosts: 0644 files, 0755 folders).
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` as a folder only this user may enter (0700), tightening one we own."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    return _tighten(path, PRIVATE_DIR)


def private_file(path: Path, create: bool = True) -> Path:
    """Create ``path`` empty and 0600 unless it exists (``create``); tighten one we own."""
    if create:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, PRIVATE_FILE))
    return _tighten(path, PRIVATE_FILE) if path.exists() else path


def private_sqlite(path: Path, instance: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (its WAL and SHM files then take the
    same mode), tighten them if they exist, and the instance folder when it holds them; a
    folder elsewhere is only created 0700, never changed (it may be shared)."""
    if path.parent.resolve() == instance.resolve():
        private_dir(instance)
    path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    private_file(path)
    for suffix in ("-wal", "-shm", "-journal"):
        private_file(path.with_name(path.name + suffix), create=False)


def _tighten(path: Path, mode: int) -> Path:
    """``path`` with ``mode`` if it is ours and wider; never a sticky folder such as /tmp."""
    st = path.stat()
    if st.st_uid == os.getuid() and not st.st_mode & 0o1000 and st.st_mode & 0o777 & ~mode:
        path.chmod(mode)
    return path


class ConfigError(RuntimeError):
    """A setting is missing or malformed; the message names it."""


def env_str(name: str, default: str | None = None) -> str | None:
    """Return an environment variable, treating an empty value as unset."""
    value = os.environ.get(name, "").strip()
    return value or default


def _env_number(name: str, default: Any, parse: Any, kind: str) -> Any:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from exc


def env_int(name: str, default: int) -> int:
    """Return an integer environment variable or fail naming it."""
    return int(_env_number(name, default, int, "an integer"))


def env_float(name: str, default: float) -> float:
    """Return a number (seconds, days) from the environment or fail naming it."""
    return float(_env_number(name, default, float, "a number"))


def env_bool(name: str, default: bool) -> bool:
    """Return a boolean environment variable (1/true/yes/on)."""
    raw = env_str(name)
    if raw is None:
        return default
    return raw.lower() in {"1", "true", "yes", "on"}


def normalise_database_url(url: str) -> str:
    """Map the common ``postgres://`` spellings onto the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _instance_secret(instance: Path, name: str, make: Any) -> str:
    """Read a generated dev secret from ``instance/``, creating it once."""
    path = instance / f".{name.lower()}"
    if path.exists():
        return path.read_text().strip()
    private_dir(instance)
    value = make()
    path.write_text(value)
    path.chmod(0o600)
    return value


def request_settings() -> dict[str, Any]:
    """The web tier's request limits (app/serving.py reads them for any app it serves)."""
    return {
        "MAX_CONTENT_LENGTH": env_int("MAX_BODY_BYTES", 256 * 1024),
        # app/serving.py: a request must arrive whole within this many seconds (else 408),
        # its headers within this many bytes (else 431); no thread waits for it meanwhile.
        "REQUEST_DEADLINE": env_int("REQUEST_DEADLINE_SECONDS", 10),
        "REQUEST_HEADER_BYTES": env_int("REQUEST_HEADER_BYTES", 64 * 1024),
    }


def worker_settings() -> dict[str, Any]:
    """Inbox retry, sweeper, retention and periodic-job settings (workers read them)."""
    return {
        # The retry budget of an inbox row is time, not attempts: a transiently failing row is
        # retried (with backoff) until this many hours after it arrived, then dead-lettered.
        # Bitrix24's bad minutes (a 503 storm, a short outage) then cost delay, not events.
        # The actor retries only when processing asks it to (workers/ingress.py).
        "INBOX_RETRY_HORIZON_HOURS": env_float("INBOX_RETRY_HORIZON_HOURS", 6.0),
        # Wait before retry n: INBOX_RETRY_BACKOFF * 2**(n-1) seconds, at most ..._MAX.
        "INBOX_RETRY_BACKOFF": env_float("INBOX_RETRY_BACKOFF", 1.0),
        "INBOX_RETRY_BACKOFF_MAX": env_float("INBOX_RETRY_BACKOFF_MAX", 30.0),
        # The sweeper (app.ingress.inbox.SweepPolicy has the meaning of each), in seconds.
        "INBOX_REQUEUE_RECEIVED_AFTER": env_float("INBOX_REQUEUE_RECEIVED_AFTER", 10.0),
        "INBOX_REQUEUE_AFTER": env_float("INBOX_REQUEUE_AFTER", 120.0),
        "INBOX_REQUEUE_AFTER_CAP": env_float("INBOX_REQUEUE_AFTER_CAP", 1800.0),
        # A handler may run this long; then its row's claim is renewed no more (a hung one).
        "INBOX_PROCESSING_TIMEOUT": env_float("INBOX_PROCESSING_TIMEOUT", 600.0),
        # A worker renews the claims of the rows it is handling every INBOX_HEARTBEAT_INTERVAL;
        # one not renewed for INBOX_HEARTBEAT_TIMEOUT lost its worker and is queued again
        # (app/ingress/heartbeat.py): a killed worker's rows go on within the timeout plus one
        # INBOX_SWEEP_INTERVAL.
        "INBOX_HEARTBEAT_INTERVAL": env_float("INBOX_HEARTBEAT_INTERVAL", 10.0),
        "INBOX_HEARTBEAT_TIMEOUT": env_float("INBOX_HEARTBEAT_TIMEOUT", 30.0),
        # Retention (app.ingress.retention), in days.
        "INBOX_KEEP_DONE_DAYS": env_int("INBOX_KEEP_DONE_DAYS", 7),
        "INBOX_KEEP_DEAD_DAYS": env_int("INBOX_KEEP_DEAD_DAYS", 30),
        "INBOX_PARK_DAYS": env_int("INBOX_PARK_DAYS", 30),
        # Periodic jobs (workers/scheduler.py): seconds between runs, and a switch to run none
        # in this worker process (tests that drive the sweeper themselves).
        "INBOX_SWEEP_INTERVAL": env_float("INBOX_SWEEP_INTERVAL", 15),
        "OFFLINE_PULL_INTERVAL": env_float("OFFLINE_PULL_INTERVAL", 30),
        "INBOX_PRUNE_INTERVAL": env_float("INBOX_PRUNE_INTERVAL", 3600),
        "B24RELAY_NO_PERIODIC": env_bool("B24RELAY_NO_PERIODIC", False),
    }


def dispatch_settings() -> dict[str, Any]:
    """The outgoing dispatcher's settings (app/dispatcher/, README "Outgoing: the dispatcher")."""
    return {
        # Run the dispatcher engine inside every Dramatiq worker process (workers/dispatcher.py);
        # off for processes that should not send (a dedicated `flask dispatcher run` does).
        "DISPATCH_ENABLED": env_bool("DISPATCH_ENABLED", True),
        # parallel: up to K batches in flight per portal; sequential: K=1 and the next batch
        # leaves only after the previous one came back (the benchmark baseline).
        "DISPATCH_MODE": env_str("DISPATCH_MODE", "parallel"),
        # K, batches in flight per portal; 0 derives it from the plan (its burst).
        "DISPATCH_MAX_INFLIGHT": env_int("DISPATCH_MAX_INFLIGHT", 0),
        # When fewer than 50 commands are ready, wait this long for more before sending.
        "DISPATCH_LINGER_MS": env_float("DISPATCH_LINGER_MS", 25.0),
        # A partial batch leaves at least this long after the previous launch while the
        # portal's bucket is empty, stretching to one drain interval as it fills.
        "DISPATCH_PACE_MS": env_float("DISPATCH_PACE_MS", 300.0),
        # A failing command is retried with backoff until this many hours after it first left.
        "DISPATCH_RETRY_HORIZON_HOURS": env_float("DISPATCH_RETRY_HORIZON_HOURS", 6.0),
        # Seconds a batch request may take before its outcome counts as unknown (a cloud
        # request is killed at 60 s), and the margin its commands' lease adds to that.
        "DISPATCH_REQUEST_TIMEOUT": env_float("DISPATCH_REQUEST_TIMEOUT", 65.0),
        "DISPATCH_LEASE_MARGIN": env_float("DISPATCH_LEASE_MARGIN", 15.0),
        # Seconds a process owns a portal's dispatching in Redis without renewing it; a dead
        # owner's portals are taken over by another process after this.
        "DISPATCH_OWNER_TTL": env_float("DISPATCH_OWNER_TTL", 10.0),
        # Seconds between sweeps (due retries, expired leases, held portals that cleared).
        "DISPATCH_SWEEP_INTERVAL": env_float("DISPATCH_SWEEP_INTERVAL", 5.0),
        # Threads the engine uses for database work, and the HTTP connection pool's size.
        "DISPATCH_DB_THREADS": env_int("DISPATCH_DB_THREADS", 4),
        "DISPATCH_MAX_CONNECTIONS": env_int("DISPATCH_MAX_CONNECTIONS", 1000),
        # Multiplies the plans' drain and burst in our rate bucket (the dispatcher's and the
        # direct calls'). Only for benchmarks and tests against a sandbox portal whose own
        # bucket is set far above its plan (bench.dispatch overhead); 1 in production.
        "DISPATCH_BUCKET_SCALE": env_float("DISPATCH_BUCKET_SCALE", 1.0),
        # Seconds of operating time per method per 10 minutes the ledger budgets (Bitrix24's
        # 480); benchmarks that raise the sandbox portal's limit raise this with it.
        "DISPATCH_OPERATING_LIMIT": env_float("DISPATCH_OPERATING_LIMIT", 480.0),
        # /metrics labels the dispatcher's per-minute figures by portal (its numeric id) for
        # this many of the busiest portals of the last minute, and "other" for the rest.
        "METRICS_PORTALS": env_int("METRICS_PORTALS", 20),
        # Outbox retention (app.dispatcher.retention), in days: done commands are deleted this
        # long after they completed, dead ones this long after they died; and the seconds
        # between retention passes (one worker runs each).
        "OUTBOX_KEEP_DONE_DAYS": env_float("OUTBOX_KEEP_DONE_DAYS", 7.0),
        "OUTBOX_KEEP_DEAD_DAYS": env_float("OUTBOX_KEEP_DEAD_DAYS", 30.0),
        "OUTBOX_PRUNE_INTERVAL": env_float("OUTBOX_PRUNE_INTERVAL", 3600.0),
        # A portal blocked by Bitrix24 support (OVERLOAD_LIMIT) gets one app.info this many
        # minutes after it was (last found) blocked, and resumes when it answers
        # (app/installation/blocked.py); 0: never probed, an operator resumes it.
        "OVERLOAD_PROBE_MINUTES": env_float("OVERLOAD_PROBE_MINUTES", 15.0),
        # A held (e.g. payment_required) portal's ONAPPUNINSTALL that app.info does not confirm
        # yet is asked about again after this many hours, doubling up to the max, and no more
        # this many days after the event (app/installation/lapsed.py).
        "UNINSTALL_RECHECK_HOURS": env_float("UNINSTALL_RECHECK_HOURS", 1.0),
        "UNINSTALL_RECHECK_MAX_HOURS": env_float("UNINSTALL_RECHECK_MAX_HOURS", 24.0),
        "UNINSTALL_RECHECK_DAYS": env_float("UNINSTALL_RECHECK_DAYS", 30.0),
        "UNINSTALL_RECHECK_INTERVAL": env_float("UNINSTALL_RECHECK_INTERVAL", 300.0),  # seconds
        # ONAPPUPDATE re-runs a portal's whole setup at most once per this many seconds (an
        # employee holding the application_token can send it at will); the rest are skipped
        # (app/installation/events.py). An admin's update bringing a new chain always runs.
        "SETUP_RERUN_INTERVAL": env_float("SETUP_RERUN_INTERVAL", 600.0),
    }


TELEPHONY_POLICIES = ("skip", "register")
TELEPHONY_ROUTE_KINDS = ("contact", "company", "lead")


def telephony_settings() -> dict[str, Any]:
    """Telephony's settings (app/telephony/, README "Telephony")."""
    return {
        # ISO 3166 country (DE, RU, ...) of numbers the PBX sends without a +: they are
        # registered in E.164 with its code. Empty: such numbers go as dialled (digits only),
        # and Bitrix24 will not match them to CRM records stored in E.164 (protocol §8.3).
        "TELEPHONY_DEFAULT_COUNTRY": env_str("TELEPHONY_DEFAULT_COUNTRY", ""),
        # register's CRM_SOURCE (a STATUS_ID of crm.status.list ENTITY_ID=SOURCE) for leads
        # the calls create; empty: not sent (Bitrix24's default source).
        "TELEPHONY_CRM_SOURCE": env_str("TELEPHONY_CRM_SOURCE", ""),
        # finish's ADD_TO_CHAT: one chat message per call for the employee.
        "TELEPHONY_ADD_TO_CHAT": env_bool("TELEPHONY_ADD_TO_CHAT", True),
        # Calls without a caller number, and calls whose number is one of the portal's
        # extensions: skip (nothing reaches Bitrix24) or register (an anonymous call as
        # TELEPHONY_ANONYMOUS_NUMBER, which must then be set; an internal one as the
        # extension, which Bitrix24 treats as an internal call, no CRM).
        "TELEPHONY_ANONYMOUS_CALLS": env_str("TELEPHONY_ANONYMOUS_CALLS", "skip"),
        "TELEPHONY_ANONYMOUS_NUMBER": env_str("TELEPHONY_ANONYMOUS_NUMBER", ""),
        "TELEPHONY_INTERNAL_CALLS": env_str("TELEPHONY_INTERNAL_CALLS", "skip"),
        # Click-to-call (app/telephony/click.py): an originate is tried for this many
        # seconds after the click (a click older than that is no use to the clicker), each
        # try waiting at most TELEPHONY_ORIGINATE_TIMEOUT for the PBX's answer.
        "TELEPHONY_ORIGINATE_DEADLINE": env_float("TELEPHONY_ORIGINATE_DEADLINE", 30.0),
        "TELEPHONY_ORIGINATE_TIMEOUT": env_float("TELEPHONY_ORIGINATE_TIMEOUT", 5.0),
        # A web-form callback (app/telephony/callback.py) is tried this many seconds after
        # its event (the choice of employee and the register included): the client asked
        # to be called back soon, but not within a click's half minute.
        "TELEPHONY_CALLBACK_DEADLINE": env_float("TELEPHONY_CALLBACK_DEADLINE", 120.0),
        # A PBX that took an originate reports the call (a start with origin_id) within
        # this many seconds, else the click's call is finished as failed (480).
        "TELEPHONY_ORIGINATE_REPORT_TIMEOUT": env_float("TELEPHONY_ORIGINATE_REPORT_TIMEOUT",
                                                        60.0),
        # A start without origin_id joins a click's call when it is outgoing, from the
        # clicker's extension, to the clicked number, within this many seconds of the
        # originate being taken.
        "TELEPHONY_ORIGINATE_JOIN_WINDOW": env_float("TELEPHONY_ORIGINATE_JOIN_WINDOW", 10.0),
        # How often the sweep finishes clicks the PBX never reported.
        "TELEPHONY_ORIGINATE_SWEEP_INTERVAL": env_float("TELEPHONY_ORIGINATE_SWEEP_INTERVAL",
                                                        15.0),
        # Recordings (app/telephony/recording.py): the app downloads the PBX's file and
        # attaches it after a successful finish. A file over MAX_BYTES is refused (the
        # download stops there); one up to BASE64_MAX bytes goes as attachRecord's base64
        # FILE_CONTENT through the outbox, a larger one by the two-step upload URL.
        "TELEPHONY_RECORD_MAX_BYTES": env_int("TELEPHONY_RECORD_MAX_BYTES", 100 * 1024 * 1024),
        "TELEPHONY_RECORD_BASE64_MAX": env_int("TELEPHONY_RECORD_BASE64_MAX", 1024 * 1024),
        # Seconds one download from the PBX may take, whole (connect, wait, body).
        "TELEPHONY_RECORD_TIMEOUT": env_float("TELEPHONY_RECORD_TIMEOUT", 60.0),
        # Tries of a recording (download, and the upload of a large file) before it is given
        # up with its reason; the first retry waits RETRY_SECONDS, each next one twice as long.
        "TELEPHONY_RECORD_ATTEMPTS": env_int("TELEPHONY_RECORD_ATTEMPTS", 5),
        "TELEPHONY_RECORD_RETRY_SECONDS": env_float("TELEPHONY_RECORD_RETRY_SECONDS", 30.0),
        # Seconds between sweeps that re-queue recordings whose job was lost (a worker that
        # stopped mid-download, a message that never got to the broker).
        "TELEPHONY_RECORD_SWEEP_INTERVAL": env_float("TELEPHONY_RECORD_SWEEP_INTERVAL", 60.0),
        # Seconds after a call's first event by which its `end` must have come; then the
        # sweeper (app/telephony/sweeper.py) finishes it: 304 "no end from the PBX" when
        # nobody answered an incoming call, else OTHER, with DURATION 0. 4 hours: longer than
        # any real call of a call centre (PBXs cut calls at 1-3 h), short enough that cards
        # and missed-call reports are right the same working day; Bitrix24 itself would keep
        # the call open (card, dedup target) for 30 days (protocol §8.15).
        "TELEPHONY_END_TIMEOUT": env_float("TELEPHONY_END_TIMEOUT", 4 * 3600.0),
        # Seconds an answer/transfer/end/ring that came before its start waits for it; then
        # the call is parked (`flask calls show`: "waited N s for its start") and its events
        # wait for `flask calls retry` (a late start still registers it). 10 minutes: a PBX
        # sends a call's events within seconds; one that needs longer has lost the start.
        "TELEPHONY_START_WAIT": env_float("TELEPHONY_START_WAIT", 600.0),
        # Seconds: a `start` whose `at` is older than this when it is handled is a replay of
        # a past call (a PBX re-sending its events after its link was down): no card is shown,
        # voximplant.statistic.get is asked by EXTERNAL_CALL_ID before registering, and the
        # finish posts no chat message. 15 minutes: far above how late a live start reaches
        # a worker (seconds; a backlog of a minute or two), so no live call loses its card,
        # and longer than a caller usually waits in a queue, so a card would pop up for a
        # conversation that is over. It also stays under the 25-minute register resend
        # window, so a start just past it can still have its register sent again.
        "TELEPHONY_REPLAY_AGE": env_float("TELEPHONY_REPLAY_AGE", 900.0),
        # Seconds between the sweeper's runs (workers/calls.py).
        "TELEPHONY_SWEEP_INTERVAL": env_float("TELEPHONY_SWEEP_INTERVAL", 60.0),
        # Seconds: a register whose answer was lost (a timeout, a 504) is sent again only
        # while its CALL_START_DATE is younger than this (and with SHOW=0). Bitrix24 dedups
        # the repeat onto the call it made only within 30 minutes of that start (protocol
        # §8.13); past it a repeat makes a second call. Keep a margin under 1800.
        "TELEPHONY_REGISTER_RESEND_WINDOW": env_float("TELEPHONY_REGISTER_RESEND_WINDOW",
                                                      1500.0),
        # How many times a finish whose answer was lost is sent again (a "Call is not
        # found" answer then means it had run: confirmed with voximplant.statistic.get).
        # After that the call's finish stays unknown, shown by `flask calls show`.
        "TELEPHONY_FINISH_RESENDS": env_int("TELEPHONY_FINISH_RESENDS", 3),
        # Seconds: a start, answer or transfer naming an extension that maps to nobody asks
        # for a user sync of its portal at most once per this interval (Bitrix24 has no
        # user-update event, protocol §8.10); 0: never on unknown extensions.
        "TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL": env_float(
            "TELEPHONY_UNKNOWN_EXTENSION_SYNC_INTERVAL", 300.0),
        # GET /api/v1/calls/route (app/telephony/routing.py): seconds an answer naming an
        # employee is cached per (portal, number); seconds a "no preference" one is (no CRM
        # match, nobody routable, or the lookup failed), kept short so a new client, a
        # reassigned one or a manager clocking in shows soon.
        "TELEPHONY_ROUTE_TTL": env_float("TELEPHONY_ROUTE_TTL", 300.0),
        "TELEPHONY_ROUTE_NEGATIVE_TTL": env_float("TELEPHONY_ROUTE_NEGATIVE_TTL", 30.0),
        # Seconds a routing miss waits for searchCrmEntities before answering 204; the lookup
        # goes on in the background and fills the cache for the next ask.
        "TELEPHONY_ROUTE_WAIT": env_float("TELEPHONY_ROUTE_WAIT", 1.5),
        # Which CRM match routes the call, first listed first: contact, company, lead (a type
        # left out never routes).
        "TELEPHONY_ROUTE_PRIORITY": env_str("TELEPHONY_ROUTE_PRIORITY", "contact,company,lead"),
        # Skip a responsible whose work day is not open (TIMEMAN_STATUS CLOSED, PAUSED or
        # EXPIRED); the next match's responsible is tried.
        "TELEPHONY_ROUTE_SKIP_ABSENT": env_bool("TELEPHONY_ROUTE_SKIP_ABSENT", True),
        # Lookups in flight per web process at most; a miss beyond that answers 204 at once
        # (a slow portal holds each lookup up to a request's timeout).
        "TELEPHONY_ROUTE_LOOKUPS": env_int("TELEPHONY_ROUTE_LOOKUPS", 32),
        # Requests per web process that may wait for a lookup at once; a miss beyond that
        # answers 204 at once (its lookup still runs), so misses at a slow portal never hold
        # all of a process's threads (WEB_THREADS, 4) that also take the PBX's call events.
        "TELEPHONY_ROUTE_WAITERS": env_int("TELEPHONY_ROUTE_WAITERS", 2),
    }


def diagnosis_settings() -> dict[str, Any]:
    """The self-diagnosis of a portal (app/installation/diagnosis.py, ``flask portals check``)."""
    return {
        # Seconds between two diagnoses of one portal run by the workers (after an install or
        # a settings save): a request inside the interval is run once at its end, so a settings
        # page saved ten times in a minute costs the portal one round, showing the last save.
        "DIAGNOSIS_MIN_INTERVAL": env_float("DIAGNOSIS_MIN_INTERVAL", 60.0),
        # Seconds the diagnosis after an install or a settings save waits first: the install's
        # installFinish, or the setup a save asked for (through the outbox), happens meanwhile.
        "DIAGNOSIS_SETTLE_SECONDS": env_float("DIAGNOSIS_SETTLE_SECONDS", 30.0),
        # Seconds the portal's clock may differ from ours before it is a finding. Our call start
        # dates, Bitrix24's 30-minute register dedup and its token expiry all read a clock.
        "DIAGNOSIS_CLOCK_SKEW": env_float("DIAGNOSIS_CLOCK_SKEW", 60.0),
        # Seconds one round trip may take before it is a finding (a normal day: well under
        # one; issue #11: about 10 s a batch on a bad day).
        "DIAGNOSIS_SLOW_SECONDS": env_float("DIAGNOSIS_SLOW_SECONDS", 5.0),
    }


def require_shared_services(cfg: dict[str, Any], database_url: str | None) -> None:
    """In production, refuse to run on per-host stand-ins for Redis and the database.

    Without ``REDIS_URL`` every host would start its own embedded Redis: the single-flight
    token refresh and the rate limit would each be per host, and two hosts refreshing one
    portal at once lose its chain. ``B24RELAY_SINGLE_HOST=1`` says there is one host only.
    """
    if not cfg["PRODUCTION"] or cfg["SINGLE_HOST"]:
        return
    missing = [name for name, value in (("REDIS_URL", cfg["REDIS_URL"]),
                                        ("DATABASE_URL", database_url)) if not value]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} must be set when B24_CLIENT_ID is set: production needs "
            "a shared Redis (REDIS_URL) and database (DATABASE_URL) for all its hosts, not the "
            "embedded ones each host would start. For a deliberate one-host install set "
            "B24RELAY_SINGLE_HOST=1.")


def from_environment(instance: Path) -> dict[str, Any]:
    """Build the settings mapping from environment variables."""
    production = env_str("B24_CLIENT_ID") is not None and not env_bool("B24_SANDBOX", False)
    shared_database = env_str("DATABASE_URL")
    database_url = shared_database or f"sqlite:///{instance / 'b24relay.db'}"
    cfg: dict[str, Any] = {
        "INSTANCE_PATH": str(instance),
        "SQLALCHEMY_DATABASE_URI": normalise_database_url(database_url),
        "REDIS_URL": env_str("REDIS_URL"),
        "BROKER_URL": env_str("BROKER_URL"),
        "B24_CLIENT_ID": env_str("B24_CLIENT_ID"),
        "B24_CLIENT_SECRET": env_str("B24_CLIENT_SECRET"),
        "B24_OAUTH_TOKEN_URL": env_str("B24_OAUTH_TOKEN_URL"),
        "APP_PUBLIC_URL": (env_str("APP_PUBLIC_URL") or DEFAULT_APP_PUBLIC_URL).rstrip("/"),
        "SECRET_KEY": env_str("SECRET_KEY"),
        "TOKEN_ENCRYPTION_KEY": env_str("TOKEN_ENCRYPTION_KEY"),
        "DB_CONNECT_TIMEOUT": env_int("DB_CONNECT_TIMEOUT", 5),
        # Unverified first contacts (ONAPPINSTALL from an unknown portal) per minute, per
        # source address and in total: 429 beyond (app/ingress/first_contact.py).
        "FIRST_CONTACT_PER_ADDRESS_PER_MINUTE": env_int("FIRST_CONTACT_PER_ADDRESS_PER_MINUTE",
                                                        30),
        "FIRST_CONTACT_PER_MINUTE": env_int("FIRST_CONTACT_PER_MINUTE", 300),
        # Events for a portal still waiting for its application_token (ONAPPINSTALL late) are
        # kept unprocessed this many seconds at most, and at most this many per portal in
        # that time (429 beyond): app/ingress/provisional.py.
        "PROVISIONAL_EVENT_MAX_AGE": env_float("PROVISIONAL_EVENT_MAX_AGE", 600.0),
        "PROVISIONAL_EVENTS_PER_PORTAL": env_int("PROVISIONAL_EVENTS_PER_PORTAL", 1000),
        # ... of which one source address (IPv4, or an IPv6 /64) may take this many.
        "PROVISIONAL_EVENTS_PER_ADDRESS": env_int("PROVISIONAL_EVENTS_PER_ADDRESS", 100),
        # Events that carry the portal's handler key (they come through the bindings the app
        # made, app/tenants/handler_key.py) have a ration of their own, this large, so that
        # a forger's flood cannot leave Bitrix24's own events refused.
        "PROVISIONAL_KEYED_EVENTS_PER_PORTAL": env_int("PROVISIONAL_KEYED_EVENTS_PER_PORTAL",
                                                       10000),
        # Verified events one portal may store per minute, in number and in bytes of body;
        # 429 beyond, until the minute ends (app/ingress/budget.py). An event type the app
        # has no handler for may be at most INTAKE_UNHANDLED_MAX_BYTES (413 beyond).
        # The defaults (250 events/s, 32 MiB a minute) let through what Bitrix24 can make a
        # portal send (an enterprise portal's REST ceiling, ~250 commands/s, each one event).
        "INTAKE_EVENTS_PER_PORTAL_PER_MINUTE": env_int("INTAKE_EVENTS_PER_PORTAL_PER_MINUTE",
                                                       15000),
        "INTAKE_BYTES_PER_PORTAL_PER_MINUTE": env_int("INTAKE_BYTES_PER_PORTAL_PER_MINUTE",
                                                      32 * 1024 * 1024),
        "INTAKE_UNHANDLED_MAX_BYTES": env_int("INTAKE_UNHANDLED_MAX_BYTES", 16 * 1024),
        # Auth servers whose app.info we trust when an iframe POST names its own
        # SERVER_ENDPOINT: comma-separated hosts (https) or scheme://host URLs. An iframe
        # POST without SERVER_ENDPOINT (the short form real portals send, protocol §2.3)
        # is verified at the configured auth server: the host of B24_OAUTH_TOKEN_URL when
        # that is set, else the FIRST entry here.
        "B24_AUTH_SERVERS": env_str("B24_AUTH_SERVERS", DEFAULT_AUTH_SERVERS),
        "B24_JS_SDK_URL": env_str("B24_JS_SDK_URL", DEFAULT_JS_SDK_URL),
        # A PEM file of the CAs every outgoing https call trusts (REST, token endpoint,
        # app.info): instead of, not on top of, the default store. Empty: httpx's default
        # store (certifi's bundle, or SSL_CERT_FILE). For a portal behind a private CA, or
        # the sandbox's https mode (`python -m sandbox --https` prints its CA file).
        "B24_CA_BUNDLE": env_str("B24_CA_BUNDLE"),
        # A portal with neither a refresh nor a call for this many days gets one refresh from
        # the hourly keep-alive (why 30, and why at most 150: DEFAULT_IDLE_REFRESH_DAYS above).
        "IDLE_REFRESH_DAYS": env_int("IDLE_REFRESH_DAYS", DEFAULT_IDLE_REFRESH_DAYS),
        # The single-flight token refresh (app/tenants/tokens.py): seconds a portal's refresh
        # lock lives unless renewed (more than the refresh request's worst case, 8 s retried
        # once, plus two commits), and seconds a caller waits for another process's refresh
        # of the same portal before giving up on this call.
        "B24_REFRESH_LOCK_TTL": env_float("B24_REFRESH_LOCK_TTL", 30.0),
        "B24_REFRESH_LOCK_WAIT": env_float("B24_REFRESH_LOCK_WAIT", 15.0),
        "DRAMATIQ_NAMESPACE": env_str("DRAMATIQ_NAMESPACE", "b24relay"),
        # How long an idle worker may take to notice a message on the queues a person waits
        # on (events, default), in ms: the cap of Dramatiq's idle backoff on Redis
        # (app/queue.py PromptRedisBroker). Lower is quicker and costs more idle polls.
        "WORKER_IDLE_POLL_MS": env_int("WORKER_IDLE_POLL_MS", 100),
        # The root logger's level for the app's and the workers' processes.
        "LOG_LEVEL": env_str("LOG_LEVEL", "INFO"),
        "PRODUCTION": production,
        # One host runs everything, so the embedded Redis and SQLite are allowed in production.
        "SINGLE_HOST": env_bool("B24RELAY_SINGLE_HOST", False),
        # Set for gunicorn (make run, the Procfile launcher): /metrics merges all processes.
        "PROMETHEUS_MULTIPROC_DIR": env_str("PROMETHEUS_MULTIPROC_DIR"),
        # The bearer token /metrics asks for ("Authorization: Bearer <token>", else 401): its
        # figures describe the customers, so only the operator's Prometheus may read them.
        # Unset in production: /metrics is not served at all (404) until one is chosen; in
        # development one is generated once into instance/.metrics_token. At least
        # MIN_METRICS_TOKEN characters.
        "METRICS_TOKEN": env_str("METRICS_TOKEN"),
        **request_settings(),
        **worker_settings(),
        **dispatch_settings(),
        **telephony_settings(),
        **diagnosis_settings(),
    }
    if cfg["SECRET_KEY"] is None:
        if production:
            raise ConfigError("SECRET_KEY must be set when B24_CLIENT_ID is set")
        cfg["SECRET_KEY"] = _instance_secret(instance, "SECRET_KEY", lambda: secrets.token_hex(32))
    if cfg["TOKEN_ENCRYPTION_KEY"] is None:
        if production:
            raise ConfigError("TOKEN_ENCRYPTION_KEY must be set when B24_CLIENT_ID is set")
        cfg["TOKEN_ENCRYPTION_KEY"] = _instance_secret(
            instance, "TOKEN_ENCRYPTION_KEY", lambda: Fernet.generate_key().decode()
        )
    if cfg["METRICS_TOKEN"] is None and not production:
        cfg["METRICS_TOKEN"] = _instance_secret(instance, "METRICS_TOKEN",
                                                lambda: secrets.token_urlsafe(32))
    if production and not cfg["B24_CLIENT_SECRET"]:
        raise ConfigError("B24_CLIENT_SECRET must be set when B24_CLIENT_ID is set")
    require_shared_services(cfg, shared_database)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Fail early, naming the setting, when a value cannot work."""
    keys = [k.strip() for k in str(cfg["TOKEN_ENCRYPTION_KEY"] or "").split(",") if k.strip()]
    if not keys:
        raise ConfigError("TOKEN_ENCRYPTION_KEY is empty")
    for key in keys:
        try:
            Fernet(key)
        except ValueError as exc:
            raise ConfigError(
                "TOKEN_ENCRYPTION_KEY must be one or more comma-separated Fernet keys "
                "(generate one with: python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())')"
            ) from exc
    _check_ca_bundle(cfg["B24_CA_BUNDLE"])
    token = cfg["METRICS_TOKEN"]
    if token is not None and len(str(token)) < MIN_METRICS_TOKEN:
        raise ConfigError(f"METRICS_TOKEN must be at least {MIN_METRICS_TOKEN} characters "
                          "(generate one with: python -c 'import secrets; "
                          "print(secrets.token_urlsafe(32))')")
    idle_days = cfg["IDLE_REFRESH_DAYS"]
    if idle_days is None or not 1 <= int(idle_days) <= MAX_IDLE_REFRESH_DAYS:
        raise ConfigError(f"IDLE_REFRESH_DAYS must be 1..{MAX_IDLE_REFRESH_DAYS} (refresh tokens "
                          f"die {REFRESH_TOKEN_DAYS} days after issue), got {idle_days!r}")
    if not [entry for entry in str(cfg["B24_AUTH_SERVERS"] or "").split(",") if entry.strip()]:
        raise ConfigError("B24_AUTH_SERVERS must name at least one auth server, got "
                          f"{cfg['B24_AUTH_SERVERS']!r}")
    scale = cfg["DISPATCH_BUCKET_SCALE"]
    if cfg["PRODUCTION"] and float(scale) != 1:
        raise ConfigError(f"DISPATCH_BUCKET_SCALE must be 1 in production (B24_CLIENT_ID set, "
                          f"B24_SANDBOX not), got {scale!r}: it multiplies the plans' rate "
                          "limits, a knob for benchmarks against a sandbox portal only")
    mode = cfg["DISPATCH_MODE"]
    if mode not in {"parallel", "sequential"}:
        raise ConfigError(f"DISPATCH_MODE must be parallel or sequential, got {mode!r}")
    _check_telephony(cfg)
    broker = cfg["BROKER_URL"]
    if broker and not broker.startswith(("amqp://", "amqps://", "redis://", "rediss://", "unix://")):
        raise ConfigError(f"BROKER_URL must be amqp:// or redis://, got {broker!r}")


def _check_telephony(cfg: dict[str, Any]) -> None:
    """The call policies name a known choice; registering anonymous calls needs a number."""
    for name in ("TELEPHONY_ANONYMOUS_CALLS", "TELEPHONY_INTERNAL_CALLS"):
        if cfg[name] not in TELEPHONY_POLICIES:
            raise ConfigError(f"{name} must be skip or register, got {cfg[name]!r}")
    if cfg["TELEPHONY_ANONYMOUS_CALLS"] == "register" and not cfg["TELEPHONY_ANONYMOUS_NUMBER"]:
        raise ConfigError("TELEPHONY_ANONYMOUS_CALLS=register needs TELEPHONY_ANONYMOUS_NUMBER "
                          "(Bitrix24 refuses a call without a number)")
    if int(cfg["TELEPHONY_RECORD_ATTEMPTS"]) < 1:
        raise ConfigError("TELEPHONY_RECORD_ATTEMPTS must be at least 1, got "
                          f"{cfg['TELEPHONY_RECORD_ATTEMPTS']!r}")
    if not 0 <= int(cfg["TELEPHONY_RECORD_BASE64_MAX"]) <= int(cfg["TELEPHONY_RECORD_MAX_BYTES"]):
        raise ConfigError("TELEPHONY_RECORD_BASE64_MAX must be 0..TELEPHONY_RECORD_MAX_BYTES")
    if not 0 < float(cfg["TELEPHONY_REGISTER_RESEND_WINDOW"]) < 1800:
        raise ConfigError("TELEPHONY_REGISTER_RESEND_WINDOW must be between 0 and 1800 seconds "
                          "(Bitrix24's dedup window), got "
                          f"{cfg['TELEPHONY_REGISTER_RESEND_WINDOW']!r}")
    if float(cfg["TELEPHONY_REPLAY_AGE"]) <= 0:
        raise ConfigError("TELEPHONY_REPLAY_AGE must be a positive number of seconds, got "
                          f"{cfg['TELEPHONY_REPLAY_AGE']!r}")
    if int(cfg["TELEPHONY_FINISH_RESENDS"]) < 0:
        raise ConfigError("TELEPHONY_FINISH_RESENDS must not be negative")
    priority = [kind.strip().lower() for kind in str(cfg["TELEPHONY_ROUTE_PRIORITY"] or "")
                .split(",") if kind.strip()]
    if not priority or not set(priority) <= set(TELEPHONY_ROUTE_KINDS):
        raise ConfigError("TELEPHONY_ROUTE_PRIORITY must list some of contact, company, lead "
                          f"(comma-separated), got {cfg['TELEPHONY_ROUTE_PRIORITY']!r}")
    if float(cfg["TELEPHONY_ROUTE_WAIT"]) <= 0 or min(int(cfg["TELEPHONY_ROUTE_LOOKUPS"]),
                                                      int(cfg["TELEPHONY_ROUTE_WAITERS"])) < 1:
        raise ConfigError("TELEPHONY_ROUTE_WAIT must be over 0, TELEPHONY_ROUTE_LOOKUPS and "
                          "TELEPHONY_ROUTE_WAITERS at least 1")
    country = str(cfg["TELEPHONY_DEFAULT_COUNTRY"] or "")
    if country and not (len(country) == 2 and country.isalpha()):
        raise ConfigError("TELEPHONY_DEFAULT_COUNTRY must be a two-letter country code "
                          f"(DE, RU, ...), got {country!r}")


def _check_ca_bundle(path: str | None) -> None:
    """A named CA bundle must load now, not at the first https call in a worker."""
    if not path:
        return
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"B24_CA_BUNDLE must name a PEM file of CA certificates, "
                          f"got {path!r}: {exc}") from exc
