"""bench.pbx_day --screenshot: a tiny day on the real stack (its own Redis, SQLite, the sandbox
portal, gunicorn, a worker, a dispatcher engine), with the live dashboard photographed in
Chromium during the replay and at its end.

What an operator reading the README relies on: the picture is the dashboard inside the
portal's frame with its charts drawn and its numbers filled from the run, and the bench's
JSON says what the page showed and what the shot cost. A day of 30 calls in 3 seconds.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from bench import pbx_day_shot
from tests.conftest import ROOT


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header; fails on anything else."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def test_the_bench_photographs_the_live_dashboard_during_the_replay(tmp_path: Path) -> None:
    if missing := pbx_day_shot.chromium_missing():
        pytest.skip(missing)
    png = tmp_path / "shots" / "dashboard.png"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_URL", "REDIS_URL", "BROKER_URL"))}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.pbx_day", "--calls", "30", "--minutes", "0.05",
         "--latency", "0.3", "--modes", "parallel", "--database", "sqlite",
         "--drain-minutes", "1", "--out", str(tmp_path / "out"), "--screenshot", str(png)],
        cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"^result: (.+\.json)$", proc.stdout, re.M)
    assert found, proc.stdout[-2000:]
    (run,) = json.loads(Path(found.group(1)).read_text())["runs"]

    shots = run["screenshots"]
    assert [s["moment"] for s in shots] == ["70 % of the replay", "the end of the replay"], shots
    assert [Path(s["path"]).name for s in shots] == ["dashboard.png", "dashboard-end.png"]
    for shot in shots:
        assert "error" not in shot, shot["error"]
        path = Path(shot["path"])
        assert path.stat().st_size == shot["bytes"] > 40_000  # a page, not a blank frame
        width, height = _png_size(path)
        assert width == pbx_day_shot.VIEWPORT["width"]
        assert height >= shot["fitted_height"] > 1000  # the frame fitted to the whole page
        assert shot["canvases"] >= 2  # the round-trip and the rate charts
        assert shot["points"]["round-trip"] >= 1 and shot["points"]["rate"] >= 1
        assert 0 < int(shot["tiles"]["calls.total"]) <= run["calls"]
        # a round trip of the slowed portal, in words ("—" when none was measured)
        assert re.fullmatch(r"\d+(\.\d+)? m?s", shot["tiles"]["now.p95"]), shot["tiles"]
        assert shot["cpu_s"] > 0 and shot["wall_s"] > 0
    # the second shot is later in the day: at least the calls of the first
    assert 0 < shots[0]["replay_s"] < shots[1]["replay_s"]
    assert int(shots[1]["tiles"]["calls.total"]) >= int(shots[0]["tiles"]["calls.total"])
    assert run["replay"]["failed"] == []
