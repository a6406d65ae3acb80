"""The direct executor of the setup plan: ``/install`` binds what is missing while the admin waits.

:func:`setup_portal` reads what is bound (``event.get``, ``placement.get``,
``telephony.externalLine.get``, ``user.get``: :data:`app.installation.plan.READ_COMMANDS`),
asks the plan what is missing (:func:`app.installation.plan.decide`) and binds it in
batches, so a re-install changes nothing; then it reads every user into the extension map.
ONAPPINSTALL must be bound before the installer page calls ``installFinish``, which then
sends it with the application token (the short form's only source of it): so this runs
direct, not through the outbox (the outbox executor is app.installation.upkeep).

Transactions: the caller owns the unit of work and commits. The one side transaction is
:func:`_end_transaction`, before each slow Bitrix24 call.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from app.bitrix.errors import ApiError, BitrixError, already_done
from app.dispatcher import direct
from app.extensions import db
from app.installation.plan import (
    LINE_UPDATE,
    READ_COMMANDS,
    USER_PAGE,
    SetupReport,
    as_list,
    decide,
    line_already_exists,
)
from app.installation.user_sync import sync_users, upsert_user
from app.installation.verify import InstallError
from app.tenants.models import Portal
from app.tenants.status import PortalUnavailable

log = logging.getLogger(__name__)

BATCH_MAX = 50


class SetupFailed(InstallError):
    """The portal answered, but binding what the app needs failed (502)."""

    status = 502


def setup_portal(portal: Portal, installer_id: int | None = None) -> SetupReport:
    """Bind what is missing (events, placements, lines) and refresh the extension map."""
    state = _run_batch(portal, READ_COMMANDS)
    report = SetupReport()
    writes, kinds = decide(portal, state, report)
    for chunk in _chunks(list(writes.items()), BATCH_MAX):
        _apply_writes(portal, dict(chunk), kinds, report)  # commits the plan first (_batch)
    _sync_all_users(portal, state["users"], installer_id, report)
    db.session.flush()
    log.info("portal %s set up: %s", portal.member_id, report)
    return report


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)] or []


def _run_batch(portal: Portal, commands: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One batch; any failed command aborts setup naming it."""
    outcome = _batch(portal, commands)
    failed = {k: v for k, v in outcome.items() if isinstance(v, ApiError)}
    if failed:
        raise SetupFailed("; ".join(f"{commands[k][0]}: {e.code} {e.description}"
                                    for k, e in failed.items()))
    return outcome


def _batch(portal: Portal, commands: dict[str, tuple[str, dict[str, Any]]]
           ) -> dict[str, Any]:
    """``{key: result | ApiError}`` for a batch sent with the portal's chain."""
    _end_transaction()
    try:
        result = direct.call_batch(portal, commands)
    except ApiError as exc:
        raise SetupFailed(f"batch: {exc.code} {exc.description}") from exc
    except (BitrixError, PortalUnavailable) as exc:
        raise SetupFailed(f"the portal did not answer: {exc}") from exc
    return {key: _outcome(result, key) for key in commands}


def _end_transaction() -> None:
    """Commit before a (slow) Bitrix24 call: no row or database lock waits on the portal.

    A side transaction on purpose, the one exception to "the caller commits": what the
    unit of work wrote so far is committed, so that neither this session's row locks nor
    SQLite's write lock are held while the portal takes seconds (or a minute) to answer.
    """
    if db.session().in_transaction():
        db.session.commit()


def _outcome(result: Any, key: str) -> Any:
    if key in result.errors:
        return result.errors[key]
    if key in result.results:
        return result.results[key]
    return ApiError("NOT_EXECUTED", "command absent from the batch answer")


def _apply_writes(portal: Portal, writes: dict[str, tuple[str, dict[str, Any]]],
                  kinds: Mapping[str, tuple[str, str]], report: SetupReport) -> None:
    outcome = _batch(portal, writes)
    failures = []
    updates: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, value in outcome.items():
        kind, name = kinds[key]
        if kind == "placement" and value is False:  # "the handler was not registered"
            value = ApiError("NOT_BOUND", "placement.bind answered false")
        if kind == "line" and isinstance(value, ApiError) and line_already_exists(
                {"error_description": value.description}):
            updates[key] = (LINE_UPDATE, writes[key][1])  # added meanwhile: set NAME, CRM (§8.2)
            continue
        if isinstance(value, ApiError) and not already_done(value):
            failures.append(f"{writes[key][0]} {name}: {value.code} {value.description}")
            continue
        {"event": report.events_bound, "unbind": report.events_unbound,
         "placement": report.placements_bound, "unplace": report.placements_unbound,
         "line": report.lines_added, "line_update": report.lines_updated}[kind].append(name)
    if updates:
        _apply_writes(portal, updates, {k: ("line_update", kinds[k][1]) for k in updates},
                      report)
    if failures:
        raise SetupFailed("; ".join(failures))


def _sync_all_users(portal: Portal, first_page: Any, installer_id: int | None,
                    report: SetupReport) -> None:
    records = as_list(first_page)
    page = records
    while len(page) >= USER_PAGE:
        _end_transaction()
        page = as_list(direct.call_method(portal, "user.get", {"start": len(records)}))
        records.extend(page)
    report.users = sync_users(portal, records)
    db.session.flush()
    if installer_id is not None:
        upsert_user(portal, next((r for r in records if str(r.get("ID")) == str(installer_id)),
                                 {"ID": installer_id}), is_admin=True)
