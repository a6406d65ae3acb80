"""Rate and resource limits: the per-portal leaky bucket and per-method operating time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

PLANS = {
    "standard": {"drain": 2.0, "burst": 50.0, "license_family": "project", "license": "en_project"},
    "enterprise": {"drain": 5.0, "burst": 250.0, "license_family": "ent", "license": "en_ent250"},
}


@dataclass
class LeakyBucket:
    """Each request adds 1; the level drains at `drain`/s; a request that would exceed `burst` is
    refused.
    """

    drain: float
    burst: float
    level: float = 0.0
    stamp: float = field(default_factory=time.monotonic)

    def _leak(self, now: float) -> None:
        self.level = max(0.0, self.level - (now - self.stamp) * self.drain)
        self.stamp = now

    def admit(self, now: float | None = None) -> bool:
        """Count one request; False if the bucket is full (the refused request adds nothing)."""
        self._leak(time.monotonic() if now is None else now)
        if self.level + 1.0 > self.burst + 1e-9:
            return False
        self.level += 1.0
        return True

    def peek(self) -> float:
        """Current level without counting a request."""
        return max(0.0, self.level - (time.monotonic() - self.stamp) * self.drain)

    def reconfigure(self, drain: float, burst: float) -> None:
        """Change rate and size, keeping the current level."""
        self._leak(time.monotonic())
        self.drain, self.burst = drain, burst


@dataclass
class OperatingClock:
    """Seconds consumed per method over 10 one-minute buckets (each expires 10 min after its first
    call).
    """

    window: float = 600.0
    buckets: dict[str, list[list[float]]] = field(
        default_factory=dict
    )  # method -> [[first_call, seconds]]

    def _live(self, method: str, now: float) -> list[list[float]]:
        live = [b for b in self.buckets.get(method, []) if b[0] + self.window > now]
        self.buckets[method] = live
        return live

    def operating(self, method: str, now: float | None = None) -> float:
        """Accumulated seconds of `method` in the window."""
        now = time.time() if now is None else now
        return sum(b[1] for b in self._live(method, now))

    def reset_at(self, method: str, now: float | None = None) -> int:
        """Unix time when the oldest live bucket drops (now if none)."""
        now = time.time() if now is None else now
        live = self._live(method, now)
        return int(live[0][0] + self.window) if live else int(now)

    def add(self, method: str, seconds: float, now: float | None = None) -> None:
        """Book `seconds` of processing for `method` into the current minute's bucket."""
        now = time.time() if now is None else now
        live = self._live(method, now)
        if live and now - live[-1][0] < 60.0:
            live[-1][1] += seconds
        else:
            live.append([now, seconds])
