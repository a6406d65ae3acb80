"""``make run`` with no credentials: the launcher installs the app into a sandbox portal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.tenants import sandbox_setup
from app.tenants.sandbox_setup import free_port
from tests.conftest import ROOT

INSTALL_DEADLINE_SECONDS = 60


def _launch(instance: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()
           if k not in {"B24_CLIENT_ID", "B24_CLIENT_SECRET", "DATABASE_URL", "REDIS_URL",
                        "SECRET_KEY", "TOKEN_ENCRYPTION_KEY", "BROKER_URL"}}
    env.update(B24RELAY_INSTANCE=str(instance), APP_PUBLIC_URL=f"http://127.0.0.1:{port}",
               PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "app.devrun"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _read_banner(proc: subprocess.Popen, deadline: float) -> dict[str, str]:
    """The sandbox lines of the banner, as ``{label: value}``."""
    seen: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if time.monotonic() > deadline:
            break
        for label in ("sandbox", "member_id", "install finished", "event bindings",
                      "placements bound"):
            if line.strip().startswith(label + " "):
                seen[label] = line.strip()[len(label):].strip()
        if "Ctrl-C stops everything" in line:
            return seen
    raise AssertionError(f"no banner before the deadline; saw {seen}")


def test_make_run_installs_into_the_sandbox_within_60_seconds(tmp_path):
    port = free_port()
    started = time.monotonic()
    proc = _launch(tmp_path, port)
    try:
        banner = _read_banner(proc, started + INSTALL_DEADLINE_SECONDS)
        elapsed = time.monotonic() - started
        assert banner["install finished"] == "True"
        assert int(banner["event bindings"]) == 6 and int(banner["placements bound"]) == 2
        state = httpx.get(f"{banner['sandbox']}/_sandbox/portals/{banner['member_id']}"
                          "/install_state", timeout=10).json()
        assert state["install_finished"] is True
        assert elapsed < INSTALL_DEADLINE_SECONDS
        print(f"make run: app installed in the sandbox {elapsed:.1f}s after start")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)  # drain and close the pipe while it stops


def test_sandbox_env_is_stable_across_runs(tmp_path):
    first = sandbox_setup.sandbox_env(tmp_path)
    second = sandbox_setup.sandbox_env(tmp_path)
    assert first["B24_CLIENT_ID"] == second["B24_CLIENT_ID"]
    assert first["B24_CLIENT_SECRET"] == second["B24_CLIENT_SECRET"]
    assert first["B24_SANDBOX"] == "1"
    assert first["B24_JS_SDK_URL"].endswith("/bx24.js")
    assert first["B24_AUTH_SERVERS"] == first["B24_SANDBOX_URL"].split("://", 1)[1]
