"""What a batch's answer means for each of its commands (pure; the engine writes and acts).

Per command, by ``policy.classify`` of its error (or of the whole request's error):

=========  ===============================================================  =========
verdict    the command                                                      attempt
=========  ===============================================================  =========
DONE       done, its result stored                                          counted
RETRY      queued again after ``backoff``; dead once past the retry horizon counted
UNKNOWN    as RETRY when ``policy.resend_refusal`` allows this command (its    counted
           method, its params, when it would leave), else dead with outcome
           UNKNOWN ("unknown outcome: ..., not sent again: <why>")
PERMANENT  dead, with Bitrix24's error as the reason                        counted
RATE       queued again; the portal's bucket is filled                      not
REFRESH    queued again; the tokens are refreshed                           not
MOVED      queued again; the new endpoint is stored                         not
OPERATING  queued until the method's operating budget resets; ledger holds  not
HOLD       queued again (nothing is dropped); the portal status machine     not
           decides, and the portal is not driven until the sweep finds it
           callable again
=========  ===============================================================  =========

A command that finishes (done, or dead with outcome DEAD or UNKNOWN) and has an outcome
handler is listed in ``Effects.settle``: the engine enqueues its settling.

A command that failed after an earlier failure of its ordering key, or of a command it
references, in the same batch, is queued again without counting: its failure may be
caused by the earlier one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from app.bitrix import BatchResult, errors
from app.dispatcher import policy
from app.dispatcher.models import CommandStatus
from app.dispatcher.packer import Candidate
from app.dispatcher.policy import Verdict
from app.dispatcher.results import OutcomeKind

UNKNOWN_OUTCOME = "unknown outcome"
OPERATING_FALLBACK = timedelta(minutes=1)  # OPERATION_TIME_LIMIT without operating_reset_at
NOT_COUNTED = frozenset({Verdict.RATE, Verdict.REFRESH, Verdict.MOVED, Verdict.OPERATING,
                         Verdict.HOLD})


class PortalHeld(errors.BitrixError):
    """The portal's status holds its calls (found by a refresh); nothing was sent."""


@dataclass
class Effects:
    """What the engine must do besides writing the rows."""

    fill_bucket: bool = False
    refresh: bool = False
    hold: BaseException | None = None
    operating: dict[str, float] = field(default_factory=dict)  # method -> reset (epoch s)
    processing: dict[str, float] = field(default_factory=dict)  # method -> seconds used
    costed: dict[str, int] = field(default_factory=dict)  # method -> commands processing is for
    sent: dict[str, int] = field(default_factory=dict)  # method -> commands in the batch
    unmeasured: bool = False  # the batch may have run, but its answer says not how long
    settle: list[int] = field(default_factory=list)  # finished commands with a handler
    verdicts: dict[Verdict, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rules:
    """The settings outcomes depend on."""

    horizon: timedelta
    resend: policy.ResendLimits


def describe(error: BaseException) -> dict[str, Any]:
    """An error as stored on the row: Bitrix24's ``{"error", "error_description"}`` shape."""
    if isinstance(error, errors.ApiError):
        return {"error": error.code, "error_description": error.description}
    return {"error": type(error).__name__, "error_description": str(error)}


def verdict_of(error: BaseException) -> Verdict:
    """``policy.classify``, plus the engine's own PortalHeld and request timeout."""
    if isinstance(error, PortalHeld):
        return Verdict.HOLD
    if isinstance(error, TimeoutError):
        return Verdict.UNKNOWN
    return policy.classify(error)


def decide(commands: Sequence[Candidate], answer: BatchResult | BaseException, now: datetime,
           rules: Rules) -> tuple[list[dict[str, Any]], Effects]:
    """Each command's row update (``store.OUTCOME_COLUMNS``) and the effects of the answer."""
    effects, rows = Effects(), []
    failed_keys: set[str] = set()
    failed_ids: set[int] = set()
    for c in sorted(commands, key=lambda c: c.id):
        result, error = _outcome(c, answer)
        row = _row(c, result, error, now, rules, effects)
        # A later command of a failed command's key (or one that needs its result) goes
        # again behind it, its attempt not counted: it failed because the one before did.
        # Not when its own outcome is unknown (a 504 after the batch ran, a timeout): it may
        # have run, so the resend rule judges it as it would any other (protocol §8.13); a
        # finish re-sent blindly here would meet "Call is not found" as if it had never run.
        if error is not None and verdict_of(error) is not Verdict.UNKNOWN \
                and _follows_failure(c, failed_keys, failed_ids):
            row.update(status=CommandStatus.QUEUED.value, attempts_delta=-1, not_before=None,
                       dead_reason=None, completed_at=None, outcome=None)
        if c.handler and row["outcome"] is not None:
            effects.settle.append(c.id)
        if error is not None:
            failed_ids.add(c.id)
            if c.key is not None:
                failed_keys.add(c.key)
        rows.append(row)
    for c in commands:
        effects.sent[c.method.lower()] = effects.sent.get(c.method.lower(), 0) + 1
    if isinstance(answer, BatchResult):
        _account(commands, answer, effects)
    else:  # a 5xx, a reset or a timeout may come after the portal ran the batch
        effects.unmeasured = verdict_of(answer) in (Verdict.RETRY, Verdict.UNKNOWN)
    return rows, effects


def _outcome(c: Candidate, answer: BatchResult | BaseException) -> tuple[Any, BaseException | None]:
    if isinstance(answer, BaseException):
        return None, answer
    if c.batch_key in answer.results:
        return answer.results[c.batch_key], None
    if c.batch_key in answer.errors:
        return None, answer.errors[c.batch_key]
    return None, errors.TransportError("the command is missing from the batch answer")


def _follows_failure(c: Candidate, failed_keys: set[str], failed_ids: set[int]) -> bool:
    return (c.key is not None and c.key in failed_keys) or bool(c.depends_on() & failed_ids)


def _row(c: Candidate, result: Any, error: BaseException | None, now: datetime, rules: Rules,
         effects: Effects) -> dict[str, Any]:
    verdict = Verdict.DONE if error is None else verdict_of(error)
    effects.verdicts[verdict] = effects.verdicts.get(verdict, 0) + 1
    row: dict[str, Any] = {"id": c.id, "status": CommandStatus.QUEUED.value, "attempts_delta": 0,
                           "not_before": None, "result": result,
                           "error": describe(error) if error is not None else None,
                           "dead_reason": None, "completed_at": None, "outcome": None}
    if verdict is Verdict.DONE:
        row.update(status=CommandStatus.DONE.value, completed_at=now,
                   outcome=OutcomeKind.DONE.value)
        return row
    assert error is not None
    if verdict in NOT_COUNTED:
        row["attempts_delta"] = -1
        _not_counted(c, verdict, error, now, row, effects)
        return row
    if verdict is Verdict.PERMANENT:
        return _dead(row, now, _text(error))
    due = now + timedelta(seconds=policy.backoff(c.attempts + 1))
    if verdict is Verdict.UNKNOWN:
        refusal = policy.resend_refusal(c.method, c.params, due, rules.resend,
                                        c.first_sent_at or now)
        if refusal is not None:
            return _dead(row, now, unknown_reason(_text(error), refusal), OutcomeKind.UNKNOWN)
    return _retry(c, error, now, due, rules, row)


def unknown_reason(what: str, refusal: str) -> str:
    """A dead command's reason after an unknown outcome, and why it was not sent again."""
    return f"{UNKNOWN_OUTCOME}: {what}; not sent again: {refusal}"


def _not_counted(c: Candidate, verdict: Verdict, error: BaseException, now: datetime,
                 row: dict[str, Any], effects: Effects) -> None:
    if verdict is Verdict.RATE:
        effects.fill_bucket = True
    elif verdict is Verdict.REFRESH:
        effects.refresh = True
    elif verdict is Verdict.HOLD:
        effects.hold = error
    elif verdict is Verdict.OPERATING:
        reset = getattr(error, "reset_at", None) or (now + OPERATING_FALLBACK).timestamp()
        effects.operating[c.method.lower()] = max(reset, effects.operating.get(c.method.lower(), 0))
        row["not_before"] = datetime.fromtimestamp(reset, now.tzinfo)


def _retry(c: Candidate, error: BaseException, now: datetime, due: datetime, rules: Rules,
           row: dict[str, Any]) -> dict[str, Any]:
    started = c.first_sent_at or now
    if now - started >= rules.horizon:
        hours = rules.horizon.total_seconds() / 3600
        return _dead(row, now, f"still failing after {hours:g} h of retries: {_text(error)}")
    row["not_before"] = due
    return row


def _dead(row: dict[str, Any], now: datetime, reason: str,
          kind: OutcomeKind = OutcomeKind.DEAD) -> dict[str, Any]:
    row.update(status=CommandStatus.DEAD.value, dead_reason=reason, completed_at=now,
               outcome=kind.value)
    return row


def _text(error: BaseException) -> str:
    if isinstance(error, errors.ApiError):
        return f"{error.code}: {error.description}" if error.description else error.code
    return f"{type(error).__name__}: {error}"


def _account(commands: Sequence[Candidate], answer: BatchResult, effects: Effects) -> None:
    """Seconds of processing each method used (its operating time, protocol §6.2), and how
    many commands they are for. A command the portal refused with OPERATION_TIME_LIMIT did
    not run: it books nothing, and its instant answer says nothing of the method's cost."""
    for c in commands:
        timing = answer.times.get(c.batch_key)
        refused = answer.errors.get(c.batch_key)
        if refused is not None and verdict_of(refused) is Verdict.OPERATING:
            continue
        if isinstance(timing, dict) and timing.get("processing") is not None:
            method = c.method.lower()
            effects.processing[method] = (effects.processing.get(method, 0.0)
                                          + float(timing["processing"]))
            effects.costed[method] = effects.costed.get(method, 0) + 1
