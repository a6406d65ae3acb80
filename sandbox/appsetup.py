"""Try-it-locally mode: with no ``B24_CLIENT_ID``, ``make run`` installs the app into the sandbox.

It lives beside the sandbox, not in ``app/``: the app never imports the sandbox.

The sandbox portal (a fake Bitrix24 over loopback HTTP, ``python -m sandbox``)
runs as its own process. The app itself has no sandbox branch: it simply runs
with the sandbox's client id/secret, trusts the sandbox's auth server
(``B24_AUTH_SERVERS``) and loads the sandbox's stand-in BX24 library
(``B24_JS_SDK_URL``). Then the sandbox installs the app exactly as a portal
would: the installer iframe POST to ``/install``.

``sandbox/devrun.py`` calls, in this order::

    env.update(sandbox_env(instance, port))      # before starting the app
    # start sandbox_command(instance) as a child, then:
    wait_until_up(instance, proc)
    info = install(public_url, instance)
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from sandbox.client import SandboxControl

STATE_FILE = "sandbox.json"
FINISHED_BY = ("a control call, standing in for the installer page's script: on a real "
               "portal its BX24.installFinish() does it")
DEMO_USERS = [
    {"id": 1, "name": "Anna", "last_name": "Admin", "admin": True, "extension": "101"},
    {"id": 2, "name": "Boris", "last_name": "Sales", "extension": "102"},
    {"id": 3, "name": "Clara", "last_name": "Support", "extension": "103"},
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _state(instance_dir: Path, port: int | None = None) -> dict[str, Any]:
    """The sandbox app credentials and port (``port`` if free, else the last one if free,
    else any), kept in ``instance/sandbox.json``."""
    path = Path(instance_dir) / STATE_FILE
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if not state.get("client_id"):
        state["client_id"] = f"local.{secrets.token_hex(7)}.{secrets.token_hex(4)}"
        state["client_secret"] = secrets.token_urlsafe(24)
    wanted = int(port or state.get("port") or 0)
    state["port"] = wanted if wanted and _port_free(wanted) else free_port()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state))
    path.chmod(0o600)
    return state


def sandbox_env(instance_dir: Path, port: int | None = None) -> dict[str, str]:
    """The environment the app (web and workers) must run with in sandbox mode."""
    state = _state(instance_dir, port)
    url = f"http://127.0.0.1:{state['port']}"
    return {
        "B24_CLIENT_ID": state["client_id"],
        "B24_CLIENT_SECRET": state["client_secret"],
        "B24_SANDBOX": "1",
        "B24_SANDBOX_URL": url,
        # With its scheme: a bare host means https, and the short iframe form (no
        # SERVER_ENDPOINT) is verified at this first entry, so it must say plain http.
        "B24_AUTH_SERVERS": url,
        "B24_JS_SDK_URL": f"{url}/bx24.js",
    }


def _wait(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"sandbox exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _saved(instance_dir: Path) -> dict[str, Any]:
    return json.loads((Path(instance_dir) / STATE_FILE).read_text())


def sandbox_command(instance_dir: Path, latency: str | None = None) -> list[str]:
    """``python -m sandbox`` on the port :func:`sandbox_env` chose; ``latency`` (ms: ``N``,
    ``LO,HI`` or ``realistic``) replaces its realistic default."""
    cmd = [sys.executable, "-m", "sandbox", "--port", str(_saved(instance_dir)["port"])]
    return cmd + ["--latency", latency] if latency else cmd


def wait_until_up(instance_dir: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Wait for the sandbox started from :func:`sandbox_command` to answer."""
    _wait(f"http://127.0.0.1:{_saved(instance_dir)['port']}/_sandbox/portals", timeout, proc)


def install_into_sandbox(sandbox_url: str, app_public_url: str, client_id: str,
                         client_secret: str, timeout: float = 60.0) -> dict[str, Any]:
    """Create a demo portal for our client id and install the app into it.

    The installer POST, then the control call that finishes the install: nobody's
    browser runs the installer page here, and on a real portal only its script's
    BX24.installFinish() does that.
    """
    _wait(app_public_url.rstrip("/") + "/healthz", timeout)
    with SandboxControl(sandbox_url) as control:
        portal = control.create_portal(users=DEMO_USERS, client_id=client_id,
                                       client_secret=client_secret, app_url=app_public_url)
        result = control.install_app(portal["member_id"], app_public_url)
        finished = control.finish_install(portal["member_id"])
        bound = control.bindings(portal["member_id"])
        return {
            "sandbox": sandbox_url,
            "portal domain": portal["domain"],
            "member_id": portal["member_id"],
            "install HTTP status": result.get("status"),
            "install finished": finished.get("install_finished"),
            "finished by": FINISHED_BY,
            "event bindings": len(bound.get("events", [])),
            "placements bound": len(bound.get("placements", [])),
            "open the app": control.frame_url(portal["member_id"]),
        }


def install(app_public_url: str, instance_dir: Path) -> dict[str, Any]:
    """Install the app into the running sandbox; return what to print."""
    state = _saved(instance_dir)
    started = time.monotonic()
    info = install_into_sandbox(f"http://127.0.0.1:{state['port']}", app_public_url,
                                state["client_id"], state["client_secret"])
    info["install took"] = f"{time.monotonic() - started:.1f}s"
    return info
