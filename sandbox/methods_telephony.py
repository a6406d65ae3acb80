"""telephony.externalLine.* and telephony.externalCall.* with the documented validation errors."""

from __future__ import annotations

import base64
import re
import secrets
import time
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


def make_call(
    portal: Portal,
    user_id: int,
    phone: str,
    call_type: str,
    line: str,
    external: str,
    start: float,
    click_to_call: bool = False,
) -> dict[str, Any]:
    """Create an active (registered, unfinished) call."""
    hits = find_crm(portal, phone)
    call = {
        "CALL_ID": new_call_id(),
        "USER_ID": user_id,
        "PHONE_NUMBER": phone,
        "TYPE": call_type,
        "LINE_NUMBER": line,
        "EXTERNAL_CALL_ID": external,
        "START": start,
        "SHOWN": set(),
        "CLICK_TO_CALL": click_to_call,
        "REGISTERED_AT": time.time(),
        "CRM_ENTITY_TYPE": hits[0]["CRM_ENTITY_TYPE"] if hits else None,
        "CRM_ENTITY_ID": hits[0]["CRM_ENTITY_ID"] if hits else None,
    }
    portal.calls[call["CALL_ID"]] = call
    return call


@method("telephony.externalCall.register", scope="telephony")
def call_register(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Register a call; identical key within 30 min returns the same CALL_ID."""
    portal = ctx.portal
    user = _resolve_user(ctx, params)
    call_type = str(arg(params, "TYPE", default=""))
    if call_type not in TYPES:
        raise core("Unknown TYPE")
    phone = norm_phone(arg(params, "PHONE_NUMBER", default=""))
    if not _PHONE_RE.match(phone):
        raise core("Unsupported phone number format")
    start = _check_date(arg(params, "CALL_START_DATE", default=None))
    line = str(arg(params, "LINE_NUMBER", default=""))
    external = str(arg(params, "EXTERNAL_CALL_ID", default=""))
    key = (
        phone,
        call_type,
        str(arg(params, "USER_ID", default="")),
        str(arg(params, "USER_PHONE_INNER", default="")),
        line,
        external,
    )
    now = time.time()
    dedup = portal.dedup
    hit = dedup.get(key)
    if hit and now - hit[1] < DEDUP_WINDOW:
        call = portal.calls.get(hit[0]) or portal.finished_calls.get(hit[0])
        return _register_result(hit[0], call or {}, None, [])
    for c in portal.calls.values():
        if (
            c["CLICK_TO_CALL"]
            and c["USER_ID"] == user.id
            and c["PHONE_NUMBER"] == phone
            and now - c["REGISTERED_AT"] < DEDUP_WINDOW
        ):
            portal.violation("register_for_click_to_call")
            break
    call = make_call(portal, user.id, phone, call_type, line, external, start)
    dedup[key] = (call["CALL_ID"], now)
    created: list[dict[str, Any]] = []
    lead = None
    if call["CRM_ENTITY_ID"] is None and str(arg(params, "CRM_CREATE", default="0")) == "1":
        lead = add_entity(
            ctx,
            "lead",
            {"TITLE": f"Call {phone}", "PHONE": [{"VALUE": phone, "VALUE_TYPE": "WORK"}]},
        )
        call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"] = "LEAD", lead
        created.append({"ENTITY_TYPE": "LEAD", "ENTITY_ID": lead})
    if arg(params, "CRM_ENTITY_TYPE", default=None) and arg(params, "CRM_ENTITY_ID", default=None):
        call["CRM_ENTITY_TYPE"] = str(params["CRM_ENTITY_TYPE"]).upper()
        call["CRM_ENTITY_ID"] = int(params["CRM_ENTITY_ID"])
    if str(arg(params, "SHOW", default="1")) == "1":
        call["SHOWN"].add(user.id)
    return _register_result(call["CALL_ID"], call, lead, created)


def _register_result(
    call_id: str, call: dict[str, Any], lead: Any, created: list[Any]
) -> dict[str, Any]:
    return {
        "CALL_ID": call_id,
        "CRM_CREATED_LEAD": lead,
        "CRM_CREATED_ENTITIES": created,
        "CRM_ENTITY_TYPE": call.get("CRM_ENTITY_TYPE"),
        "CRM_ENTITY_ID": call.get("CRM_ENTITY_ID"),
    }


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
    portal.stat_seq += 1
    activity = add_entity(ctx, "activity", {}) if "activity" in portal.crm else None
    stat = {
        "ID": portal.stat_seq,
        "CALL_ID": call_id,
        "EXTERNAL_CALL_ID": call["EXTERNAL_CALL_ID"],
        "PORTAL_USER_ID": str(user.id),
        "PHONE_NUMBER": call["PHONE_NUMBER"],
        "PORTAL_NUMBER": call["LINE_NUMBER"],
        "INCOMING": call["TYPE"],
        "CALL_DURATION": str(duration),
        "CALL_START_DATE": iso(call["START"]),
        "CALL_STATUS": 1 if status == "200" else 0,
        "CALL_VOTE": str(arg(params, "VOTE", default="")),
        "COST": str(arg(params, "COST", default="0")),
        "COST_CURRENCY": str(arg(params, "COST_CURRENCY", default="")),
        "CALL_FAILED_CODE": status,
        "CALL_FAILED_REASON": str(arg(params, "FAILED_REASON", default="")),
        "REST_APP_ID": "1",
        "REST_APP_NAME": portal.client_id,
        "CRM_ACTIVITY_ID": activity or portal.stat_seq,
        "COMMENT": None,
        "CRM_ENTITY_TYPE": call["CRM_ENTITY_TYPE"],
        "CRM_ENTITY_ID": call["CRM_ENTITY_ID"],
    }
    portal.finished_calls[call_id] = dict(stat, RECORD=None, FINISHED_AT=time.time())
    return stat


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
