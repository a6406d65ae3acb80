"""The dispatcher's per-minute statistics in Redis: percentiles, counts, expiry, isolation."""

from __future__ import annotations

import time

import pytest

from app.dispatcher import stats

NOW = 1_800_000_030.0  # 30 s into a minute


def _rows(*statuses: str) -> list[dict[str, str]]:
    return [{"status": s} for s in statuses]


@pytest.fixture
def recorder(app, redis_client):
    return stats.Recorder(redis_client)


def test_percentiles_of_known_round_trips_are_within_the_bucket_width(recorder):
    # 100 batches: 1.00 s .. 1.99 s in 10 ms steps, then one of 40 s.
    for n in range(100):
        recorder.batch(7, 1.0 + n / 100, _rows("done"), now=NOW)
    recorder.batch(7, 40.0, _rows("done"), now=NOW)
    minute = stats.series(7, 1, now=NOW)[-1]
    assert minute.batches == 101
    assert minute.p50 == pytest.approx(1.5, rel=0.075)
    assert minute.p95 == pytest.approx(1.95, rel=0.075)
    assert minute.max == 40.0
    assert minute.p50 < minute.p95 < minute.max


def test_a_single_batch_reads_back_as_its_own_time_never_above_the_max(recorder):
    recorder.batch(7, 0.123, _rows("done"), now=NOW)
    minute = stats.series(7, 1, now=NOW)[-1]
    assert minute.max == 0.123
    assert minute.p50 == minute.p95 == 0.123  # clamped by the true maximum


def test_a_portal_answering_in_a_steady_5_s_reads_5_s_not_its_buckets_middle(recorder):
    # 5.000-5.070 s all fall in one bucket whose middle is 4.70 s: read within min..max.
    for n in range(8):
        recorder.batch(7, 5.0 + n / 100, _rows("done"), now=NOW)
    minute = stats.series(7, 1, now=NOW)[-1]
    assert 5.0 <= minute.p50 <= minute.p95 <= minute.max == 5.07


def test_outcomes_and_503s_are_counted_per_minute(recorder):
    recorder.batch(7, 2.0, _rows("done", "done", "dead"), now=NOW)
    recorder.batch(7, 3.0, _rows("queued", "queued"), limited=True, now=NOW)
    recorder.batch(7, 1.0, _rows("done"), now=NOW + 60)
    first, second = stats.series(7, 2, now=NOW + 60)
    assert (first.sent, first.done, first.dead, first.queued, first.rate_limited) == \
        (5, 2, 1, 2, 1)
    assert (second.sent, second.done, second.rate_limited) == (1, 1, 0)
    assert second.minute - first.minute == 60


def test_the_series_covers_24_hours_with_empty_minutes_as_zeros(recorder):
    recorder.batch(7, 1.0, _rows("done"), now=NOW - 3600)
    series = stats.series(7, now=NOW)
    assert len(series) == 24 * 60
    assert series[-1].minute == stats.minute_of(NOW)
    busy = [m for m in series if m.batches]
    assert [m.minute for m in busy] == [stats.minute_of(NOW - 3600)]
    assert series[0].p50 is None and series[0].sent == 0


def test_every_key_expires_after_a_day_and_a_margin(recorder, redis_client):
    recorder.batch(7, 1.0, _rows("done"), methods=["crm.lead.add"], now=time.time())
    keys = [k.decode() for k in redis_client.keys(stats.PREFIX + "*")]
    assert len(keys) == 4  # the portal's minute, all portals' minute, busy set, methods
    for key in keys:
        ttl = redis_client.ttl(key)
        assert 0 < ttl <= stats.KEEP, key
    assert redis_client.ttl(stats.key(7, stats.minute_of(time.time()))) > 24 * 3600


def test_portals_do_not_see_each_others_minutes(recorder):
    recorder.batch(7, 1.0, _rows("done", "done"), methods=["crm.lead.add"], now=NOW)
    recorder.batch(8, 9.0, _rows("dead"), limited=True, methods=["user.get"], now=NOW)
    seven, eight = stats.series(7, 1, now=NOW)[-1], stats.series(8, 1, now=NOW)[-1]
    assert (seven.sent, seven.done, seven.max, seven.rate_limited) == (2, 2, 1.0, 0)
    assert (eight.sent, eight.dead, eight.max, eight.rate_limited) == (1, 1, 9.0, 1)
    assert stats.recent_methods(7, now=NOW) == ["crm.lead.add"]
    assert stats.recent_methods(8, now=NOW) == ["user.get"]
    everyone = stats.minute_hashes(["all"], stats.minute_of(NOW))["all"]
    assert (everyone.sent, everyone.batches, everyone.max) == (3, 2, 9.0)
    assert stats.busiest(stats.minute_of(NOW), 5) == [(7, 2.0), (8, 1.0)]
