"""Event delivery as Bitrix24's queue server does it: each POST waits in a queue first.

Protocol §3.2/§3.8: events go to a queue server that POSTs them to the handler, seconds
later, in no guaranteed order, once (no retries). Here every delivery waits a delay drawn
from ``Settings.event_delay``, then:

* ``event_reorder=False`` (the default): a portal's deliveries go out one after another in
  the order they were queued, each after the previous one was answered (or timed out);
* ``event_reorder=True``: each goes out when its own delay is over, so a later event with a
  shorter delay overtakes an earlier one.

An event name a test holds (``hold``) waits until ``release`` and steps out of the order
meanwhile: what comes after it is delivered first (a late ONAPPINSTALL, protocol §2.4).
The body is built when the POST leaves (``ts`` is the send time, §3.3). Every delivery is
logged per portal with its state: ``queued``, ``held``, ``sending``, ``done``,
``suppressed`` (the app was uninstalled, its subscription lapsed or the portal was deleted
while it waited).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from . import latency
from .state import Portal

PUBLIC = ("seq", "event", "url", "state", "status", "content_type", "error", "tokens",
          "queued_at", "sent_at", "answered_at")


def sent_tokens(body: str) -> dict[str, str]:
    """The access/refresh tokens an event body carried (for tests that follow a chain)."""
    sent = dict(parse_qsl(body))
    return {k: sent[f"auth[{k}]"] for k in ("access_token", "refresh_token")
            if f"auth[{k}]" in sent}


def public(record: dict[str, Any]) -> dict[str, Any]:
    """What the control API reports of a delivery (unset fields left out)."""
    return {k: record[k] for k in PUBLIC if record.get(k) is not None}


def enqueue(cloud: Any, p: Portal, event: str, url: str, build: Callable[[], str],
            force: bool = False) -> tuple[dict[str, Any], asyncio.Future]:
    """Queue one POST of ``event`` to ``url``; returns its log record and a future of it."""
    p.delivery_seq += 1
    held = event in p.held_events
    record: dict[str, Any] = {"seq": p.delivery_seq, "event": event, "url": url,
                              "state": "held" if held else "queued", "queued_at": time.time(),
                              "status": None}
    p.deliveries.append(record)
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    after = None
    if not (held or cloud.settings.event_reorder):
        after, p.delivery_tail = p.delivery_tail, done
    gate = _gate(p) if held else None
    delay = latency.draw(cloud.settings.event_delay)
    cloud.spawn(_run(cloud, p, record, build, delay, after, gate, force, done))
    return record, done


def _gate(p: Portal) -> asyncio.Event:
    if p.hold_gate is None:
        p.hold_gate = asyncio.Event()
    return p.hold_gate


def hold(p: Portal, events: list[str]) -> list[str]:
    """Hold back deliveries of these events (queued from now on) until ``release``."""
    p.held_events.update(e.upper() for e in events)
    return sorted(p.held_events)


def release(p: Portal) -> int:
    """Let every held delivery go (each still waits its own delay); how many were held."""
    waiting = [r for r in p.deliveries if r["state"] == "held"]
    for record in waiting:
        record["state"] = "queued"
    p.held_events.clear()
    if p.hold_gate is not None:
        p.hold_gate.set()
        p.hold_gate = None
    return len(waiting)


def unsettled(p: Portal) -> int:
    """Deliveries that are neither answered nor held."""
    return sum(1 for r in p.deliveries if r["state"] in ("queued", "sending"))


async def _run(cloud: Any, p: Portal, record: dict[str, Any], build: Callable[[], str],
               delay: float, after: asyncio.Future | None, gate: asyncio.Event | None,
               force: bool, done: asyncio.Future) -> None:
    try:
        await _wait_turn(delay, after, gate)
        if p.deleted or not p.subscription_active or not (p.install_finished or force):
            record["state"] = "suppressed"
            p.bump("events_suppressed")
            return
        await _send(cloud, p, record, build)
    finally:
        if p.delivery_tail is done:
            p.delivery_tail = None
        if not done.done():
            done.set_result(record)


async def _wait_turn(delay: float, after: asyncio.Future | None,
                     gate: asyncio.Event | None) -> None:
    if delay > 0:
        await asyncio.sleep(delay)
    if gate is not None:
        await gate.wait()
    if after is not None:
        await asyncio.shield(after)  # the earlier delivery answered (or gave up)


async def _send(cloud: Any, p: Portal, record: dict[str, Any], build: Callable[[], str]) -> None:
    record["state"], record["sent_at"] = "sending", time.time()
    body = build()
    resp = await cloud.post_form(record["url"], body, cloud.settings.event_timeout)
    record.update(state="done", answered_at=time.time(), status=resp.get("status"),
                  content_type=resp.get("content_type"), error=resp.get("error"))
    tokens = sent_tokens(body)
    if tokens:
        record["tokens"] = tokens
    p.bump("events_sent" if record["status"] == 200 else "events_failed")
