"""``make run``: the whole product on one machine, on the embedded default.

Starts (and on Ctrl-C stops) everything it needs: the embedded Redis unless
``REDIS_URL`` is set, the migrations, gunicorn with the web app, one Dramatiq
worker, and — when no ``B24_CLIENT_ID`` is set — the sandbox portal with the app
installed into it. Then prints the URLs to give Bitrix24.

It is a small supervisor, not a production launcher:

- it takes the web port itself before starting anything and hands the listening
  socket to gunicorn (``fd://``), so a port that another process holds is a clear
  error at once, and ``/healthz`` on it can only be answered by our gunicorn;
- a web server or worker that dies is started again after a short backoff (a line
  says so); the sandbox portal keeps its portals in memory, so if it dies the run stops;
- every child dies with it (parent-death signal), even when it is SIGKILLed, and so
  does the embedded Redis it started (``app/embedded.py``).

Launcher variables it reads itself: ``APP_PUBLIC_URL``, ``BIND`` (host:port to listen
on), ``B24_SANDBOX_PORT`` (the sandbox's port, when free), ``B24_SANDBOX_LATENCY`` (the
sandbox's per-request latency in ms, ``N``, ``LO,HI`` or the default ``realistic``) and,
passed on to the app, everything else. With ``B24_CLIENT_ID`` set but no
``REDIS_URL``/``DATABASE_URL`` it runs one host on the embedded parts and sets
``B24RELAY_SINGLE_HOST=1`` for its children.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import httpx

from app import embedded
from app.config import DEFAULT_APP_PUBLIC_URL, ROOT, instance_dir, private_dir

MAX_BACKOFF = 30.0  # seconds before restarting a child that keeps dying
STABLE_AFTER = 60.0  # a child up this long has its backoff reset
STOP_GRACE = 15.0


class Child:
    """One supervised process, in its own process group, that dies with this launcher."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], *,
                 restart: bool = True, pass_fds: tuple[int, ...] = (),
                 stdout: IO[bytes] | None = None) -> None:
        self.name, self.cmd, self.env = name, cmd, env
        self.restart, self.pass_fds, self.stdout = restart, pass_fds, stdout
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        """Start (or start again) the process."""
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, pass_fds=self.pass_fds,
                                     stdout=self.stdout, stderr=self.stdout and subprocess.STDOUT,
                                     start_new_session=True,
                                     preexec_fn=embedded.die_with_parent())
        self.started = time.monotonic()
        print(f"started {self.name} (pid {self.proc.pid})", flush=True)

    def alive(self) -> bool:
        """Whether the process is running now."""
        return self.proc is not None and self.proc.poll() is None

    def watch(self) -> bool:
        """Restart the process once its backoff is over; False if it died for good."""
        if self.alive():
            if self.failures and time.monotonic() - self.started > STABLE_AFTER:
                self.failures = 0
            return True
        if self.restart_at is None:
            return self._died()
        if time.monotonic() >= self.restart_at:
            self.restart_at = None
            self.start()
        return True

    def _died(self) -> bool:
        assert self.proc is not None
        code = self.proc.returncode
        _end_group(self.proc.pid)  # its own children (gunicorn's or dramatiq's workers) go too
        if not self.restart:
            print(f"{self.name} exited (code {code})", file=sys.stderr, flush=True)
            return False
        delay = min(MAX_BACKOFF, 2.0 ** self.failures)
        self.failures += 1
        self.restart_at = time.monotonic() + delay
        print(f"{self.name} exited (code {code}); restarting it in {delay:.0f}s",
              file=sys.stderr, flush=True)
        return True

    def stop(self) -> None:
        """SIGTERM the process, wait for it, then end whatever is left of its group."""
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            _end_group(self.proc.pid)


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie waiting to be reaped does not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # it ended while we looked
            continue
        if state != "Z" and int(pgrp) == pgid:
            return True
    return False


def _end_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM what is left of a process group, SIGKILL it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not group_alive(pgid):
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.1)


def listen(bind: str) -> socket.socket:
    """Take the web port (``host:port``) for gunicorn, or exit saying who should move."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"make run: cannot listen on {bind}: {exc.strerror}. Another process holds port "
            f"{port} (a second make run?). Stop it, or run on another port, e.g. "
            f"APP_PUBLIC_URL=http://127.0.0.1:{int(port) + 1} make run") from exc
    sock.listen(2048)
    return sock


def _wait_healthy(url: str, web: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not web.alive():
            raise SystemExit(f"web server exited with code {web.proc and web.proc.returncode}")
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
        "                           (/metrics wants Authorization: Bearer $METRICS_TOKEN, by "
        "default the token in instance/.metrics_token)",
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


def _single_host(env: dict[str, str]) -> None:
    """Real credentials on the embedded parts: say so, and let the children start."""
    missing = [name for name in ("REDIS_URL", "DATABASE_URL") if not env.get(name)]
    if env.get("B24_CLIENT_ID") and missing and not env.get("B24RELAY_SINGLE_HOST"):
        env["B24RELAY_SINGLE_HOST"] = "1"
        print(f"make run: B24_CLIENT_ID is set without {' and '.join(missing)}: running as one "
              "host on the embedded parts (B24RELAY_SINGLE_HOST=1 for its processes). "
              "Production with several hosts needs both set.", flush=True)


def main() -> int:
    """Start every process, print the URLs, and stop them all on Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (nohup, &)
    instance = instance_dir()
    private_dir(instance)  # customer data lives here: 0700
    env = dict(os.environ)
    env.setdefault("ACCESS_LOG", "-")  # gunicorn's access log on stdout while developing
    _single_host(env)
    public = (env.get("APP_PUBLIC_URL") or DEFAULT_APP_PUBLIC_URL).rstrip("/")
    env["APP_PUBLIC_URL"] = public
    bind = env.get("BIND") or f"127.0.0.1:{urlsplit(public).port or 8000}"
    sock = listen(bind)
    children: list[Child] = []
    try:
        if not env.get("REDIS_URL"):
            # Started by, and so ending with, this process; the children only use it.
            env["REDIS_URL"] = embedded.ensure_running(instance)
        return _run(instance, env, sock, bind, children)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        sock.close()
        embedded.stop_started()


def _run(instance: Path, env: dict[str, str], sock: socket.socket, bind: str,
         children: list[Child]) -> int:
    sandbox = None
    if not env.get("B24_CLIENT_ID"):
        from sandbox import appsetup as sandbox

        port = os.environ.get("B24_SANDBOX_PORT")
        env.update(sandbox.sandbox_env(instance, int(port) if port else None))
    prom = instance / "prometheus"
    shutil.rmtree(prom, ignore_errors=True)
    prom.mkdir()
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)

    py = sys.executable
    subprocess.run([py, "-m", "flask", "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env,
                   check=True)
    web = Child("web (gunicorn)", [py, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                                   "wsgi:app"],
                {**env, "BIND": f"fd://{sock.fileno()}"}, pass_fds=(sock.fileno(),))
    worker = Child("worker (dramatiq)", [py, "-m", "dramatiq", "--processes", "1",
                                         "--threads", "4", "workers"], env)
    children += [web, worker]
    for child in children:
        child.start()
    local = f"http://{bind}"
    _wait_healthy(local, web)
    info = None
    if sandbox is not None:
        with (instance / "sandbox.log").open("ab") as log:
            command = sandbox.sandbox_command(instance, env.get("B24_SANDBOX_LATENCY"))
            portal = Child("sandbox portal", command, env,
                           restart=False, stdout=log)
            portal.start()
        children.append(portal)
        sandbox.wait_until_up(instance, portal.proc)
        info = sandbox.install(env["APP_PUBLIC_URL"], instance)
    print(_banner(env["APP_PUBLIC_URL"], local, info), flush=True)
    while all([child.watch() for child in children]):  # every child, every round
        time.sleep(0.5)
    print("stopping the rest", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
