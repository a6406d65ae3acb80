"""Per-call views of the command log: what a test of a day of calls checks by EXTERNAL_CALL_ID
(registered once, finished once, who was shown and hidden when, no show/hide after the finish).

Built from the log entries the telephony methods annotate (``call_id``, ``external_call_id``,
``created``, ``shown``, ``users``, ``accepted``, ``finisher``, ``status_code``, ...), so it sees
exactly the commands the sandbox executed, in execution order (``seq``). The log is bounded
(``log_limit``): ``first_seq`` says where the view starts.
"""

from __future__ import annotations

from typing import Any

REGISTER = "telephony.externalcall.register"
SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
FINISH = "telephony.externalcall.finish"
ATTACH = "telephony.externalcall.attachrecord"
UPLOAD = "upload"
TELEPHONY = (REGISTER, SHOW, HIDE, FINISH, ATTACH, UPLOAD)


def _blank(key: str) -> dict[str, Any]:
    return {
        "external_call_id": key,
        "call_ids": [],
        "registers": [],  # every register answered: seq, at, call_id, created, owner, shown
        "finishes": [],  # every finish tried: seq, at, ok, error, finisher, status_code
        "cards": [],  # show/hide/register-show/finish-hide in order: seq, at, action, users
        "registered": 0,  # registers that created a call
        "finished": 0,  # successful finishes
        "finisher": None,
        "status_code": None,
        "duration": None,
        "call_start_date": None,  # as the first register set it, in the portal's zone
        "call_start": None,  # the same, unix seconds with the fraction
        "shown_users": [],
        "open_at_finish": [],  # shown, not hidden before the finish, not the finisher
        "after_finish": [],  # show/hide commands executed after the first finish
        "records": 0,  # successful attachRecord/upload answers that stored a file
    }


def _key(entry: dict[str, Any], by_call: dict[str, str]) -> str | None:
    ext = entry.get("external_call_id")
    if ext is not None:
        return str(ext)
    call_id = entry.get("call_id")
    if not call_id:
        return None
    return by_call.get(call_id, f"CALL_ID:{call_id}")


def _register(row: dict[str, Any], e: dict[str, Any], by_call: dict[str, str], key: str) -> None:
    if e["error"] is not None:
        row["registers"].append({"seq": e["seq"], "at": e["finish"], "error": e["error"]})
        return
    by_call[e["call_id"]] = key
    if e["call_id"] not in row["call_ids"]:
        row["call_ids"].append(e["call_id"])
    row["registered"] += 1 if e["created"] else 0
    if row["call_start_date"] is None:
        row["call_start_date"], row["call_start"] = e.get("call_start_date"), e.get("call_start")
    row["registers"].append({"seq": e["seq"], "at": e["finish"], "call_id": e["call_id"],
                             "created": e["created"], "owner": e.get("owner"),
                             "shown": e.get("shown", [])})
    if e.get("shown"):
        _card(row, e, "show", e["shown"], True)


def _card(row: dict[str, Any], e: dict[str, Any], action: str, users: list[int],
          accepted: bool) -> None:
    item = {"seq": e["seq"], "at": e["finish"], "action": action, "users": users,
            "accepted": accepted}
    row["cards"].append(item)
    if row["finished"] and action in ("show", "hide"):
        row["after_finish"].append(item)


def _finish(row: dict[str, Any], e: dict[str, Any]) -> None:
    ok = e["error"] is None
    row["finishes"].append({"seq": e["seq"], "at": e["finish"], "ok": ok, "error": e["error"],
                            "finisher": e.get("finisher"), "status_code": e.get("status_code")})
    if not ok or row["finished"]:
        row["finished"] += 1 if ok else 0
        return
    row["finished"] = 1
    row["finisher"], row["status_code"] = e.get("finisher"), e.get("status_code")
    row["duration"] = e.get("duration")
    row["open_at_finish"] = e.get("cards_left_open", [])
    _card(row, e, "finish-hide", [e.get("finisher")], True)


def _apply(row: dict[str, Any], e: dict[str, Any], by_call: dict[str, str], key: str) -> None:
    method = e["method"]
    if method == REGISTER:
        _register(row, e, by_call, key)
    elif method in (SHOW, HIDE) and e["error"] is None:
        _card(row, e, "show" if method == SHOW else "hide", e.get("users", []),
              bool(e.get("accepted")))
    elif method == FINISH:
        _finish(row, e)
    elif method in (ATTACH, UPLOAD) and e["error"] is None and not e.get("upload_url"):
        row["records"] += 1


def _users_shown(row: dict[str, Any]) -> list[int]:
    shown = {u for c in row["cards"] if c["action"] == "show" and c["accepted"] for u in c["users"]}
    return sorted(shown)


def _problem(row: dict[str, Any]) -> bool:
    """Not registered once and finished once, or a card left open or touched after the finish."""
    return (row["registered"] != 1 or row["finished"] != 1 or bool(row["open_at_finish"])
            or bool(row["after_finish"]))


def history(entries: list[dict[str, Any]], external_call_id: str | None = None,
            problems: bool = False) -> dict[str, Any]:
    """Every call of the log (or one) keyed by EXTERNAL_CALL_ID, plus the totals a test asserts
    on and the CALL_IDs returned for more than one EXTERNAL_CALL_ID (collisions). ``problems``
    keeps only the calls that break the day-of-calls rules (the totals still count all)."""
    rows: dict[str, dict[str, Any]] = {}
    by_call: dict[str, str] = {}
    for e in sorted(entries, key=lambda x: x["seq"]):
        if e.get("method") not in TELEPHONY:
            continue
        key = _key(e, by_call)
        if key is None:
            continue
        _apply(rows.setdefault(key, _blank(key)), e, by_call, key)
    owners: dict[str, set[str]] = {}
    for key, row in rows.items():
        row["shown_users"] = _users_shown(row)
        for call_id in row["call_ids"]:
            owners.setdefault(call_id, set()).add(key)
    if external_call_id is not None:
        rows = {k: v for k, v in rows.items() if k == external_call_id}
    totals = _totals(rows)
    if problems:
        rows = {k: v for k, v in rows.items() if _problem(v)}
    return {
        "calls": rows,
        "totals": totals,
        "collisions": {c: sorted(k) for c, k in owners.items() if len(k) > 1},
        "first_seq": entries[0]["seq"] if entries else None,
    }


def _totals(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    values = list(rows.values())
    return {
        "calls": len(values),
        "registered_once": sum(r["registered"] == 1 for r in values),
        "registered_more": sum(r["registered"] > 1 for r in values),
        "finished_once": sum(r["finished"] == 1 for r in values),
        "finished_more": sum(r["finished"] > 1 for r in values),
        "unfinished": sum(r["finished"] == 0 for r in values),
        "open_at_finish": sum(bool(r["open_at_finish"]) for r in values),
        "after_finish": sum(bool(r["after_finish"]) for r in values),
    }
