"""OVERLOAD_LIMIT (Bitrix24 support's manual REST block): the portal is blocked, its commands
wait (none dropped, none resent every sweep), a human is alerted, and a probe brings it back."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from prometheus_client import REGISTRY
from sqlalchemy import update

from app.dispatcher import lease, submit, sweep
from app.dispatcher.bucket import RateBucket, scaled_plans
from app.extensions import db, redis_ext
from app.installation import blocked
from app.tenants.models import Portal, PortalStatus, aware, utcnow
from tests.conftest import wait_for
from tests.dispatcher.conftest import rows, settled, start_engine  # noqa: F401 - fixture
from tests.tenants.conftest import reload_portal


def _blocked_count() -> float:
    return REGISTRY.get_sample_value("b24relay_portal_blocked_total") or 0.0


def _requests(sandbox: Any, member_id: str) -> int:
    return sandbox.counters(member_id)["rest_requests"]


def _age_block(portal: Portal, minutes: float = 20) -> None:
    """Pretend the block (or the last probe) happened ``minutes`` ago."""
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(status_changed_at=utcnow() - timedelta(minutes=minutes)))
    db.session.commit()


def _submit_three(portal: Portal) -> list[int]:
    ids = [submit(portal.id, "user.get", {"ID": 1}), submit(portal.id, "crm.deal.list", {}),
           submit(portal.id, "user.current", {})]
    db.session.commit()
    return ids


def _blocked_with_backlog(make_portal: Any, sandbox: Any, start_engine: Any  # noqa: F811
                          ) -> tuple[Portal, Any, list[int]]:
    portal, info = make_portal()
    engine = start_engine()
    sandbox.set_fault(info["member_id"], "overload_limit")  # every request, until cleared
    ids = _submit_three(portal)
    wait_for(lambda: reload_portal(info["member_id"]).status == PortalStatus.BLOCKED.value)
    # The driver that met the block gives the portal up a moment later (on a loaded machine,
    # later still); a probe before that finds the lease taken and skips, as it should.
    owner = lease.key(portal.id)
    wait_for(lambda: portal.id not in engine.drivers and not redis_ext.client.exists(owner))
    return portal, engine, ids


def test_overload_limit_blocks_the_portal_and_its_commands_wait(
        oauth_app, make_portal, sandbox, start_engine):  # noqa: F811
    before = _blocked_count()
    portal, _, ids = _blocked_with_backlog(make_portal, sandbox, start_engine)

    stored = reload_portal(portal.member_id)
    assert "OVERLOAD_LIMIT" in stored.status_reason and "Bitrix24 support" in stored.status_reason
    # the alert: once, whatever was in flight (counted by the engine's thread just after
    # the status it writes, which this test may see first)
    wait_for(lambda: _blocked_count() >= before + 1)
    found = wait_for(lambda: (r := rows(portal.id)) and all(x.status == "queued" for x in r)
                     and r)
    assert [(r.id, r.attempts, r.dead_reason) for r in found] == [(i, 0, None) for i in ids]

    # Sweeps find queued commands, but a blocked portal is not driven: nothing is sent.
    sent = _requests(sandbox, portal.member_id)
    for _ in range(3):
        assert portal.id not in sweep.sweep().nudged
    submit(portal.id, "user.get", {"ID": 2})
    db.session.commit()
    wait_for(lambda: len(rows(portal.id)) == 4)
    assert _requests(sandbox, portal.member_id) == sent
    assert _blocked_count() == before + 1


def test_a_probe_while_still_blocked_sends_one_request_and_keeps_the_block(
        oauth_app, make_portal, sandbox, start_engine):  # noqa: F811
    portal, engine, _ = _blocked_with_backlog(make_portal, sandbox, start_engine)
    wait_for(lambda: all(r.status == "queued" for r in rows(portal.id)))
    _age_block(portal)
    # A full bucket: the probe waits about a second for its token while the portal is
    # active, and engines are woken all along. Its lease keeps them off the backlog.
    bucket = RateBucket(redis_ext.client, plans=scaled_plans(1.0))
    bucket.fill(portal.member_id, portal.plan)
    bucket.fill(portal.member_id, portal.plan)
    sent = _requests(sandbox, portal.member_id)
    stop = threading.Event()
    portal_id = portal.id  # read here: in the thread an expired attribute needs an app context

    def nudge() -> None:  # the portal is active during the probe; engines are told so
        while not stop.wait(0.02):
            engine.wake(portal_id)

    nudger = threading.Thread(target=nudge)
    nudger.start()
    try:
        outcome = blocked.probe(reload_portal(portal.member_id))
    finally:
        stop.set()
        nudger.join()

    assert outcome == blocked.STILL_BLOCKED
    assert _requests(sandbox, portal.member_id) == sent + 1  # the probe's app.info, no batch
    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.BLOCKED.value
    assert aware(stored.status_changed_at) > utcnow() - timedelta(minutes=1)  # next in 15 min
    assert blocked.due_for_probe() == []
    assert all(r.status == "queued" and r.attempts == 0 for r in rows(portal.id))


def test_the_probe_resumes_a_lifted_portal_and_its_commands_go(
        oauth_app, make_portal, sandbox, start_engine):  # noqa: F811
    portal, _, ids = _blocked_with_backlog(make_portal, sandbox, start_engine)
    assert blocked.due_for_probe() == []  # just blocked: not yet
    _age_block(portal)
    assert blocked.due_for_probe() == [portal.id]
    sandbox.clear_faults(portal.member_id)  # Bitrix24 support lifted it
    sandbox.expire_tokens(portal.member_id)  # a block lasts longer than the hour of a token
    db.session.execute(update(Portal).where(Portal.id == portal.id)
                       .values(expires_at=utcnow() - timedelta(minutes=1)))
    db.session.commit()

    assert blocked.probe(reload_portal(portal.member_id)) == blocked.LIFTED

    stored = reload_portal(portal.member_id)
    assert stored.status == PortalStatus.ACTIVE.value and stored.token_version == 2
    final = settled(portal.id, len(ids))  # the nudge after the probe: no sweep needed
    assert [r.status for r in final] == ["done"] * len(ids)


def test_no_answer_to_the_probe_keeps_the_block_and_its_reason(
        oauth_app, make_portal, sandbox, start_engine):  # noqa: F811
    portal, _, _ = _blocked_with_backlog(make_portal, sandbox, start_engine)
    reason = reload_portal(portal.member_id).status_reason
    _age_block(portal)
    sandbox.clear_faults(portal.member_id)
    sandbox.set_fault(portal.member_id, "html_502")

    assert blocked.probe(reload_portal(portal.member_id)) == blocked.NO_ANSWER
    stored = reload_portal(portal.member_id)
    assert (stored.status, stored.status_reason) == (PortalStatus.BLOCKED.value, reason)


def test_flask_portals_resume_probes_now(oauth_app, make_portal, sandbox,
                                         start_engine):  # noqa: F811
    portal, _, _ = _blocked_with_backlog(make_portal, sandbox, start_engine)
    runner = oauth_app.test_cli_runner()
    listed = runner.invoke(args=["portals", "list"])
    assert f"{portal.member_id:34}" in listed.output and "blocked" in listed.output
    shown = runner.invoke(args=["portals", "show", portal.member_id])
    assert "OVERLOAD_LIMIT" in shown.output

    still = runner.invoke(args=["portals", "resume", portal.member_id])
    assert still.exit_code == 1 and "still blocked" in still.output
    sandbox.clear_faults(portal.member_id)
    done = runner.invoke(args=["portals", "resume", portal.member_id])
    assert done.exit_code == 0 and "resumed" in done.output
    assert reload_portal(portal.member_id).status == PortalStatus.ACTIVE.value
    active = runner.invoke(args=["portals", "resume", portal.member_id])
    assert active.exit_code != 0 and "not blocked" in active.output


def test_a_worker_probes_blocked_portals_on_its_own(oauth_app, make_portal, sandbox,
                                                   start_worker):
    portal, info = make_portal(status=PortalStatus.BLOCKED.value, status_reason="blocked",
                               status_changed_at=utcnow() - timedelta(minutes=20))
    start_worker(periodic=True, DISPATCH_ENABLED="0")
    wait_for(lambda: _requests(sandbox, info["member_id"]) == 1, timeout=60)
    wait_for(lambda: not redis_ext.client.exists(f"b24relay:dispatch:owner:{portal.id}"))
    assert reload_portal(info["member_id"]).status == PortalStatus.ACTIVE.value
