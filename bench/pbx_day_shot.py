"""bench.pbx_day --screenshot: the live dashboard during the replay, in Chromium.

The app's TELEPHONY_ANALYTICS_MENU widget (POST /placements/dashboard) is opened inside the
sandbox portal's frame page, as an operator would open it in Bitrix24: Debian's Chromium,
driven by Playwright, loads the portal page, which POSTs the iframe form to the web tier; the
page draws its uPlot charts and numbers and BX24.fitWindow fits the frame to them. Then a
full-page PNG.

It stays out of the replay's way: a thread sleeps until the moment (70 % of the replay; the
end of the replay for the second one) and starts ``python -m bench.pbx_day_shot URL PNG`` as a
process of its own, so the replay's event loop only shares the machine's cores with it. What
that costs (wall seconds, and the CPU seconds of that process and its Chromium) goes into the
run's JSON with what the page showed: its chart canvases, the points each chart drew, and the
values of a few tiles.

    .venv/bin/python -m bench.pbx_day_shot FRAME_URL out.png   # one shot, a JSON line out
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CODE = "TELEPHONY_ANALYTICS_MENU"
HANDLER = "/placements/dashboard"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1100, "height": 900}
# The tiles a shot records (data-field of the dashboard page -> its text).
TILES = ("calls.total", "outbox.queued", "outbox.inflight", "batches_in_flight", "now.p50",
         "now.p95", "now.max", "now.commands_per_second", "calls.card_latency.p99")
SHOT_TIMEOUT = 150.0  # seconds for one shot's process, Chromium's start included
ROOT = Path(__file__).resolve().parent.parent


def chromium_missing() -> str | None:
    """Why no screenshot can be taken here, or None."""
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or CHROMIUM_PATH)"
    try:
        import playwright.sync_api  # noqa: F401 - only whether it is there
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    return None


def open_widget(stack: Any, row: Any, member: str) -> str:
    """Make the dashboard widget openable on a run's portal; returns its frame page's URL.

    The bench writes the app's portal row itself (no installer page ran), so the sandbox is
    told the install is finished (nothing is bound for ONAPPINSTALL: no event goes out) and
    the widget is bound with ``placement.bind`` as the installer binds it, to the web tier.
    The bind is one request at the portal's latency."""
    from app.dispatcher import direct

    control = stack.rig.control
    control.finish_install(member)
    direct.call_method(row, "placement.bind", {"PLACEMENT": CODE,
                                               "HANDLER": f"{stack.url}{HANDLER}",
                                               "TITLE": "b24relay: calls"})
    return str(control.frame_url(member, placement=CODE))


def suffixed(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` after its stem: docs.png, -end -> docs-end.png."""
    return path.with_name(f"{path.stem}{suffix}{path.suffix or '.png'}")


class Shots:
    """Screenshots of one run, each in a thread that starts the shot's process when due."""

    def __init__(self, url: str, label: str, path: Path) -> None:
        self.url, self.label, self.path = url, label, path  # path: the first shot's
        self.threads: list[threading.Thread] = []
        self.results: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def at(self, when: float, path: Path, moment: str, origin: float) -> None:
        """Take a shot to ``path`` at epoch ``when`` (now if past); ``moment`` names it,
        ``origin`` is the replay's start (the JSON says how far into it the shot began)."""
        thread = threading.Thread(target=self._take, args=(when, path, moment, origin),
                                  name=f"screenshot {moment}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _take(self, when: float, path: Path, moment: str, origin: float) -> None:
        time.sleep(max(0.0, when - time.time()))
        began = time.time()
        result: dict[str, Any] = {"path": str(path), "moment": moment, "taken_at": began,
                                  "replay_s": round(began - origin, 1)}
        proc = subprocess.Popen([sys.executable, "-m", "bench.pbx_day_shot", self.url,
                                 str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=SHOT_TIMEOUT)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                result.update(json.loads(lines[-1]))
            else:
                result["error"] = (err or out).strip()[-1500:] or f"exit code {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the shot's process group: its Chromium too
            proc.communicate()
            result["error"] = f"no screenshot within {SHOT_TIMEOUT:.0f}s"
        result["wall_s"] = round(time.time() - began, 2)
        with self.lock:
            self.results.append(result)
        if "error" in result:
            print(f"{self.label} screenshot at {moment} FAILED: {result['error']}", flush=True)
        else:
            print(f"{self.label} screenshot at {moment} ({result['replay_s']:.0f}s in): {path} "
                  f"({result['bytes']} bytes; "
                  f"{result['canvases']} chart canvases, points {result['points']}; calls "
                  f"{result['tiles'].get('calls.total')}, round trip p95 "
                  f"{result['tiles'].get('now.p95')}; took {result['wall_s']:.0f}s, "
                  f"{result['cpu_s']:.1f} CPU-s)", flush=True)

    def join(self, timeout: float = SHOT_TIMEOUT + 10) -> list[dict[str, Any]]:
        """Wait for the shots; returns their results in the order taken."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            return sorted(self.results, key=lambda r: r["taken_at"])


# ------------------------------------------------------------------ the shot's own process


def _dashboard_frame(page: Any, timeout: float) -> Any:
    """The portal page's app frame once it shows the dashboard (the widget's POST answered)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = page.frame(name="app")
        if frame is not None and f"{HANDLER}?" in frame.url:
            return frame
        page.wait_for_timeout(100)  # lets Playwright hear the frame's navigation
    raise RuntimeError(f"the dashboard never opened: {[(f.name, f.url) for f in page.frames]}")


def _cpu_seconds() -> float:
    """CPU seconds of this process and its descendants (Playwright's driver, Chromium)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + getattr(times, "children_user", 0.0) + \
            getattr(times, "children_system", 0.0)
    return total


def shoot(url: str, png: Path, timeout: float = 90.0) -> dict[str, Any]:
    """Open the frame page, wait for the charts and numbers, save a full-page PNG; returns
    what the page showed."""
    from playwright.sync_api import sync_playwright

    ms = timeout * 1000
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pbx-day-shot-") as home, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS,
                                     env={**os.environ, "HOME": home})
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            frame = _dashboard_frame(page, timeout)
            frame.wait_for_selector("#chart-round-trip canvas", timeout=ms)
            frame.wait_for_selector("#chart-rate canvas", timeout=ms)
            frame.wait_for_function(  # the numbers: the page's script has shown its data
                "document.querySelector('[data-field=\"updated\"]').textContent !== ''",
                timeout=ms)
            page.wait_for_function(  # the frame fitted to the page with its charts
                "Number(document.getElementById('app').getAttribute('data-fitted')) > 400",
                timeout=ms)
            page.wait_for_timeout(600)  # the last fit after the charts' layout
            page.screenshot(path=str(png), full_page=True)
            shown = {
                "canvases": frame.locator("canvas").count(),
                "points": {name: int(frame.get_attribute(f"#chart-{name}", "data-points") or 0)
                           for name in ("round-trip", "rate")},
                "tiles": {field: frame.locator(f'[data-field="{field}"]').first.inner_text()
                          for field in TILES},
                "fitted_height": int(page.get_attribute("#app", "data-fitted") or 0),
            }
            cpu = _cpu_seconds()
        finally:
            browser.close()
    return {**shown, "bytes": png.stat().st_size, "cpu_s": round(cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    """``URL PNG``: one shot; prints what the page showed as one JSON line."""
    url, png = (argv if argv is not None else sys.argv[1:])[:2]
    print(json.dumps(shoot(url, Path(png))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
