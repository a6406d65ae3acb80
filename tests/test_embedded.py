"""The embedded Redis never outlives the process that started it; others only use it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from app import embedded
from tests.conftest import ROOT, wait_for

# Starts the instance's server (or finds it), says so, then waits to be killed.
OWNER = ("import sys, time; from pathlib import Path; from app import embedded; "
         "print(embedded.ensure_running(Path(sys.argv[1])), flush=True); time.sleep(120)")


def servers_for(instance: Path) -> list[int]:
    """Pids of the redis-server processes listening on this instance's socket."""
    sock = str(embedded.socket_path(instance))
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # not a process, or it ended while we looked
            continue
        if b"redis-server" in cmdline and sock.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _env(instance: Path) -> dict[str, str]:
    """The embedded default: no REDIS_URL, DATABASE_URL or credentials."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"REDIS_URL", "DATABASE_URL", "B24_CLIENT_ID", "B24_CLIENT_SECRET",
                        "SECRET_KEY", "TOKEN_ENCRYPTION_KEY", "BROKER_URL"}}
    return {**env, "B24RELAY_INSTANCE": str(instance), "PYTHONPATH": str(ROOT)}


def _flask(instance: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", *args], cwd=ROOT,
                          env=_env(instance), capture_output=True, text=True, timeout=90)


@pytest.fixture
def owner(tmp_path: Path):
    """Factory: a process that starts the instance's server and keeps it; killed after."""
    started: list[subprocess.Popen] = []

    def start(instance: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", OWNER, str(instance)], cwd=ROOT,
                                env=_env(instance), stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().startswith("unix://")
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_a_flask_command_leaves_no_redis_server_behind(tmp_path: Path):
    for command in (("db", "upgrade"), ("portals", "list")):
        done = _flask(tmp_path, *command)
        assert done.returncode == 0, done.stderr
        wait_for(lambda: not servers_for(tmp_path), timeout=10)
    assert not embedded.socket_path(tmp_path).exists()


def test_a_sigkilled_starter_takes_its_server_along(tmp_path: Path, owner):
    starter = owner(tmp_path)
    assert len(servers_for(tmp_path)) == 1
    os.kill(starter.pid, signal.SIGKILL)
    wait_for(lambda: not servers_for(tmp_path), timeout=10)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(embedded.url_for(tmp_path)).ping()


def test_a_process_that_finds_the_server_running_only_uses_it(tmp_path: Path, owner):
    starter = owner(tmp_path)
    [server] = servers_for(tmp_path)
    client = redis.Redis.from_url(embedded.url_for(tmp_path))
    client.set("kept", "1")
    done = _flask(tmp_path, "db", "upgrade")
    assert done.returncode == 0, done.stderr
    assert servers_for(tmp_path) == [server], "the CLI neither stopped it nor started another"
    assert client.get("kept") == b"1"
    client.close()
    starter.kill()
    wait_for(lambda: not servers_for(tmp_path), timeout=10)


def test_concurrent_starters_share_one_server(tmp_path: Path):
    first, second = (subprocess.Popen([sys.executable, "-c", OWNER, str(tmp_path)], cwd=ROOT,
                                      env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
                     for _ in range(2))
    try:
        for proc in (first, second):
            assert proc.stdout is not None and proc.stdout.readline().startswith("unix://")
        assert len(servers_for(tmp_path)) == 1
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()
            proc.stdout.close()
    wait_for(lambda: not servers_for(tmp_path), timeout=10)


# Writes an event's worth of customer data through the app (a portal row in SQLite, a key in
# the embedded Redis), says so, then holds its connection open (so the WAL is there) until
# told to end.
WRITER = ("import sys; from app import create_app; from app.extensions import db, redis_ext; "
          "from app.tenants.models import Portal\n"
          "app = create_app()\n"
          "with app.app_context():\n"
          "    db.session.add(Portal(member_id='m' * 32, domain='acme.bitrix24.com', "
          "client_endpoint='https://acme.bitrix24.com/rest/', access_token='secret'))\n"
          "    db.session.commit()\n"
          "    redis_ext.client.set('b24relay:customer', 'data')\n"
          "    print('written', flush=True); sys.stdin.readline()\n")


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_database_and_the_redis_files_are_readable_by_their_owner_only(tmp_path: Path):
    instance = tmp_path / "instance"
    instance.mkdir(mode=0o755)
    instance.chmod(0o755)  # as an earlier version left it
    # The umask most hosts have (0644 files, 0755 folders): the app must not rely on it.
    upgraded = subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"],
                              cwd=ROOT, env=_env(instance), capture_output=True, text=True,
                              timeout=90, umask=0o022)
    assert upgraded.returncode == 0, upgraded.stderr
    writer = subprocess.Popen([sys.executable, "-c", WRITER], cwd=ROOT, env=_env(instance),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              umask=0o022)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "written\n"
        files = {name: instance / name for name in
                 ("b24relay.db", "b24relay.db-wal", "b24relay.db-shm", "redis.aof",
                  "redis.log")}
        assert all(path.exists() for path in files.values()), sorted(os.listdir(instance))
        assert (b"acme" in files["b24relay.db-wal"].read_bytes()
                and b"customer" in files["redis.aof"].read_bytes()), "they hold the data"
        assert {name: oct(_mode(path)) for name, path in files.items()} == \
            {name: "0o600" for name in files}
        assert oct(_mode(instance)) == "0o700"
    finally:
        writer.communicate("\n", timeout=30)
    wait_for(lambda: not servers_for(instance), timeout=10)
