"""telephony.externalLine.* and telephony.externalCall.* as protocol §8 describes the platform's
source: PHP-truthy flags, "" counts as set, the register dedup rule, finish hiding only its own
user's card, 304 as the only missed call. attachRecord lives in sandbox.methods_records.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .methods_core import arg
from .methods_crm import add_entity
from .rest import ApiError, Ctx, iso, method, page
from .state import Portal, parse_time_zone

DEDUP_WINDOW = 1800.0
TYPES = {1, 2, 3, 4, 5}
INCOMING = ("2", "3")  # the TYPEs with missed-call logic (§8.3)
# The source's text has no closing parenthesis (the docs add one): apps must match the prefix.
CALL_NOT_FOUND = "Call is not found (call should be registered prior to finishing"
BAD_DATE = "CALL_START_DATE should be in the ISO-8601 format"
LOCAL_USER_LEAD = "Lead creation is disabled for local users"
NO_ACTIVITY = "Could not find associated crm entity for the current call"
_INT_RE = re.compile(r"\s*([+-]?\d+)")


def core(text: str) -> ApiError:
    """An ERROR_CORE answer (HTTP 400) with the platform's text."""
    return ApiError("ERROR_CORE", text, 400)


def php_true(value: Any) -> bool:
    """PHP's (bool) cast: "", "0", 0, 0.0, false, null and [] are false; "N", "false" are true."""
    if isinstance(value, str):
        return value not in ("", "0")
    return bool(value)


def flag(params: dict[str, Any], name: str, default: bool) -> bool:
    """A flag per §8.1: absent (or JSON null, PHP's unset) takes the default, else PHP-truthy."""
    if params.get(name) is None:
        return default
    return php_true(params[name])


def intval(value: Any) -> int:
    """PHP's intval: leading digits of a string ("12abc" -> 12), 0 when there are none."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value)
    m = _INT_RE.match(value) if isinstance(value, str) else None
    return int(m.group(1)) if m else 0


def norm_phone(raw: Any) -> str:
    """vi_phone stripLetters: keep digits and #*+,; only; no normalisation beyond that."""
    return re.sub(r"[^0-9#*+,;]", "", str(raw or ""))


def new_call_id() -> str:
    """A CALL_ID shaped like the platform's."""
    return f"externalCall.{secrets.token_hex(16)}.{int(time.time())}"


def _resolve_user(ctx: Ctx, params: dict[str, Any]) -> Any:
    """USER_ID (cast to int) when non-zero, else the user whose UF_PHONE_INNER matches (§8.3)."""
    uid = intval(params.get("USER_ID"))
    if uid:
        user = ctx.portal.users.get(uid)
    else:
        inner = str(params.get("USER_PHONE_INNER") or "")
        user = next((u for u in ctx.portal.users.values() if inner and u.extension == inner), None)
        if user is None:
            raise core("USER_ID or USER_PHONE_INNER should be set")
    if user is None or not user.active:
        raise core("User is not found or is not active")
    return user


def find_crm(portal: Portal, phone: str, user: Any = None) -> list[dict[str, Any]]:
    """CRM records whose PHONE matches, grouped contact, lead, company (helper
    searchCrmEntities); with ``user`` not an admin, only the records assigned to him (the search
    is filtered by the caller's CRM permissions, §8.7)."""
    hits = []
    for kind in ("contact", "lead", "company"):
        for rec in portal.crm[kind].values():
            phones = rec.get("PHONE") or []
            values = [
                norm_phone(p.get("VALUE") if isinstance(p, dict) else p)
                for p in (phones if isinstance(phones, list) else [phones])
            ]
            mine = user is None or user.admin or str(rec.get("ASSIGNED_BY_ID", 1)) == str(user.id)
            if phone and phone in values and mine:
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
        "TIMEMAN_STATUS": u.timeman if u else "NOT_INSTALLED",
        "USER_PHONE_INNER": u.extension if u else "",
        "WORK_PHONE": "",
        "PERSONAL_PHONE": "",
        "PERSONAL_MOBILE": "",
    }


# ---------------------------------------------------------------- lines


def _line_number(params: dict[str, Any]) -> str:
    """NUMBER as the platform keeps it: trimmed, at most 50 characters (§8.2)."""
    return str(arg(params, "NUMBER", default="") or "").strip()[:50]


def _crm_auto_create(value: Any) -> str:
    """CRM_AUTO_CREATE: "Y" only for the literal "Y"; 1, "true" and the rest are "N" (§8.2)."""
    return "Y" if str(value) == "Y" else "N"


def _not_found(number: str) -> ApiError:
    return core(f"Could not find line with number {number}")


@method("telephony.externalLine.add", scope="telephony")
def line_add(ctx: Ctx, params: dict[str, Any]) -> dict[str, int]:
    """Add a line; NUMBER trimmed, CRM_AUTO_CREATE Y unless given as anything but "Y"."""
    number = _line_number(params)
    if not number:
        raise core("NUMBER should not be empty")
    if number in ctx.portal.lines:
        raise core("Line already exists")
    ctx.portal.line_seq += 1
    ctx.portal.lines[number] = {
        "ID": ctx.portal.line_seq,
        "NUMBER": number,
        "NAME": str(arg(params, "NAME", default="")),
        "CRM_AUTO_CREATE": _crm_auto_create(arg(params, "CRM_AUTO_CREATE", default="Y")),
    }
    return {"ID": ctx.portal.line_seq}


@method("telephony.externalLine.update", scope="telephony")
def line_update(ctx: Ctx, params: dict[str, Any]) -> dict[str, str]:
    """Update NAME and/or CRM_AUTO_CREATE of a line found by its (trimmed) NUMBER."""
    number = _line_number(params)
    line = ctx.portal.lines.get(number)
    if line is None:
        raise _not_found(number)
    fields = {k.upper(): v for k, v in params.items()
              if k.upper() in ("NAME", "CRM_AUTO_CREATE")}
    if not fields:
        raise core("There are no fields to update")
    if "NAME" in fields:
        line["NAME"] = str(fields["NAME"])
    if "CRM_AUTO_CREATE" in fields:
        line["CRM_AUTO_CREATE"] = _crm_auto_create(fields["CRM_AUTO_CREATE"])
    return {"ID": str(line["ID"])}


@method("telephony.externalLine.get", scope="telephony")
def line_get(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, str]]:
    """The app's lines, those auto-created by register included."""
    return [
        {"NUMBER": ln["NUMBER"], "NAME": ln["NAME"], "CRM_AUTO_CREATE": ln["CRM_AUTO_CREATE"]}
        for ln in ctx.portal.lines.values()
    ]


# What GetPortalNumber falls back to when the stored default is no line the portal knows.
BASE_NUMBER = "LINK_BASE_NUMBER"
APP_ID = 1  # the app's id on the portal (app.info ID): its pseudo-line is REST_APP:<id>


def app_line_ids(portal: Portal) -> list[str]:
    """The ids under which the app can be the default outgoing line: ``REST_APP:<id>`` and its
    external lines' numbers, listed only while the app has ONEXTERNALCALLSTART bound (the
    voximplant module lists REST apps among the lines by that event's subscribers)."""
    if not any(b.event == "ONEXTERNALCALLSTART" for b in portal.bindings):
        return []
    return [f"REST_APP:{APP_ID}", *portal.lines]


def outgoing_line(portal: Portal) -> str:
    """The portal's default line for outgoing calls, as ``voximplant.line.outgoing.get`` gives
    it: the stored choice when it still names a line, else LINK_BASE_NUMBER."""
    ours = app_line_ids(portal)
    choice = portal.outgoing_line
    if choice is None:  # never chosen otherwise: the app (what click-to-call here assumes)
        choice = next(iter(portal.lines), f"REST_APP:{APP_ID}")
    return choice if choice in ours or choice in portal.other_lines else BASE_NUMBER


@method("voximplant.line.outgoing.get", scope="telephony", admin=True)
def line_outgoing_get(ctx: Ctx, params: dict[str, Any]) -> str:
    """The default outgoing line's id: digits for a rented number, ``reg…``/``sip…`` for a SIP
    PBX, ``REST_APP:<app id>`` for an app, an app's line by its NUMBER (voximplant source:
    vi_rest lineOutgoingGet → CVoxImplantConfig::GetPortalNumber). The source asks for the
    line-edit permission; here an administrator (ACCESS_DENIED otherwise)."""
    return outgoing_line(ctx.portal)


@method("telephony.externalLine.delete", scope="telephony")
def line_delete(ctx: Ctx, params: dict[str, Any]) -> list[Any]:
    """Delete a line; an unknown NUMBER is "Could not find line with number X"."""
    number = _line_number(params)
    if ctx.portal.lines.pop(number, None) is None:
        raise _not_found(number)
    return []


# ---------------------------------------------------------------- calls


def _start_date(ctx: Ctx, params: dict[str, Any]) -> float:
    """CALL_START_DATE per §8.3: absent -> now; ISO-8601 with an offset, "Z" or fractional
    seconds; without an offset read in the server's zone (a violation); "" or unparsable ->
    the ISO-8601 error ("" counts as set, §8.1)."""
    raw = params.get("CALL_START_DATE")
    if raw is None:
        return time.time()
    try:
        parsed = datetime.fromisoformat(str(raw).strip())
    except ValueError:
        raise core(BAD_DATE) from None
    if parsed.tzinfo is None:
        ctx.portal.violation("start_date_without_offset")
        parsed = parsed.replace(tzinfo=parse_time_zone(ctx.cloud.settings.server_time_zone))
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
    crm_entity: tuple[str, int] | None = None  # ("", 0): both keys sent empty, §8.3
    show: bool = True
    click_to_call: bool = False


def make_call(portal: Portal, spec: CallSpec) -> dict[str, Any]:
    """Create an active (registered, unfinished) call."""
    hits = [] if spec.crm_entity is not None else find_crm(portal, spec.phone)
    call = {
        "CALL_ID": new_call_id(),
        "USER_ID": spec.user_id,
        "PHONE_NUMBER": spec.phone,
        "TYPE": spec.call_type,
        "LINE_NUMBER": spec.line,
        "EXTERNAL_CALL_ID": spec.external,
        "START": spec.start,
        "SHOWN": set(),  # the users who see the card now
        "EVER_SHOWN": set(),
        "CLICK_TO_CALL": spec.click_to_call,
        "REGISTERED_AT": time.time(),
        "CRM_ENTITY_TYPE": hits[0]["CRM_ENTITY_TYPE"] if hits else None,
        "CRM_ENTITY_ID": hits[0]["CRM_ENTITY_ID"] if hits else None,
        "CREATED_LEAD": None,
        "CREATED": [],
        "LEAD_CREATION_ERROR": None,
    }
    portal.calls[call["CALL_ID"]] = call
    portal.calls_by_party.setdefault((spec.user_id, spec.phone), []).append(call["CALL_ID"])
    return call


def _party_calls(portal: Portal, user_id: int, phone: str) -> list[dict[str, Any]]:
    """The active calls of one user and number, in registration order."""
    return [portal.calls[c] for c in portal.calls_by_party.get((user_id, phone), ())]


def find_active(
    portal: Portal, spec: CallSpec, now: float, by_external: bool = True
) -> dict[str, Any] | None:
    """The active call a register repeats, per the platform's dedup rule.

    Only calls not yet finished, whose CALL_START_DATE is under 30 minutes old, for the same
    resolved user, number and TYPE; LINE_NUMBER and EXTERNAL_CALL_ID count when passed (the
    rest module's register builds its duplicate filter that way). ``by_external=False`` is an
    older build that leaves EXTERNAL_CALL_ID out of the filter.
    """
    for call in _party_calls(portal, spec.user_id, spec.phone):
        if (
            call["TYPE"] == spec.call_type
            and call["START"] > now - DEDUP_WINDOW
            and (not spec.line or call["LINE_NUMBER"] == spec.line)
            and (not by_external or spec.external is None
                 or call["EXTERNAL_CALL_ID"] == spec.external)
        ):
            return call
    return None


def register_call(ctx: Ctx, spec: CallSpec) -> dict[str, Any]:
    """Return the active duplicate or create the call (and its lead); note it in the log."""
    portal = ctx.portal
    call = find_active(portal, spec, time.time(), ctx.cloud.settings.call_dedup_external_id)
    created = call is None
    if call is None:
        _check_click_to_call(portal, spec)
        call = make_call(portal, spec)
        _count_external(portal, spec.external)
        _bind_crm(ctx, call, spec)
    if spec.show:  # a dedup hit with SHOW shows the card again (§8.3)
        call["SHOWN"].add(spec.user_id)
        call["EVER_SHOWN"].add(spec.user_id)
    if not spec.click_to_call:
        portal.bump("robot_triggers")  # every register, duplicate or late, fires them again
    ctx.note = {"call_id": call["CALL_ID"], "external_call_id": spec.external,
                "created": created, "owner": spec.user_id,
                "shown": [spec.user_id] if spec.show else [],
                "call_start_date": iso(spec.start, portal.tz), "call_start": spec.start}
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
    """The CRM entity passed (even empty: then no search, no lead), else a CRM match, else a new
    lead when asked to create one, refused for an employee's number (§8.3)."""
    if spec.crm_entity is not None:
        kind, ident = spec.crm_entity
        call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"] = kind or None, ident or None
        return
    if call["CRM_ENTITY_ID"] is not None or not spec.crm_create:
        return
    if _is_employee(ctx.portal, spec.phone):
        call["LEAD_CREATION_ERROR"] = LOCAL_USER_LEAD
        ctx.portal.bump("lead_creation_errors")
        return
    lead = add_entity(
        ctx,
        "lead",
        {"TITLE": f"Call {spec.phone}", "PHONE": [{"VALUE": spec.phone, "VALUE_TYPE": "WORK"}]},
    )
    call["CRM_ENTITY_TYPE"], call["CRM_ENTITY_ID"] = "LEAD", lead
    call["CREATED_LEAD"] = lead
    call["CREATED"] = [{"ENTITY_TYPE": "LEAD", "ENTITY_ID": lead}]


def _is_employee(portal: Portal, phone: str) -> bool:
    """Whether the number is an employee's inner, work or mobile number (a local user)."""
    return any(
        phone == u.extension or phone in {norm_phone(n) for n in u.phones}
        for u in portal.users.values()
    )


def _crm_binding(portal: Portal, params: dict[str, Any]) -> tuple[str, int] | None:
    """CRM_ENTITY_TYPE/ID when both are present (PHP isset: "" counts, null does not)."""
    kind, ident = params.get("CRM_ENTITY_TYPE"), params.get("CRM_ENTITY_ID")
    if kind is None or ident is None:
        return None
    if str(kind) == "" or intval(ident) == 0:
        portal.violation("empty_crm_entity")  # the card shows no client, Bitrix's match skipped
        return "", 0
    return str(kind).upper(), intval(ident)


def _page_entity(params: dict[str, Any]) -> tuple[str, int] | None:
    """The CRM entity of the page a click-to-call started on, if any."""
    kind = arg(params, "CRM_ENTITY_TYPE", default=None)
    ident = arg(params, "CRM_ENTITY_ID", default=None)
    if not kind or not str(ident or "").isdigit():
        return None
    return str(kind).upper(), int(ident)


def _line(portal: Portal, params: dict[str, Any]) -> str:
    """LINE_NUMBER trimmed and cut to 50; an unknown one is auto-created, nameless (§8.2)."""
    number = str(params.get("LINE_NUMBER") or "").strip()[:50]
    if number and number not in portal.lines:
        portal.line_seq += 1
        portal.lines[number] = {"ID": portal.line_seq, "NUMBER": number, "NAME": "",
                                "CRM_AUTO_CREATE": "Y"}
    return number


@method("telephony.externalCall.register", scope="telephony")
def call_register(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Register a call; an active duplicate (the platform's dedup rule) is returned instead."""
    external = params.get("EXTERNAL_CALL_ID")
    ctx.note = {"external_call_id": None if external is None else str(external)}  # if refused
    user = _resolve_user(ctx, params)
    if intval(params.get("TYPE")) not in TYPES:
        raise core("Unknown TYPE")
    phone = norm_phone(params.get("PHONE_NUMBER"))
    if not phone:
        raise core("Unsupported phone number format")
    spec = CallSpec(
        user_id=user.id,
        phone=phone,
        call_type=str(intval(params.get("TYPE"))),
        line=_line(ctx.portal, params),
        external=None if external is None else str(external),
        start=_start_date(ctx, params),
        crm_create=flag(params, "CRM_CREATE", False),
        crm_entity=_crm_binding(ctx.portal, params),
        show=flag(params, "SHOW", True),
    )
    call = register_call(ctx, spec)
    return _register_result(call, ctx.note["created"])


def _register_result(call: dict[str, Any], created: bool) -> dict[str, Any]:
    """The answer: CRM_ENTITY_TYPE "" without a match, null on a dedup hit (§8.3)."""
    out = {
        "CALL_ID": call["CALL_ID"],
        "CRM_CREATED_LEAD": call["CREATED_LEAD"],
        "CRM_CREATED_ENTITIES": list(call["CREATED"]),
        "CRM_ENTITY_TYPE": call.get("CRM_ENTITY_TYPE") or ("" if created else None),
        "CRM_ENTITY_ID": call.get("CRM_ENTITY_ID"),
    }
    if created and call["LEAD_CREATION_ERROR"]:
        out["LEAD_CREATION_ERROR"] = call["LEAD_CREATION_ERROR"]
    return out


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


def callback_start(portal: Portal, data: dict[str, Any]) -> dict[str, Any]:
    """ONEXTERNALCALLBACKSTART data as the portal sends it (protocol §8.9, helper
    ``startCallBack``): the form's number, the text to read to the employee and its voice,
    the CRM entity the form created or found, and the line chosen as the form's callback
    line (the one named, else the app's first). No CALL_ID and no USER_ID: nothing is
    registered and nobody is chosen (a CALL_ID or USER_ID in ``data`` is dropped)."""
    line = _click_line(portal, data)
    return {
        "PHONE_NUMBER": str(data.get("PHONE_NUMBER") or ""),
        "TEXT": str(data.get("TEXT") or ""),
        "VOICE": str(data.get("VOICE") or ""),
        "CRM_ENTITY_TYPE": str(data.get("CRM_ENTITY_TYPE") or ""),
        "CRM_ENTITY_ID": str(data.get("CRM_ENTITY_ID") or ""),
        "LINE_NUMBER": line["NUMBER"],
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
        crm_entity=_page_entity(data),
        show=False,
        click_to_call=True,
    )
    return register_call(ctx, spec)


def _users(params: dict[str, Any], owner: int) -> list[int]:
    """USER_ID as an int or int[] (unvalidated, §8.4); absent: the call's owner; "" is set and
    names nobody."""
    raw = params.get("USER_ID")
    if raw is None:
        return [owner]
    if isinstance(raw, dict):  # USER_ID[0]=..&USER_ID[1]=.. parsed as a map
        raw = list(raw.values())
    values = raw if isinstance(raw, list) else [raw]
    return [intval(v) for v in values if intval(v)]


def _card(ctx: Ctx, params: dict[str, Any], show: bool) -> bool:
    """show/hide: true only means "push sent"; false for a call never registered or finished,
    and a show/hide after the finish is a violation (§8.4)."""
    portal = ctx.portal
    call_id = str(params.get("CALL_ID") or "")
    call = portal.calls.get(call_id)
    done = portal.finished_calls.get(call_id)
    owner = call["USER_ID"] if call else done["OWNER"] if done else 0
    users = _users(params, owner)
    ctx.note = {"call_id": call_id, "users": users, "accepted": call is not None,
                "external_call_id": (call or done or {}).get("EXTERNAL_CALL_ID")}
    if call is None:
        if done is not None:
            portal.violation("show_after_finish" if show else "hide_after_finish")
        return False
    if show:
        call["SHOWN"].update(users)
        call["EVER_SHOWN"].update(users)
    else:
        call["SHOWN"].difference_update(users)
    return True


@method("telephony.externalCall.show", scope="telephony")
def call_show(ctx: Ctx, params: dict[str, Any]) -> bool:
    """Show the card to USER_ID (default the owner) while the call is active."""
    return _card(ctx, params, True)


@method("telephony.externalCall.hide", scope="telephony")
def call_hide(ctx: Ctx, params: dict[str, Any]) -> bool:
    """Hide the card for USER_ID (default the owner) while the call is active."""
    return _card(ctx, params, False)


def _status_code(params: dict[str, Any], duration: int) -> str:
    """STATUS_CODE stored verbatim; empty or "0" -> 200 if DURATION > 0 else 304 (§8.5)."""
    raw = params.get("STATUS_CODE")
    status = "" if raw is None else str(raw)
    if status in ("", "0"):
        return "200" if duration > 0 else "304"
    return status


def _drop_active(portal: Portal, call: dict[str, Any]) -> None:
    """Finish deletes the active call: it no longer dedups, shows or hides."""
    del portal.calls[call["CALL_ID"]]
    key = (call["USER_ID"], call["PHONE_NUMBER"])
    party = portal.calls_by_party[key]
    party.remove(call["CALL_ID"])
    if not party:
        del portal.calls_by_party[key]


def _missed(portal: Portal, call: dict[str, Any], status: str, user_id: int) -> bool:
    """304 on TYPE 2/3 is the only missed call; 200 on an outgoing call marks that number's
    open missed calls called back (§8.5)."""
    if status == "304" and call["TYPE"] in INCOMING:
        portal.missed.append({"CALL_ID": call["CALL_ID"], "PHONE_NUMBER": call["PHONE_NUMBER"],
                              "USER_ID": user_id, "CALLED_BACK": False})
        portal.bump("missed_calls")
        return True
    if status == "200" and call["TYPE"] == "1":
        for row in portal.missed:
            if row["PHONE_NUMBER"] == call["PHONE_NUMBER"]:
                row["CALLED_BACK"] = True
    return False


@method("telephony.externalCall.finish", scope="telephony")
def call_finish(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Finish a registered call: hides the card for its USER_ID only, writes statistics, creates
    the CRM activity when the call has a CRM entity."""
    portal = ctx.portal
    call_id = params.get("CALL_ID")
    if not isinstance(call_id, str) or not call_id:
        raise ApiError("INVALID_ARGUMENT", "CALL_ID must be a string", 400)
    call = portal.calls.get(call_id)
    done = portal.finished_calls.get(call_id)
    external = (call or done or {}).get("EXTERNAL_CALL_ID")
    ctx.note = {"call_id": call_id, "external_call_id": external}
    user = _resolve_user(ctx, params)
    ctx.note["finisher"] = user.id
    if call is None:
        portal.violation("double_finish" if done else "finish_before_register")
        raise core(CALL_NOT_FOUND)
    duration = max(intval(params.get("DURATION")), 0)
    status = _status_code(params, duration)
    _drop_active(portal, call)
    call["SHOWN"].discard(user.id)  # helper finishExternalCall hides for this user only
    left_open = sorted(call["SHOWN"])
    portal.bump("cards_left_open", len(left_open))
    missed = _missed(portal, call, status, user.id)
    chat = flag(params, "ADD_TO_CHAT", True)
    if chat:
        portal.bump("chat_messages")
    _assign_created(portal, call, user.id)
    stat = _stat_row(ctx, call, params, user.id, duration, status, missed)
    portal.finished_calls[call_id] = dict(
        stat, RECORD=None, RECORDS_ATTACHED=0, FINISHED_AT=time.time(), OWNER=call["USER_ID"],
        CARDS_LEFT_OPEN=left_open, MISSED=missed, ADD_TO_CHAT=chat,
        RECORD_URL=params.get("RECORD_URL"),  # deprecated: never fetched here (§8.5)
    )
    ctx.note = {"call_id": call_id, "external_call_id": call["EXTERNAL_CALL_ID"],
                "finisher": user.id, "status_code": status, "duration": duration,
                "cards_left_open": left_open}
    return stat


def _stat_row(ctx: Ctx, call: dict[str, Any], params: dict[str, Any], user_id: int,
              duration: int, status: str, missed: bool) -> dict[str, Any]:
    """The statistics record finish answers with."""
    portal = ctx.portal
    portal.stat_seq += 1
    activity = _add_activity(ctx, call, user_id, missed) if call["CRM_ENTITY_ID"] else None
    stat = {
        "ID": portal.stat_seq,
        "CALL_ID": call["CALL_ID"],
        "EXTERNAL_CALL_ID": call["EXTERNAL_CALL_ID"],
        "PORTAL_USER_ID": str(user_id),
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
        "CRM_ACTIVITY_ID": activity,
        "COMMENT": None,
        "CRM_ENTITY_TYPE": call["CRM_ENTITY_TYPE"],
        "CRM_ENTITY_ID": call["CRM_ENTITY_ID"],
    }
    if activity is None:  # no CRM binding: the call lives in telephony statistics only
        stat["ERRORS"] = {"ACTIVITY_CREATION": NO_ACTIVITY}
    return stat


def _assign_created(portal: Portal, call: dict[str, Any], user_id: int) -> None:
    """The finish user becomes the responsible of every entity this call auto-created."""
    for item in call["CREATED"]:
        rec = portal.crm[item["ENTITY_TYPE"].lower()].get(int(item["ENTITY_ID"]))
        if rec is not None:
            rec["ASSIGNED_BY_ID"] = str(user_id)


def _add_activity(ctx: Ctx, call: dict[str, Any], user_id: int, missed: bool) -> int:
    """The CRM call activity a finish creates (one per finished call, duplicates included); a
    missed call's is left open (a to-do)."""
    fields = {
        "TYPE_ID": "2",
        "SUBJECT": f"Call {call['PHONE_NUMBER']}",
        "DIRECTION": "1" if call["TYPE"] in INCOMING else "2",
        "START_TIME": iso(call["START"], ctx.portal.tz),
        "OWNER_TYPE": call["CRM_ENTITY_TYPE"] or "",
        "OWNER_ID": str(call["CRM_ENTITY_ID"] or ""),
        "ORIGIN_ID": f"VI_{call['CALL_ID']}",
        "RESPONSIBLE_ID": str(user_id),
        "COMPLETED": "N" if missed else "Y",
    }
    return add_entity(ctx, "activity", fields)


# ---------------------------------------------------------------- statistics

# The statistics record's fields as voximplant.statistic.get lists them (finish's answer
# without its ERRORS; the sandbox's own bookkeeping stays out).
STAT_FIELDS = ("ID", "CALL_ID", "EXTERNAL_CALL_ID", "PORTAL_USER_ID", "PHONE_NUMBER",
               "PORTAL_NUMBER", "INCOMING", "CALL_DURATION", "CALL_START_DATE", "CALL_STATUS",
               "CALL_VOTE", "COST", "COST_CURRENCY", "CALL_FAILED_CODE", "CALL_FAILED_REASON",
               "REST_APP_ID", "REST_APP_NAME", "CRM_ACTIVITY_ID", "COMMENT", "CRM_ENTITY_TYPE",
               "CRM_ENTITY_ID")


def _stat_visible(ctx: Ctx, row: dict[str, Any]) -> bool:
    """Only calls the token's user may see (vi_rest statisticGet): an admin sees every call,
    an employee his own."""
    return bool(ctx.user.admin) or str(row.get("PORTAL_USER_ID")) == str(ctx.user.id)


def _stat_match(row: dict[str, Any], flt: dict[str, Any]) -> bool:
    """FILTER by equality on any statistics field (``=FIELD`` too); a list is IN. Other
    operators are not modelled: they are refused, so a test never trusts a lax reading."""
    for raw_key, want in flt.items():
        key = str(raw_key).upper().removeprefix("=")
        values = [str(v) for v in (want.values() if isinstance(want, dict) else
                                   want if isinstance(want, list) else [want])]
        if str(row.get(key)) not in values:
            return False
    return True


@method("voximplant.statistic.get", scope="telephony")
def statistic_get(ctx: Ctx, params: dict[str, Any]) -> Any:
    """The statistics of finished calls (protocol §8.13): active calls are not there; FILTER
    on CALL_ID, EXTERNAL_CALL_ID or any other field; the caller's visibility; pages of 50."""
    flt = arg(params, "FILTER", "filter", default=None) or {}
    if not isinstance(flt, dict):
        raise ApiError("ERROR_ARGUMENT", "FILTER must be an object", 400)
    for raw_key in flt:
        if str(raw_key).upper().removeprefix("=") not in STAT_FIELDS:
            raise ApiError("ERROR_ARGUMENT", f"Unknown or unsupported filter field {raw_key}", 400)
    rows = sorted(ctx.portal.finished_calls.values(), key=lambda r: int(r["ID"]))
    found = [{k: row.get(k) for k in STAT_FIELDS} for row in rows
             if _stat_visible(ctx, row) and _stat_match(row, flt)]
    ctx.note = {"call_id": flt.get("CALL_ID"), "found": len(found)}
    return page(found, params)


@method("telephony.externalCall.searchCrmEntities", scope="telephony")
def call_search(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, Any]]:
    """§8.7: the CRM records with this number, contacts, leads, companies; only those the
    calling user may read (an employee's token misses his colleagues' clients); each with its
    responsible's extension and TIMEMAN_STATUS."""
    phone = norm_phone(arg(params, "PHONE_NUMBER", default=""))
    if not phone:
        raise core("PHONE_NUMBER is empty")
    return find_crm(ctx.portal, phone, ctx.user)
