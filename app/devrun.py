"""``make run``: the whole product on one machine, on the embedded default.

Starts (and on Ctrl-C stops) everything it needs: the embedded Redis unless
``REDIS_URL`` is set, the migrations, gunicorn with the web app, one Dramatiq
worker, and — when no ``B24_CLIENT_ID`` is set — the sandbox portal with the app
installed into it. Then prints the URLs to give Bitrix24.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from app import embedded
from app.config import ROOT, instance_dir


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"web server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"web server did not answer {url}/healthz within {timeout:.0f}s")


def _banner(public: str, local: str, sandbox: dict | None) -> str:
    lines = [
        "",
        "b24relay is running",
        f"  web (gunicorn)          {local}   health: {local}/healthz   metrics: {local}/metrics",
        "",
        "Give Bitrix24 these URLs (developer console, your app's card):",
        f"  Application URL         {public}/placements/settings",
        f"  Installer URL           {public}/install",
        f"  Event handler           {public}/b24/events   (the installer binds it itself)",
        f"  OAuth redirect URL      {public}/oauth/callback",
        f"PBX call events:          POST {public}/api/v1/calls/events",
        "                           (Bearer key: flask --app wsgi portals api-key MEMBER_ID)",
    ]
    if sandbox:
        lines += ["", "No B24_CLIENT_ID set: running against the sandbox portal (a local Bitrix24)"]
        lines += [f"  {k:<22}  {v}" for k, v in sandbox.items()]
    lines += ["", "Ctrl-C stops everything started here.", ""]
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM is handled like Ctrl-C: stop everything that was started."""
    raise KeyboardInterrupt


def main() -> int:
    """Start every process, print the URLs, and stop them all on Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
    instance = instance_dir()
    instance.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("ACCESS_LOG", "-")  # gunicorn's access log on stdout while developing
    own_redis = not env.get("REDIS_URL")
    procs: list[subprocess.Popen] = []
    try:
        if own_redis:
            env["REDIS_URL"] = embedded.ensure_running(instance)
        return _run(instance, env, procs)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        _stop_all(procs)
        if own_redis:
            embedded.stop(instance)


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _run(instance: Path, env: dict[str, str], procs: list[subprocess.Popen]) -> int:
    public = (env.get("APP_PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/")
    env["APP_PUBLIC_URL"] = public
    bind = env.get("BIND") or f"127.0.0.1:{urlsplit(public).port or 8000}"
    setup = None
    if not env.get("B24_CLIENT_ID"):
        from app.tenants import sandbox_setup as setup

        env.update(setup.sandbox_env(instance))
    prom = instance / "prometheus"
    shutil.rmtree(prom, ignore_errors=True)
    prom.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)

    py = sys.executable
    subprocess.run([py, "-m", "flask", "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env,
                   check=True)
    procs.append(subprocess.Popen(
        [py, "-m", "gunicorn", "--config", "gunicorn.conf.py", "wsgi:app"], cwd=ROOT,
        env={**env, "BIND": bind}))
    procs.append(subprocess.Popen(
        [py, "-m", "dramatiq", "--processes", "1", "--threads", "4", "workers"],
        cwd=ROOT, env=env))
    local = f"http://{bind}"
    _wait_healthy(local, procs[0])
    info = None
    if setup is not None:
        info = setup.start_sandbox_and_install(public, instance, procs=procs, env=env)
    print(_banner(public, local, info), flush=True)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    dead = [p.args for p in procs if p.poll() is not None]
    print(f"a process exited: {dead}; stopping the rest", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
