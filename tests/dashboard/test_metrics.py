"""What the hosted deployment's operator gets: /metrics with portal labels kept bounded, and a
Grafana dashboard whose every query names a metric /metrics exposes."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from app.dispatcher import stats, submit
from app.extensions import db
from tests.dispatcher.conftest import call_commands, settled

GRAFANA = Path(__file__).resolve().parents[2] / "app" / "dashboard" / "grafana.json"
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",), "summary": ("_sum", "_count", "")}


def _rows(n: int, status: str = "done") -> list[dict[str, str]]:
    return [{"status": status}] * n


def _scrape(client, app) -> tuple[set[str], set[str], list]:
    answer = client.get("/metrics",
                        headers={"Authorization": f"Bearer {app.config['METRICS_TOKEN']}"})
    assert answer.status_code == 200
    families = list(text_string_to_metric_families(answer.get_data(as_text=True)))
    declared = {f.name + s for f in families for s in SUFFIXES.get(f.type, ("",))}
    sampled = {s.name for f in families for s in f.samples}
    return declared | sampled, sampled, families


def test_every_metric_the_grafana_dashboard_queries_is_exposed(make_portal, sandbox,
                                                              start_engine, client, app,
                                                              redis_client):
    board = json.loads(GRAFANA.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    assert len(board["panels"]) >= 6 and all(exprs)
    used = {m for e in exprs for m in re.findall(r"\bb24relay_[a-z0-9_]+", e)}
    assert used >= {"b24relay_dispatch_batch_seconds_bucket", "b24relay_portal_batch_seconds",
                    "b24relay_portal_commands_per_second", "b24relay_portal_rate_limited"}

    portal, info = make_portal()
    start_engine(DISPATCH_LINGER_MS=0)
    ids = call_commands(portal, 1) + [submit(portal.id, "crm.nothing.here", {})]
    db.session.commit()
    settled(portal.id, len(ids), timeout=60)
    # The portal series report the last whole minute: book one there (and in this one, in
    # case the minute turns before the scrape).
    recorder, now = stats.Recorder(redis_client), time.time()
    for moment in (now - 60, now):
        recorder.batch(portal.id, 0.8, _rows(3), limited=True, now=moment)

    exposed, sampled, _ = _scrape(client, app)
    missing = sorted(used - exposed)
    assert missing == [], f"Grafana queries metrics /metrics does not expose: {missing}"
    assert {"b24relay_portal_batch_seconds", "b24relay_portal_commands_per_second",
            "b24relay_dispatch_batch_seconds_bucket", "b24relay_outbox_depth"} <= sampled


def test_portal_labels_stay_bounded_with_many_portals(app, redis_client, client):
    recorder, now = stats.Recorder(redis_client), time.time()
    for moment in (now - 60, now):
        for portal_id in range(1, 101):  # portal n sends n commands
            recorder.batch(portal_id, portal_id / 100, _rows(portal_id), now=moment)

    collector = stats.PortalCollector(limit=5)
    samples = collector.samples(now)
    assert set(samples) == {"100", "99", "98", "97", "96", stats.OTHER}
    assert samples[stats.OTHER].sent == sum(range(1, 96))
    assert samples[stats.OTHER].batches == 95
    assert samples["100"].sent == 100 and samples["100"].max == 1.0
    assert samples[stats.OTHER].max is not None and samples[stats.OTHER].max <= 0.95 * 1.08

    # And through /metrics, with the app's own setting (20 by default): 21 values at most.
    _, _, families = _scrape(client, app)
    ours = {"b24relay_portal_batch_seconds", "b24relay_portal_commands_per_second",
            "b24relay_portal_rate_limited"}
    labels = {s.labels["portal"] for f in families if f.name in ours for s in f.samples}
    assert len(labels) <= int(app.config["METRICS_PORTALS"]) + 1
    assert stats.OTHER in labels and "100" in labels and "1" not in labels
    assert all(v == stats.OTHER or v.isdigit() for v in labels)  # ids only, never a name
