"""``make run`` (``python -m sandbox.devrun``), the real entry: it installs the app into a
sandbox portal, keeps its processes running, refuses a port someone else holds, and
leaves nothing behind, even when it is SIGKILLed."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from sandbox import appsetup
from sandbox.appsetup import free_port
from sandbox.client import SandboxControl
from sandbox.devrun import group_alive
from tests.conftest import ROOT, wait_for
from tests.test_embedded import servers_for

INSTALL_DEADLINE_SECONDS = 60
BANNER_LABELS = ("sandbox", "member_id", "install finished", "finished by", "event bindings",
                 "placements bound")


class MakeRun:
    """A running ``make run`` whose output is collected line by line."""

    def __init__(self, instance: Path, port: int, **extra_env: str) -> None:
        env = {k: v for k, v in os.environ.items()
               if k not in {"B24_CLIENT_ID", "B24_CLIENT_SECRET", "DATABASE_URL", "REDIS_URL",
                            "SECRET_KEY", "TOKEN_ENCRYPTION_KEY", "BROKER_URL"}}
        env.update(B24RELAY_INSTANCE=str(instance), APP_PUBLIC_URL=f"http://127.0.0.1:{port}",
                   PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **extra_env)
        self.instance, self.url = instance, f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbox.devrun"], cwd=ROOT,
                                     env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        """Everything printed so far."""
        return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first line from ``start`` on that matches ``pattern``."""
        def found() -> re.Match | None:
            return next(filter(None, (re.search(pattern, line)
                                      for line in self.lines[start:])), None)
        try:
            return wait_for(found, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(f"no line like {pattern!r}; output:\n{self.output()}") from None

    def banner(self, timeout: float) -> dict[str, str]:
        """The sandbox lines of the banner, as ``{label: value}``."""
        self.wait_for_line("Ctrl-C stops everything", timeout)
        seen = {}
        for line in self.lines:
            for label in BANNER_LABELS:
                if line.strip().startswith(label + " "):
                    seen[label] = line.strip()[len(label):].strip()
        return seen

    def pids(self) -> dict[str, int]:
        """The latest pid of each child, by name, as printed when it started."""
        return {m.group(1): int(m.group(2)) for m in
                (re.search(r"^started (.+) \(pid (\d+)\)", line) for line in self.lines) if m}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (only the launcher itself: its children must follow on their own)."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=60)
        self._reader.join(10)
        # Closing while the reader still reads would block: a leftover child keeps the pipe.
        if not self._reader.is_alive() and self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeRun]:
    """One ``make run`` in sandbox mode for this module's tests."""
    run = MakeRun(tmp_path_factory.mktemp("make-run"), free_port())
    run.started = time.monotonic()  # type: ignore[attr-defined]
    yield run
    run.stop()


def test_make_run_installs_into_the_sandbox_within_60_seconds(make_run):
    banner = make_run.banner(INSTALL_DEADLINE_SECONDS)
    elapsed = time.monotonic() - make_run.started
    assert banner["install finished"] == "True"
    # It says who finished it: on a real portal the installer page's script does.
    assert "control call" in banner["finished by"] and "installFinish()" in banner["finished by"]
    assert int(banner["event bindings"]) == 6 and int(banner["placements bound"]) == 2
    state = httpx.get(f"{banner['sandbox']}/_sandbox/portals/{banner['member_id']}"
                      "/install_state", timeout=10).json()
    assert state["install_finished"] is True
    assert elapsed < INSTALL_DEADLINE_SECONDS
    print(f"make run: app installed in the sandbox {elapsed:.1f}s after start")


def _portal(instance: Path, member_id: str) -> tuple[str, bool] | None:
    """(status, holds an application token) of a portal row in make run's SQLite file."""
    with sqlite3.connect(instance / "b24relay.db", timeout=10) as conn:
        row = conn.execute("SELECT status, application_token_hash IS NOT NULL FROM portals "
                           "WHERE member_id = ?", (member_id,)).fetchone()
    return (row[0], bool(row[1])) if row else None


def test_make_run_installs_a_short_form_portal(make_run):
    # The short iframe form names no SERVER_ENDPOINT: the app asks the first trusted auth
    # server, which make run must name as plain http (the sandbox has no TLS).
    banner = make_run.banner(INSTALL_DEADLINE_SECONDS)
    state = json.loads((make_run.instance / appsetup.STATE_FILE).read_text())
    with SandboxControl(banner["sandbox"]) as control:
        portal = control.create_portal(users=appsetup.DEMO_USERS, client_id=state["client_id"],
                                       client_secret=state["client_secret"],
                                       app_url=make_run.url, iframe_form="short")
        member_id = portal["member_id"]
        installed = control.install_app(member_id, make_run.url)
        assert "SERVER_ENDPOINT" not in installed["form"], "the sandbox sent the short form"
        assert installed["status"] == 200 and installed["install_pending"], installed["body"]
        finished = control.finish_install(member_id)
        assert [d["status"] for d in finished["onappinstall"]] == [200]
        # The worker processes ONAPPINSTALL: the portal is active with its application token.
        wait_for(lambda: _portal(make_run.instance, member_id) == ("active", True), timeout=30)
        opened = control.open_placement(member_id, "DEFAULT", user_id=1)
    assert opened["status"] == 200, opened["body"]
    assert make_run.proc.poll() is None, make_run.output()


def test_make_run_keeps_the_customer_data_it_wrote_private(make_run):
    make_run.banner(INSTALL_DEADLINE_SECONDS)  # the install wrote the portal and its events
    modes = {name: oct((make_run.instance / name).stat().st_mode & 0o777)
             for name in ("b24relay.db", "b24relay.db-wal", "b24relay.db-shm", "redis.aof",
                          ".metrics_token", ".secret_key")}
    assert modes == dict.fromkeys(modes, "0o600")
    assert oct(make_run.instance.stat().st_mode & 0o777) == "0o700"


def _statuses(instance: Path, event: str) -> list[str]:
    """The inbox statuses of this event's rows, read from make run's SQLite file."""
    with sqlite3.connect(instance / "b24relay.db", timeout=10) as conn:
        return [status for (status,) in conn.execute(
            "SELECT status FROM inbox_events WHERE event_type = ?", (event,))]


def test_a_sigkilled_worker_is_restarted_and_events_are_still_processed(make_run):
    banner = make_run.banner(INSTALL_DEADLINE_SECONDS)
    worker = make_run.pids()["worker (dramatiq)"]
    mark = len(make_run.lines)
    os.kill(worker, signal.SIGKILL)
    make_run.wait_for_line(r"worker \(dramatiq\) exited \(code -9\); restarting it in \d+s",
                           20, mark)
    make_run.wait_for_line(r"^started worker \(dramatiq\)", 20, mark)
    assert make_run.pids()["worker (dramatiq)"] != worker
    assert not group_alive(worker), "the killed worker's own processes are gone too"
    with SandboxControl(banner["sandbox"]) as control:  # Bitrix24 sends an event
        sent = control.trigger_event(banner["member_id"], "ONUSERADD",
                                     data={"FIELDS": {"ID": "2"}})
    assert sent["statuses"] == [200]
    wait_for(lambda: _statuses(make_run.instance, "ONUSERADD") == ["done"], timeout=30)
    assert make_run.proc.poll() is None, make_run.output()


def test_a_sigkilled_web_server_is_restarted_on_the_same_port(make_run):
    make_run.banner(INSTALL_DEADLINE_SECONDS)
    web = make_run.pids()["web (gunicorn)"]
    mark = len(make_run.lines)
    os.kill(web, signal.SIGKILL)
    make_run.wait_for_line(r"web \(gunicorn\) exited \(code -9\); restarting it", 20, mark)
    # make run holds the port: requests wait in its backlog instead of being refused.
    assert httpx.get(f"{make_run.url}/healthz", timeout=30).status_code == 200
    assert make_run.pids()["web (gunicorn)"] != web and not group_alive(web)


def _portal_names(instance: Path) -> list[str]:
    """Every member_id and domain in make run's database."""
    with sqlite3.connect(instance / "b24relay.db", timeout=10) as conn:
        return [name for row in conn.execute("SELECT member_id, domain FROM portals")
                for name in row]


def test_make_run_metrics_answer_only_the_token_and_name_no_portal(make_run):
    banner = make_run.banner(INSTALL_DEADLINE_SECONDS)
    token = (make_run.instance / ".metrics_token").read_text().strip()
    with SandboxControl(banner["sandbox"]) as control:  # work for the worker's dispatcher
        sent = control.trigger_event(banner["member_id"], "ONUSERADD",
                                     data={"FIELDS": {"ID": "3"}})
    assert sent["statuses"] == [200]
    scrape = f"{make_run.url}/metrics"
    assert httpx.get(scrape, timeout=10).status_code == 401
    assert httpx.get(scrape, headers={"Authorization": "Bearer " + "x" * len(token)},
                     timeout=10).status_code == 401

    def dispatched() -> str | None:  # merged from the worker processes' files
        resp = httpx.get(scrape, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert resp.status_code == 200
        return resp.text if 'b24relay_dispatch_commands_total{outcome="done"' in resp.text \
            else None

    text = wait_for(dispatched, timeout=30, interval=0.5)
    names = _portal_names(make_run.instance)
    assert len(names) >= 2  # every portal make run's tests installed
    assert not [line for line in text.splitlines() for name in names if name in line]


def test_a_port_another_process_holds_is_a_clear_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        run = MakeRun(tmp_path, port)
        assert run.proc.wait(timeout=30) != 0
        run.stop()
    out = run.output()
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Another process holds port" in out
    assert "b24relay is running" not in out
    assert not servers_for(tmp_path) and not (tmp_path / "b24relay.db").exists(), \
        "nothing was started"


def _group_listing(pgid: int) -> str:
    """The live processes of a process group, for a failure message."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(f"{stat.parent.name} {fields[0]} {cmd[:120]}")
    return "; ".join(found) or "none"


def test_a_sigkilled_make_run_leaves_no_process_behind(tmp_path):
    # Real credentials and nothing shared: one host on the embedded parts, said aloud.
    run = MakeRun(tmp_path / "instance", free_port(), B24_CLIENT_ID="app.devrun-test",
                  B24_CLIENT_SECRET="s", SECRET_KEY="k",
                  TOKEN_ENCRYPTION_KEY=Fernet.generate_key().decode())
    try:
        run.wait_for_line("Ctrl-C stops everything", INSTALL_DEADLINE_SECONDS)
        assert "B24RELAY_SINGLE_HOST=1" in run.output()
        children = run.pids()
        assert set(children) == {"web (gunicorn)", "worker (dramatiq)"}
        assert servers_for(tmp_path / "instance")
        run.stop(signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(tmp_path / "instance")], check=True)
        for name, pid in children.items():
            # Each child's graceful stop is bounded (a worker's engine may wait out an
            # in-flight request): gone, not fast, is the point.
            try:
                wait_for(lambda pid=pid: not group_alive(pid), timeout=90)
            except AssertionError:
                raise AssertionError(f"{name} left behind: {_group_listing(pid)}") from None
        wait_for(lambda: not servers_for(tmp_path / "instance"), timeout=10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{run.url}/healthz", timeout=2)
    finally:
        run.stop(signal.SIGKILL)


def test_sandbox_env_is_stable_across_runs(tmp_path):
    first = appsetup.sandbox_env(tmp_path)
    second = appsetup.sandbox_env(tmp_path)
    assert first["B24_CLIENT_ID"] == second["B24_CLIENT_ID"]
    assert first["B24_CLIENT_SECRET"] == second["B24_CLIENT_SECRET"]
    assert first["B24_SANDBOX"] == "1"
    assert first["B24_JS_SDK_URL"].endswith("/bx24.js")
    # With its scheme: a bare host would mean https, which the sandbox does not speak.
    assert first["B24_AUTH_SERVERS"] == first["B24_SANDBOX_URL"]
    assert first["B24_AUTH_SERVERS"].startswith("http://127.0.0.1:")
