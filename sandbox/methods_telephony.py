"""telephony.externalLine.* and telephony.externalCall.* with the documented validation errors."""

from __future__ import annotations

import base64
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .methods_core import arg
from .methods_crm import add_entity
from .rest import ApiError, Ctx, iso, method
from .state import Portal

DEDUP_WINDOW = 1800.0
TYPES = {"1", "2", "3", "4", "5"}
_PHONE_RE = re.compile(r"^\+?\d{3,20}$")
STATUS_CODES = {
    "200",
    "304",
    "603",
    "603-S",
    "403",
    "404",
    "486",
    "484",
    "503",
    "480",
    "402",
    "423",
    "OTHER",
}


def core(text: str) -> ApiError:
    return ApiError("ERROR_CORE", text, 400)


def norm_phone(raw: Any) -> str:
    """Strip formatting from a phone number."""
    return re.sub(r"[\s\-()./]", "", str(raw or ""))


def new_call_id() -> str:
    return f"externalCall.{secrets.token_hex(16)}.{int(time.time())}"


def _resolve_user(ctx: Ctx, params: dict[str, Any]) -> Any:
    uid = arg(params, "USER_ID", default=None)
    inner = arg(params, "USER_PHONE_INNER", default=None)
    if uid is None and inner is None:
        raise core("USER_ID or USER_PHONE_INNER should be set")
    user = None
    if uid is not None:
        try:
            user = ctx.portal.users.get(int(uid))
        except (TypeError, ValueError):
            user = None
    else:
        user = next((u for u in ctx.portal.users.values() if u.extension == str(inner)), None)
    if user is None or not user.active:
        raise core("User is not found or is not active")
    return user


def find_crm(portal: Portal, phone: str) -> list[dict[str, Any]]:
    """CRM records whose PHONE matches, in Bitrix's priority order (contact, company, lead)."""
    hits = []
    for kind in ("contact", "company", "lead"):
        for rec in portal.crm[kind].values():
            phones = rec.get("PHONE") or []
            values = [
                norm_phone(p.get("VALUE") if isinstance(p, dict) else p)
                for p in (phones if isinstance(phones, list) else [phones])
            ]
            if phone and phone in values:
                hits.append((kind.upper(), rec))
    return [
        {
            "CRM_ENTITY_TYPE": k,
            "CRM_ENTITY_ID": int(r["ID"]),
            "ASSIGNED_BY_ID": int(r.get("ASSIGNED_BY_ID", 1)),
            "NAME": str(r.get("NAME") or r.get("TITLE") or ""),
            "ASSIGNED_BY": _assigned(portal, int(r.get("ASSIGNED_BY_ID", 1))),
        }
        for k, r in hits
    ]


def _assigned(portal: Portal, uid: int) -> dict[str, Any]:
    u = portal.users.get(uid)
    return {
        "ID": str(uid),
        "TIMEMAN_STATUS": "NOT_INSTALLED",
        "USER_PHONE_INNER": u.extension if u else "",
        "WORK_PHONE": "",
        "PERSONAL_PHONE": "",
        "PERSONAL_MOBILE": "",
    }


# ---------------------------------------------------------------- lines


@method("telephony.externalLine.add", scope="telephony")
def line_add(ctx: Ctx, params: dict[str, Any]) -> dict[str, int]:
    number = str(arg(params, "NUMBER", default=""))
    if not number:
        raise ApiError("ERROR_ARGUMENT", "NUMBER is required", 400, argument="NUMBER")
    if number in ctx.portal.lines:
        raise core("Line already exists")
    ctx.portal.line_seq += 1
    ctx.portal.lines[number] = {
        "ID": ctx.portal.line_seq,
        "NUMBER": number,
        "NAME": str(arg(params, "NAME", default="")),
        "CRM_AUTO_CREATE": str(arg(params, "CRM_AUTO_CREATE", default="Y")),
    }
    return {"ID": ctx.portal.line_seq}


@method("telephony.externalLine.update", scope="telephony")
def line_update(ctx: Ctx, params: dict[str, Any]) -> dict[str, str]:
    number = str(arg(params, "NUMBER", default=""))
    line = ctx.portal.lines.get(number)
    if line is None:
        raise core("Line not found")
    for key in ("NAME", "CRM_AUTO_CREATE"):
        if key in params:
            line[key] = str(params[key])
    return {"ID": str(line["ID"])}


@method("telephony.externalLine.get", scope="telephony")
def line_get(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"NUMBER": ln["NUMBER"], "NAME": ln["NAME"], "CRM_AUTO_CREATE": ln["CRM_AUTO_CREATE"]}
        for ln in ctx.portal.lines.values()
    ]


@method("telephony.externalLine.delete", scope="telephony")
def line_delete(ctx: Ctx, params: dict[str, Any]) -> list[Any]:
    ctx.portal.lines.pop(str(arg(params, "NUMBER", default="")), None)
    return []


# ---------------------------------------------------------------- calls


def _check_date(raw: Any) -> float:
    if raw in (None, ""):
        return time.time()
    try:
        parsed = datetime.fromisoformat(str(raw))
    except ValueError:
        raise core("CALL_START_DATE should be in the ISO-8601 format") from None
    if parsed.tzinfo is None:
        raise core("CALL_START_DATE should be in the ISO-8601 format")
    return parsed.timestamp()


@dataclass
class CallSpec:
    """What a register asks for: the dedup key plus what a new call is made of."""

    user_id: int
    phone: str
    call_type: str
    line: str
    external: str | None  # None: not passed (then dedup ignores it, as Bitrix24 does)
    start: float
    crm_create: bool = False
    crm_entity: tuple[str, int] | None = None
    show: bool = True
    click_to_call: bool = False


def make_call(portal: Portal, spec: CallSpec) -> dict[str, Any]:
    """Create an active (registered, unfinished) call."""
    hits = find_crm(portal, spec.phone)
    call = {
        "CALL_ID": new_call_id(),
        "USER_ID": spec.user_id,
        "PHONE_NUMBER": spec.phone,
        "TYPE": spec.call_type,
        "LINE_NUMBER": spec.line,
        "EXTERNAL_CALL_ID": spec.external,
        "START": spec.start,
        "SHOWN": set(),
        "CLICK_TO_CALL": spec.click_to_call,
        "REGISTERED_AT": time.time(),
        "CRM_ENTITY_TYPE": hits[0]["CRM_ENTITY_TYPE"] if hits else None,
        "CRM_ENTITY_ID": hits[0]["CRM_ENTITY_ID"] if hits else None,
        "CREATED_LEAD": None,
        "CREATED": [],
    }
    portal.calls[call["CALL_ID"]] = call
    portal.calls_by_party.setdefault((spec.user_id, spec.phone), []).append(call["CALL_ID"])
    return call


def _party_calls(portal: Portal, user_id: int, phone: str) -> list[dict[str, Any]]:
    """The active calls of one user and number, in registration order."""
    return [portal.calls[c] for c in portal.calls_by_party.get((user_id, phone), ())]


def find_active(portal: Portal, spec: CallSpec, now: float) -> dict[str, Any] | None:
    """The active call a register repeats, per the platform's dedup rule.

    Only calls not yet finished, whose CALL_START_DATE is under 30 minutes old, for the same
    resolved user, number and TYPE; LINE_NUMBER and EXTERNAL_CALL_ID count when passed (the
    rest module's register builds its duplicate filter that way).
    """
    for call in _party_calls(portal, spec.user_id, spec.phone):
        if (
            call["TYPE"] == spec.call_type
            and call["START"] > now - DEDUP_WINDOW
            and (not spec.line or call["LINE_NUMBER"] == spec.line)
            and (spec.external is None or call["EXTERNAL_CALL_ID"] == spec.external)
        ):
            return call
    return None


def register_call(ctx: Ctx, spec: CallSpec) -> dict[str, Any]:
    """Return the active duplicate or create the call (and its lead); note it in the log."""
    portal = ctx.portal
    call = find_active(portal, spec, time.time())
    created = call is None
    if call is None:
        _check_click_to_call(portal, spec)
        call = make_call(portal, spec)
        _count_external(portal, spec.external)
        _bind_crm(ctx, call, spec)
    if spec.show:
        call["SHOWN"].add(spec.user_id)
    ctx.note = {"call_id": call["CALL_ID"], "external_call_id": spec.external,
                "created": created}
    return call


def _check_click_to_call(portal: Portal, spec: CallSpec) -> None:
    """A new register for a click-to-call the portal already registered is a violation."""
    if spec.click_to_call:
        return
    for c in _party_calls(portal, spec.user_id, spec.phone):
        if (
            c["CLICK_TO_CALL"]
            and time.time() - c["REGISTERED_AT"] < DEDUP_WINDOW
        ):
            portal.violation("register_for_click_to_call")
            return


def _count_external(portal: Portal, external: str | None) -> None:
    """Count calls created again for an EXTERNAL_CALL_ID that already had one."""
    if not external:
        return
    portal.dedup[external] = portal.dedup.get(external, 0) + 1
    if portal.dedup[external] > 1:
        portal.bump("duplicate_calls")


def _bind_crm(ctx: Ctx, call: dict[str, Any], spec: CallSpec) -> None:
    """The CRM entity passed, else a CRM match, else a new lead when asked to create one."""
    if spec.crm_entity:
        call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"] = spec.crm_entity
        return
    if call["CRM_ENTITY_ID"] is not None or not spec.crm_create or _is_internal(ctx, spec):
        return
    lead = add_entity(
        ctx,
        "lead",
        {"TITLE": f"Call {spec.phone}", "PHONE": [{"VALUE": spec.phone, "VALUE_TYPE": "WORK"}]},
    )
    call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"] = "LEAD", lead
    call["CREATED_LEAD"] = lead
    call["CREATED"] = [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": lead}]


def _is_internal(ctx: Ctx, spec: CallSpec) -> bool:
    """A call to an employee's extension creates nothing in the CRM."""
    return any(u.extension == spec.phone and u.active for u in ctx.portal.users.values())


def _crm_entity(params: dict[str, Any]) -> tuple[str, int] | None:
    kind = arg(params, "CRM_ENTITY_TYPE", default=None)
    ident = arg(params, "CRM_ENTITY_ID", default=None)
    if not kind or not str(ident or "").isdigit():
        return None
    return str(kind).upper(), int(ident)


@method("telephony.externalCall.register", scope="telephony")
def call_register(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Register a call; an active duplicate (the platform's dedup rule) is returned instead."""
    user = _resolve_user(ctx, params)
    call_type = str(arg(params, "TYPE", default=""))
    if call_type not in TYPES:
        raise core("Unknown TYPE")
    phone = norm_phone(arg(params, "PHONE_NUMBER", default=""))
    if not _PHONE_RE.match(phone):
        raise core("Unsupported phone number format")
    external = params.get("EXTERNAL_CALL_ID")
    spec = CallSpec(
        user_id=user.id,
        phone=phone,
        call_type=call_type,
        line=str(arg(params, "LINE_NUMBER", default="")).strip(),
        external=None if external is None else str(external),
        start=_check_date(arg(params, "CALL_START_DATE", default=None)),
        crm_create=str(arg(params, "CRM_CREATE", default="0")) == "1",
        crm_entity=_crm_entity(params),
        show=str(arg(params, "SHOW", default="1")) == "1",
    )
    return _register_result(register_call(ctx, spec))


def _register_result(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "CALL_ID": call["CALL_ID"],
        "CRM_CREATED_LEAD": call["CREATED_LEAD"],
        "CRM_CREATED_ENTITIES": list(call["CREATED"]),
        "CRM_ENTITY_TYPE": call.get("CRM_ENTITY_TYPE"),
        "CRM_ENTITY_ID": call.get("CRM_ENTITY_ID"),
    }


# ---------------------------------------------------------------- click-to-call


def _international(phone: str) -> str:
    """E.164 as the portal formats it: "+" and digits (00-prefixed numbers too)."""
    digits = norm_phone(phone)
    if digits.startswith("00"):
        return "+" + digits[2:]
    return digits if digits.startswith("+") else "+" + digits


def _click_line(portal: Portal, data: dict[str, Any]) -> dict[str, Any]:
    """The line a click-to-call goes out on: the one named, else the app's first line."""
    number = str(data.get("LINE_NUMBER") or "")
    if number:
        return portal.lines.get(number) or {"NUMBER": number, "CRM_AUTO_CREATE": "Y"}
    return next(iter(portal.lines.values()), {"NUMBER": "", "CRM_AUTO_CREATE": "Y"})


def click_to_call(ctx: Ctx, data: dict[str, Any]) -> dict[str, Any]:
    """ONEXTERNALCALLSTART data as the portal sends it: it registers the outgoing call first
    (creating a lead when the line's CRM_AUTO_CREATE is on and the CRM has no match), then
    sends the full field set in the documented order (protocol §3.5/§8.8). A CALL_ID in
    ``data`` skips the registration (the caller plays a call registered elsewhere).
    """
    line = _click_line(ctx.portal, data)
    crm: dict[str, Any] = data
    if not data.get("CALL_ID"):
        call = _register_click(ctx, data, line)
        crm = {"CALL_ID": call["CALL_ID"], "CRM_ENTITY_TYPE": call["CRM_ENTITY_TYPE"] or "",
               "CRM_ENTITY_ID": call["CRM_ENTITY_ID"] or ""}
    phone = str(data.get("PHONE_NUMBER") or "")
    return {
        "PHONE_NUMBER": phone,
        "PHONE_NUMBER_INTERNATIONAL": data.get("PHONE_NUMBER_INTERNATIONAL",
                                               _international(phone)),
        "EXTENSION": data.get("EXTENSION", ""),
        "USER_ID": str(ctx.user.id),
        "CALL_LIST_ID": str(data.get("CALL_LIST_ID") or 0),
        "LINE_NUMBER": line["NUMBER"],
        "IS_MOBILE": "1" if str(data.get("IS_MOBILE") or "0") in ("1", "true", "Y") else "0",
        "CALL_ID": crm["CALL_ID"],
        "CRM_ENTITY_TYPE": crm.get("CRM_ENTITY_TYPE", ""),
        "CRM_ENTITY_ID": str(crm.get("CRM_ENTITY_ID", "")),
    }


def _register_click(ctx: Ctx, data: dict[str, Any], line: dict[str, Any]) -> dict[str, Any]:
    """The outgoing call the portal registers for a click, as the app's register would."""
    spec = CallSpec(
        user_id=ctx.user.id,
        phone=norm_phone(data.get("PHONE_NUMBER", "")),
        call_type="1",
        line=line["NUMBER"],
        external=None,
        start=time.time(),
        crm_create=line["CRM_AUTO_CREATE"] == "Y",
        crm_entity=_crm_entity(data),
        show=False,
        click_to_call=True,
    )
    return register_call(ctx, spec)


def _users(params: dict[str, Any], call: dict[str, Any]) -> list[int]:
    raw = arg(params, "USER_ID", default=None)
    if raw is None:
        return [call["USER_ID"]]
    values = raw if isinstance(raw, list) else [raw]
    return [int(v) for v in values if str(v).lstrip("-").isdigit()]


@method("telephony.externalCall.show", scope="telephony")
def call_show(ctx: Ctx, params: dict[str, Any]) -> bool:
    call = ctx.portal.calls.get(str(arg(params, "CALL_ID", default="")))
    if call is None:
        return False
    call["SHOWN"].update(_users(params, call))
    return True


@method("telephony.externalCall.hide", scope="telephony")
def call_hide(ctx: Ctx, params: dict[str, Any]) -> bool:
    call = ctx.portal.calls.get(str(arg(params, "CALL_ID", default="")))
    if call is None:
        return False
    call["SHOWN"].difference_update(_users(params, call))
    return True


@method("telephony.externalCall.finish", scope="telephony")
def call_finish(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Finish a registered call: hides the card, writes statistics, creates the CRM activity."""
    portal = ctx.portal
    call_id = params.get("CALL_ID")
    if not isinstance(call_id, str) or not call_id:
        raise ApiError("INVALID_ARGUMENT", "CALL_ID must be a string", 400)
    user = _resolve_user(ctx, params)
    call = portal.calls.get(call_id)
    if call is None:
        portal.violation(
            "double_finish" if call_id in portal.finished_calls else "finish_before_register"
        )
        raise core("Call is not found (call should be registered prior to finishing)")
    duration = int(arg(params, "DURATION", default=0) or 0)
    status = str(arg(params, "STATUS_CODE", default="200" if duration > 0 else "304"))
    if status not in STATUS_CODES:
        status = "OTHER"
    del portal.calls[call_id]
    party = portal.calls_by_party[(call["USER_ID"], call["PHONE_NUMBER"])]
    party.remove(call_id)
    if not party:
        del portal.calls_by_party[(call["USER_ID"], call["PHONE_NUMBER"])]
    portal.stat_seq += 1
    stat = {
        "ID": portal.stat_seq,
        "CALL_ID": call_id,
        "EXTERNAL_CALL_ID": call["EXTERNAL_CALL_ID"],
        "PORTAL_USER_ID": str(user.id),
        "PHONE_NUMBER": call["PHONE_NUMBER"],
        "PORTAL_NUMBER": call["LINE_NUMBER"],
        "INCOMING": call["TYPE"],
        "CALL_DURATION": str(duration),
        "CALL_START_DATE": iso(call["START"], portal.tz),
        # Follows DURATION, not STATUS_CODE: the rest module sets it from DURATION > 0.
        "CALL_STATUS": 1 if duration > 0 else 0,
        "CALL_VOTE": str(arg(params, "VOTE", default="")),
        "COST": str(arg(params, "COST", default="0")),
        "COST_CURRENCY": str(arg(params, "COST_CURRENCY", default="")),
        "CALL_FAILED_CODE": status,
        "CALL_FAILED_REASON": str(arg(params, "FAILED_REASON", default="")),
        "REST_APP_ID": "1",
        "REST_APP_NAME": portal.client_id,
        "CRM_ACTIVITY_ID": _add_activity(ctx, call),
        "COMMENT": None,
        "CRM_ENTITY_TYPE": call["CRM_ENTITY_TYPE"],
        "CRM_ENTITY_ID": call["CRM_ENTITY_ID"],
    }
    portal.finished_calls[call_id] = dict(stat, RECORD=None, FINISHED_AT=time.time())
    return stat


def _add_activity(ctx: Ctx, call: dict[str, Any]) -> int:
    """The CRM call activity a finish creates (one per finished call, duplicates included)."""
    fields = {
        "TYPE_ID": "2",
        "SUBJECT": f"Call {call['PHONE_NUMBER']}",
        "DIRECTION": "1" if call["TYPE"] in ("2", "3") else "2",
        "START_TIME": iso(call["START"], ctx.portal.tz),
        "OWNER_TYPE": call["CRM_ENTITY_TYPE"] or "",
        "OWNER_ID": str(call["CRM_ENTITY_ID"] or ""),
        "ORIGIN_ID": f"VI_{call['CALL_ID']}",
    }
    return add_entity(ctx, "activity", fields)


def _ext_ok(name: str) -> bool:
    return name.lower().rsplit(".", 1)[-1] in ("wav", "mp3") and "." in name


@method("telephony.externalCall.attachRecord", scope="telephony")
async def call_attach(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Attach a record to a finished call (RECORD_URL, base64 content, or an upload URL)."""
    portal = ctx.portal
    call_id = str(arg(params, "CALL_ID", default=""))
    stat = portal.finished_calls.get(call_id)
    if stat is None:
        if call_id in portal.calls:
            portal.violation("attach_before_finish")
        raise core(
            "Call is not found in the statistic table. It looks like it is not finished yet."
        )
    url = arg(params, "RECORD_URL", default=None)
    filename = str(
        arg(params, "FILENAME", default="")
        or (urlsplit(str(url)).path.rsplit("/", 1)[-1] if url else "")
    )
    if not _ext_ok(filename):
        raise core("Wrong file extension. Only wav and mp3 are allowed")
    content = arg(params, "FILE_CONTENT", default=None)
    if url:
        status, data = await ctx.cloud.download(str(url))
        if status != 200:
            raise core(f"Server returns HTTP error code {status}")
        return _store_record(portal, stat, filename, data)
    if content:
        try:
            data = base64.b64decode(str(content), validate=False)
        except ValueError:
            raise core("Could not decode FILE_CONTENT") from None
        return _store_record(portal, stat, filename, data)
    token = secrets.token_hex(16)
    portal.uploads[token] = {"CALL_ID": call_id, "FILENAME": filename}
    return {
        "uploadUrl": f"{portal.client_endpoint}upload.json?auth={token}&token={token}",
        "fieldName": "file",
    }


def _store_record(
    portal: Portal, stat: dict[str, Any], filename: str, data: bytes
) -> dict[str, Any]:
    portal.file_seq += 1
    stat["RECORD"] = {"FILE_ID": portal.file_seq, "FILENAME": filename, "SIZE": len(data)}
    return {"FILE_ID": portal.file_seq}


def store_upload(portal: Portal, token: str, filename: str, data: bytes) -> dict[str, Any] | None:
    """Finish an upload started by attachRecord(FILENAME only)."""
    pending = portal.uploads.pop(token, None)
    if pending is None:
        return None
    stat = portal.finished_calls[pending["CALL_ID"]]
    return _store_record(portal, stat, pending["FILENAME"] or filename, data)


@method("telephony.externalCall.searchCrmEntities", scope="telephony")
def call_search(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, Any]]:
    phone = norm_phone(arg(params, "PHONE_NUMBER", default=""))
    if not phone:
        raise ApiError("ERROR_ARGUMENT", "PHONE_NUMBER is required", 400, argument="PHONE_NUMBER")
    return find_crm(ctx.portal, phone)
