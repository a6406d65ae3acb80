"""Issue #11 points 2 and 3: realistic latency, operating time that accrues from it, and event
delivery through a queue (delay, no guaranteed order), plus the offline queue's one record
per object.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl

import httpx
import pytest

from sandbox import SandboxControl, latency
from sandbox.client import SandboxError
from sandbox.limits import OperatingClock
from sandbox.server import SandboxServer

from .conftest import call

TIME_LIMIT = {
    "error": "OPERATION_TIME_LIMIT",
    "error_description": "Method is blocked due to operation time limit.",
}


def test_the_realistic_shape_stays_within_50_and_600_ms():
    draws = sorted(latency.draw_ms("realistic") for _ in range(20_000))
    assert draws[0] >= 50 and draws[-1] <= 600
    assert 200 <= statistics.median(draws) <= 300
    assert draws[len(draws) // 10] < 150 and draws[-len(draws) // 20] == 600  # a long tail


def test_a_sandbox_started_in_code_answers_with_realistic_latency():
    with SandboxServer() as server, SandboxControl(server.url) as control:
        assert control.settings()["latency"] == "realistic"
        portal = control.create_portal()

        def one(_: int) -> tuple[float, float]:
            started = time.perf_counter()
            resp = httpx.post(portal["client_endpoint"] + "profile",
                              json={"auth": portal["access_token"]}, timeout=5)
            return time.perf_counter() - started, resp.json()["time"]["processing"]

        with ThreadPoolExecutor(8) as pool:
            waits, processing = zip(*pool.map(one, range(8)), strict=True)
        assert min(waits) >= 0.05 and min(processing) >= 0.05
        assert max(processing) < 0.9  # 600 ms at most, plus scheduling on a busy machine
        control.reset()  # a reset keeps the server's own default
        assert control.settings()["latency"] == "realistic"


def test_tests_get_zero_latency_and_a_cloud_setting_or_a_portal_override(sandbox, portal, http):
    assert sandbox.settings()["latency"] == 0
    started = time.perf_counter()
    call(http, portal, "profile")
    assert time.perf_counter() - started < 0.05
    sandbox.settings(latency=[100, 120])
    assert call(http, portal, "profile").json()["time"]["processing"] >= 0.1
    sandbox.set_latency(portal["member_id"], 0)  # this portal only
    assert call(http, portal, "profile").json()["time"]["processing"] < 0.05
    assert sandbox.set_latency(portal["member_id"], None)["effective"] == [100, 120]
    with pytest.raises(SandboxError, match="latency must be"):
        sandbox.settings(latency="slow")


def test_operating_is_the_methods_processing_including_latency(sandbox, portal, http):
    sandbox.set_latency(portal["member_id"], 40)
    first, second = (call(http, portal, "user.admin").json()["time"] for _ in range(2))
    assert second["operating"] == pytest.approx(first["processing"] + second["processing"],
                                                 abs=1e-5)
    assert first["operating_reset_at"] == second["operating_reset_at"] == int(first["finish"]
                                                                               + 600)
    # A batch is one request: its latency is split evenly over the commands it runs, and each
    # command's share is booked to its own method.
    sandbox.set_latency(portal["member_id"], 200)
    batch = call(http, portal, "batch", cmd={"a": "user.admin", "b": "user.admin",
                                             "c": "profile", "d": "profile"}).json()
    shares = batch["result"]["result_time"]
    assert all(shares[k]["processing"] >= 0.05 for k in "abcd")
    assert "operating" not in batch["time"]
    sandbox.set_latency(portal["member_id"], 0)
    after = call(http, portal, "user.admin").json()["time"]
    booked = second["operating"] + shares["a"]["processing"] + shares["b"]["processing"]
    assert after["operating"] == pytest.approx(booked + after["processing"], abs=1e-5)
    assert call(http, portal, "profile").json()["time"]["operating"] >= 0.1


def test_realistic_latency_reaches_operation_time_limit_under_a_lowered_limit(sandbox, portal,
                                                                             http):
    sandbox.set_latency(portal["member_id"], "realistic")
    sandbox.set_operating_limit(0.5, member_id=portal["member_id"])
    answers = []
    for _ in range(12):  # at least 50 ms a call: the limit is crossed by the 11th at worst
        answers.append(call(http, portal, "user.admin"))
        if answers[-1].status_code == 429:
            break
    *served, blocked = answers
    assert blocked.status_code == 429 and blocked.json() == TIME_LIMIT
    assert all(r.status_code == 200 for r in served)
    operating = [r.json()["time"]["operating"] for r in served]
    assert operating[-1] > 0.5  # the call that crossed it still completed ...
    assert all(o <= 0.5 for o in operating[:-1])  # ... and the next one was the first refused
    assert call(http, portal, "profile").status_code == 200  # only that method is blocked


def test_the_operating_clock_keeps_ten_one_minute_buckets():
    clock, t0 = OperatingClock(), 1_000_000.0
    clock.add("m", 1.0, t0)
    clock.add("m", 2.0, t0 + 59)  # same bucket: it started less than a minute ago
    clock.add("m", 4.0, t0 + 61)  # a new bucket
    assert clock.operating("m", t0 + 599) == 7.0 and clock.reset_at("m", t0 + 599) == t0 + 600
    assert clock.operating("m", t0 + 600) == 4.0  # the first bucket expired 10 min after it began
    assert clock.reset_at("m", t0 + 600) == t0 + 661
    assert clock.operating("m", t0 + 661) == 0.0 and clock.operating("other", t0) == 0.0


# ---------------------------------------------------------------- event delivery


@pytest.fixture
def events_portal(sandbox, fake_app, http):
    """An installed portal whose ONCRMDEALUPDATE and ONCRMLEADADD go to the fake app."""
    portal = sandbox.create_portal(app_url=fake_app.url)
    sandbox.install_app(portal["member_id"])
    assert sandbox.finish_install(portal["member_id"])["install_finished"]
    for event in ("ONCRMDEALUPDATE", "ONCRMLEADADD"):
        call(http, portal, "event.bind", event=event, handler=fake_app.url + "/b24/events")
    return portal


def _queue_deals(sandbox, portal, ids):
    for deal in ids:
        out = sandbox.trigger_event(portal["member_id"], "ONCRMDEALUPDATE",
                                    {"FIELDS": {"ID": str(deal)}}, wait=False)
        assert [d["state"] for d in out["deliveries"]] in (["queued"], ["sending"], ["done"])


def _arrived(fake_app):
    return [dict(parse_qsl(h.body.decode()))["data[FIELDS][ID]"]
            for h in fake_app.paths("/b24/events")]


def test_default_delivery_is_immediate_one_after_another_in_order(sandbox, events_portal,
                                                                  fake_app):
    _queue_deals(sandbox, events_portal, range(10))
    log = sandbox.wait_deliveries(events_portal["member_id"], timeout=10)
    assert _arrived(fake_app) == [str(i) for i in range(10)]
    assert [d["status"] for d in log] == [200] * 10
    for earlier, later in zip(log, log[1:], strict=False):
        assert later["sent_at"] >= earlier["answered_at"]  # one at a time
    assert max(d["sent_at"] - d["queued_at"] for d in log) < 1.0


def test_delayed_reordered_delivery_still_delivers_each_event_once(sandbox, events_portal,
                                                                   fake_app):
    sandbox.settings(event_delay=[0, 400], event_reorder=True)
    started = time.time()
    _queue_deals(sandbox, events_portal, range(20))
    assert time.time() - started < 1.0  # queued, not waited for
    log = sandbox.wait_deliveries(events_portal["member_id"], timeout=10)
    arrived = _arrived(fake_app)
    assert sorted(arrived, key=int) == [str(i) for i in range(20)]  # all, once
    assert arrived != [str(i) for i in range(20)]  # later ones overtook earlier ones
    assert max(d["sent_at"] - d["queued_at"] for d in log) >= 0.1
    sent_ts = [int(dict(parse_qsl(h.body.decode()))["ts"]) for h in fake_app.paths("/b24/")]
    assert all(ts >= int(started) for ts in sent_ts)  # ts: when the queue sent it
    assert sandbox.counters(events_portal["member_id"])["events_sent"] == 20


def test_delayed_delivery_in_order_waits_for_the_earlier_event(sandbox, events_portal, fake_app):
    sandbox.settings(event_delay=[0, 100])
    _queue_deals(sandbox, events_portal, range(8))
    sandbox.wait_deliveries(events_portal["member_id"], timeout=10)
    assert _arrived(fake_app) == [str(i) for i in range(8)]


def test_a_held_event_is_overtaken_and_goes_out_when_released(sandbox, events_portal, fake_app):
    mid = events_portal["member_id"]
    sandbox.hold_events(mid, "ONCRMDEALUPDATE")
    held = sandbox.trigger_event(mid, "ONCRMDEALUPDATE", {"FIELDS": {"ID": "1"}})
    assert held["statuses"] == [None] and held["deliveries"][0]["state"] == "held"
    later = sandbox.trigger_event(mid, "ONCRMLEADADD", {"FIELDS": {"ID": "2"}})
    assert later["statuses"] == [200]
    assert [d["state"] for d in sandbox.wait_deliveries(mid, timeout=5)] == ["held", "done"]
    assert sandbox.release_events(mid) == {"released": 1}
    log = sandbox.wait_deliveries(mid, timeout=5)
    assert [(d["event"], d["status"]) for d in log] == [("ONCRMDEALUPDATE", 200),
                                                        ("ONCRMLEADADD", 200)]
    assert [dict(parse_qsl(h.body.decode()))["event"] for h in fake_app.paths("/b24/")] == [
        "ONCRMLEADADD", "ONCRMDEALUPDATE"]


def test_events_of_the_apps_own_writes_are_queued_too(sandbox, events_portal, fake_app, http):
    sandbox.settings(event_delay=[150, 150])
    deal = call(http, events_portal, "crm.deal.add", fields={"TITLE": "x"}).json()["result"]
    call(http, events_portal, "crm.deal.update", id=deal, fields={"TITLE": "y"})
    assert fake_app.paths("/b24/") == []  # not yet: 150 ms in the queue
    [update] = sandbox.wait_deliveries(events_portal["member_id"], timeout=5)
    assert update["event"] == "ONCRMDEALUPDATE" and update["status"] == 200
    assert update["sent_at"] - update["queued_at"] >= 0.15


def test_the_offline_queue_keeps_one_record_per_object(sandbox, portal, http):
    sandbox.finish_install(portal["member_id"])
    call(http, portal, "event.bind", event="ONCRMDEALUPDATE", event_type="offline")
    ids = [call(http, portal, "crm.deal.add", fields={"TITLE": t}).json()["result"]
           for t in ("a", "b")]
    for round_ in range(20):  # 1000 updates of deal a, in 20 batches of 50 (one request each)
        cmd = {f"u{i}": f"crm.deal.update?id={ids[0]}&fields[TITLE]={round_}-{i}"
               for i in range(50)}
        assert not call(http, portal, "batch", cmd=cmd).json()["result"]["result_error"]
    call(http, portal, "crm.deal.update", id=ids[1], fields={"TITLE": "b2"})
    queued = sandbox.offline_events(portal["member_id"])
    assert [(e["EVENT_NAME"], e["EVENT_DATA"]["FIELDS"]["ID"]) for e in queued] == [
        ("ONCRMDEALUPDATE", str(ids[0])), ("ONCRMDEALUPDATE", str(ids[1]))]
