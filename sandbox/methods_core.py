"""Core REST methods: app.info, profile, users, events, offline events, placements."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from .limits import PLANS
from .rest import ApiError, Ctx, iso, method, page, truthy
from .state import Binding, PlacementBinding, hex32

KNOWN_EVENTS = {
    "ONAPPINSTALL",
    "ONAPPUPDATE",
    "ONAPPUNINSTALL",
    "ONAPPPAYMENT",
    "ONAPPTEST",
    "ONAPPMETHODCONFIRM",
    "ONSUBSCRIPTIONRENEW",
    "ONOFFLINEEVENT",
    "ONUSERADD",
    "ONCRMDEALADD",
    "ONCRMDEALUPDATE",
    "ONCRMDEALDELETE",
    "ONCRMCONTACTADD",
    "ONCRMCONTACTUPDATE",
    "ONCRMCONTACTDELETE",
    "ONCRMLEADADD",
    "ONCRMLEADUPDATE",
    "ONCRMLEADDELETE",
    "ONCRMCOMPANYADD",
    "ONCRMCOMPANYUPDATE",
    "ONCRMCOMPANYDELETE",
    "ONCRMACTIVITYADD",
    "ONEXTERNALCALLSTART",
    "ONEXTERNALCALLBACKSTART",
    "ONVOXIMPLANTCALLINIT",
    "ONVOXIMPLANTCALLSTART",
    "ONVOXIMPLANTCALLEND",
}
PLACEMENTS = {
    "CALL_CARD": "telephony",
    "TELEPHONY_ANALYTICS_MENU": "telephony",
    "LEFT_MENU": None,
    "PAGE_BACKGROUND_WORKER": None,
    "REST_APP_URI": None,
    "USER_PROFILE_MENU": None,
    "CRM_DEAL_DETAIL_TAB": "crm",
    "CRM_CONTACT_DETAIL_TAB": "crm",
    "CRM_LEAD_DETAIL_TAB": "crm",
    "CRM_COMPANY_DETAIL_TAB": "crm",
    "CRM_DEAL_LIST_MENU": "crm",
    "CRM_CONTACT_LIST_MENU": "crm",
}
SINGLE_INSTANCE = {"REST_APP_URI", "PAGE_BACKGROUND_WORKER"}


def arg(params: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present parameter among `names` (Bitrix accepts several spellings)."""
    for name in names:
        if name in params and params[name] not in (None, ""):
            return params[name]
    return default


# ---------------------------------------------------------------- app, profile, users


@method("app.info")
def app_info(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Portal-side app.info (uppercase shape)."""
    p = ctx.portal
    plan = PLANS[p.plan]
    return {
        "ID": 1,
        "CODE": p.client_id,
        "VERSION": 1,
        "STATUS": p.status,
        "INSTALLED": p.install_finished,
        "PAYMENT_EXPIRED": "N",
        "DAYS": 30,
        "LANGUAGE_ID": "en",
        "LICENSE": plan["license"],
        "LICENSE_TYPE": p.plan if p.plan != "standard" else "project",
        "LICENSE_FAMILY": plan["license_family"],
    }


# The scopes this sandbox knows (`scope` with full=true); a portal is granted a subset.
ALL_SCOPES = ("basic", "call", "crm", "department", "entity", "im", "placement", "telephony",
              "user", "user_basic", "user_brief")


@method("scope")
def scope(ctx: Ctx, params: dict[str, Any]) -> list[str]:
    """The scopes granted to the app; ``full=true``: every scope there is (docs, method
    `scope`: available to everyone)."""
    if truthy(arg(params, "full", "FULL", default="")):
        return list(ALL_SCOPES)
    return [s for s in ctx.portal.scope.split(",") if s]


@method("profile")
def profile(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    u = ctx.user
    return {
        "ID": str(u.id),
        "ADMIN": u.admin,
        "NAME": u.name,
        "LAST_NAME": u.last_name,
        "PERSONAL_GENDER": "",
        "PERSONAL_PHOTO": None,
        "TIME_ZONE": "",
        "TIME_ZONE_OFFSET": 0,
    }


@method("user.current", scope="user|user_basic|user_brief")
def user_current(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return ctx.user.as_rest()


@method("user.admin")
def user_admin(ctx: Ctx, params: dict[str, Any]) -> bool:
    return ctx.user.admin


def _match_user(user: Any, flt: dict[str, Any]) -> bool:
    rec = user.as_rest()
    for key, want in flt.items():
        key = key.upper()
        if key == "ACTIVE":
            if user.active != (truthy(want) or want is True):
                return False
        elif key in ("ID", "UF_PHONE_INNER", "NAME", "LAST_NAME", "EMAIL"):
            wants = want if isinstance(want, list) else [want]
            if str(rec.get(key) or "") not in [str(w) for w in wants]:
                return False
        elif key == "ADMIN":
            continue
    return True


@method("user.get", scope="user|user_basic|user_brief")
def user_get(ctx: Ctx, params: dict[str, Any]) -> Any:
    """user.get with FILTER (also bare filter keys as the legacy form) and paging."""
    flt = arg(params, "FILTER", "filter", default=None)
    if not isinstance(flt, dict):
        flt = {
            k: v
            for k, v in params.items()
            if k.upper() in ("ID", "ACTIVE", "UF_PHONE_INNER", "NAME", "LAST_NAME", "EMAIL")
        }
    users = sorted(ctx.portal.users.values(), key=lambda u: u.id)
    return page([u.as_rest() for u in users if _match_user(u, flt)], params)


# ---------------------------------------------------------------- events


def _check_handler(ctx: Ctx, handler: str) -> None:
    parts = urlsplit(handler)
    if parts.scheme not in ("http", "https"):
        raise ApiError("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported event handler protocol", 400)
    if not parts.hostname or "." not in parts.hostname:
        raise ApiError("ERROR_WRONG_HANDLER_URL", "Wrong handler URL", 400)
    app_url = ctx.portal.app_url
    if app_url and urlsplit(app_url).hostname != parts.hostname:
        raise ApiError(
            "ERROR_HANDLER_URL_MATCH", "Event handler URL host must match the application host", 400
        )


@method("event.bind")
def event_bind(ctx: Ctx, params: dict[str, Any]) -> bool:
    """Bind an online handler or an offline queue."""
    name = str(arg(params, "event", "EVENT", default="")).upper()
    if name not in KNOWN_EVENTS:
        raise ApiError("ERROR_EVENT_NOT_FOUND", "Event not found", 400)
    offline = str(arg(params, "event_type", "EVENT_TYPE", default="online")).lower() == "offline"
    auth_type = int(arg(params, "auth_type", "AUTH_TYPE", default=0) or 0)
    if (offline or auth_type not in (0, ctx.user.id)) and not ctx.user.admin:
        raise ApiError("ACCESS_DENIED", "Access denied!", 403)
    if not ctx.user.admin:
        auth_type = ctx.user.id  # a non-admin's handler is always his own
    handler = "" if offline else str(arg(params, "handler", "HANDLER", default=""))
    if not offline:
        if not handler:
            raise ApiError(
                "ERROR_ARGUMENT", "Argument 'handler' is null or empty", 400, argument="handler"
            )
        _check_handler(ctx, handler)
    connector = str(arg(params, "auth_connector", "AUTH_CONNECTOR", default=""))
    for b in ctx.portal.bindings:
        if (
            b.event == name
            and b.handler == handler
            and b.auth_type == auth_type
            and b.offline == offline
            and b.auth_connector == connector
        ):
            raise ApiError("ERROR_HANDLER_ALREADY_EXIST", "Handler already exists!", 400)
    options = arg(params, "options", "OPTIONS", default={})
    ctx.portal.handler_seq += 1
    ctx.portal.bindings.append(
        Binding(
            ctx.portal.handler_seq,
            name,
            handler,
            auth_type,
            offline,
            connector,
            options if isinstance(options, dict) else {},
        )
    )
    return True


@method("event.unbind")
def event_unbind(ctx: Ctx, params: dict[str, Any]) -> dict[str, int]:
    name = str(arg(params, "event", "EVENT", default="")).upper()
    if not name:
        raise ApiError("ERROR_ARGUMENT", "Argument 'event' is null or empty", 400, argument="event")
    offline = str(arg(params, "event_type", "EVENT_TYPE", default="online")).lower() == "offline"
    handler = str(arg(params, "handler", "HANDLER", default=""))
    auth_type = int(arg(params, "auth_type", "AUTH_TYPE", default=0) or 0)
    if not ctx.user.admin:  # ... and removes only those
        auth_type = ctx.user.id
    keep, count = [], 0
    for b in ctx.portal.bindings:
        hit = (
            b.event == name
            and b.offline == offline
            and (offline or b.handler == handler)
            and b.auth_type == auth_type
        )
        count += hit
        if not hit:
            keep.append(b)
    ctx.portal.bindings = keep
    return {"count": count}


@method("event.get")
def event_get(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, Any]]:
    rows = ctx.portal.bindings
    if not ctx.user.admin:  # a non-admin sees only handlers bound as himself
        rows = [b for b in rows if b.auth_type == ctx.user.id]
    return [b.as_rest() for b in rows]


# ---------------------------------------------------------------- offline events


def _offline_filter(rows: list[dict[str, Any]], flt: Any) -> list[dict[str, Any]]:
    if not isinstance(flt, dict):
        return rows
    for raw_key, want in flt.items():
        op = ""
        key = raw_key
        while key and key[0] in "<>=!":
            op += key[0]
            key = key[1:]
        key = key.upper()

        def ok(row: dict[str, Any], key: str = key, op: str = op, want: Any = want) -> bool:
            val = row.get(key)
            if key == "ID":
                val, want2 = int(val), int(want)
            else:
                val, want2 = str(val), str(want)
            return {
                "": val == want2,
                "=": val == want2,
                ">": val > want2,
                "<": val < want2,
                ">=": val >= want2,
                "<=": val <= want2,
                "!": val != want2,
            }.get(op, val == want2)

        rows = [r for r in rows if ok(r)]
    return rows


def _public(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: row[k]
        for k in ("ID", "TIMESTAMP_X", "EVENT_NAME", "EVENT_DATA", "EVENT_ADDITIONAL", "MESSAGE_ID")
    }


@method("event.offline.get", admin=True)
def offline_get(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Read (and clear or reserve) offline events."""
    clear = truthy(arg(params, "clear", default="1"))
    with_error = truthy(arg(params, "error", default="0"))
    limit = int(arg(params, "limit", default=50))
    process_id = arg(params, "process_id", default=None)
    connector = str(arg(params, "auth_connector", default=""))
    queue = ctx.portal.offline
    if process_id:
        rows = [r for r in queue if r["PROCESS_ID"] == process_id]
    else:
        rows = [
            r
            for r in queue
            if not r["PROCESS_ID"]
            and (with_error or not r["ERROR"])
            and (not connector or r["CONNECTOR"] != connector)
        ]
    rows = _offline_filter(rows, arg(params, "filter", default=None))
    rows = sorted(rows, key=lambda r: (r["TS"], int(r["ID"])))[: max(limit, 0)]
    if not rows:
        return {"process_id": None, "events": []}
    if clear:
        ids = {id(r) for r in rows}
        ctx.portal.offline = [r for r in queue if id(r) not in ids]
        return {"process_id": None, "events": [_public(r) for r in rows]}
    pid = process_id or hex32()
    for r in rows:
        r["PROCESS_ID"] = pid
    return {"process_id": pid, "events": [_public(r) for r in rows]}


def _select(ctx: Ctx, params: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    pid = arg(params, "process_id", default=None)
    if not pid:
        raise ApiError(
            "ERROR_ARGUMENT", "Argument 'process_id' is null or empty", 400, argument="process_id"
        )
    rows = [r for r in ctx.portal.offline if r["PROCESS_ID"] == pid]
    ids = arg(params, "id", "ID", default=None)
    mids = arg(params, "message_id", "MESSAGE_ID", default=None)
    if ids is not None:
        want = {str(i) for i in (ids if isinstance(ids, list) else [ids])}
        rows = [r for r in rows if str(r["ID"]) in want]
    if mids is not None:
        want = {str(i) for i in (mids if isinstance(mids, list) else [mids])}
        rows = [r for r in rows if r["MESSAGE_ID"] in want]
    return pid, rows


@method("event.offline.clear", admin=True)
def offline_clear(ctx: Ctx, params: dict[str, Any]) -> bool:
    _, rows = _select(ctx, params)
    drop = {id(r) for r in rows}
    ctx.portal.offline = [r for r in ctx.portal.offline if id(r) not in drop]
    return True


@method("event.offline.error", admin=True)
def offline_error(ctx: Ctx, params: dict[str, Any]) -> bool:
    _, rows = _select(ctx, params)
    for r in rows:
        r["ERROR"], r["PROCESS_ID"] = 1, ""
    return True


@method("event.offline.list", admin=True)
def offline_list(ctx: Ctx, params: dict[str, Any]) -> Any:
    rows = _offline_filter(list(ctx.portal.offline), arg(params, "filter", default=None))
    out = [
        dict(_public(r), PROCESS_ID=r["PROCESS_ID"] or None, ERROR=r["ERROR"])
        for r in sorted(rows, key=lambda r: int(r["ID"]))
    ]
    return page(out, params)


def queue_offline(portal: Any, event: str, data: dict[str, Any], user_id: int | None) -> bool:
    """Store an offline event, keeping only the latest state per object; True if bound."""
    if not any(b.offline and b.event == event for b in portal.bindings):
        return False
    obj = (data.get("FIELDS") or {}).get("ID") if isinstance(data.get("FIELDS"), dict) else None
    now = time.time()
    if obj is not None:
        portal.offline = [
            r
            for r in portal.offline
            if not (r["EVENT_NAME"] == event and r["OBJECT"] == str(obj) and not r["PROCESS_ID"])
        ]
    portal.offline_seq += 1
    portal.offline.append(
        {
            "ID": str(portal.offline_seq),  # a string, as Bitrix24 sends every id here
            "TIMESTAMP_X": iso(now, portal.tz),
            "TS": now,
            "EVENT_NAME": event,
            "EVENT_DATA": data,
            "EVENT_ADDITIONAL": {"user_id": str(user_id or 0)},
            "MESSAGE_ID": hex32(),
            "PROCESS_ID": "",
            "ERROR": 0,
            "OBJECT": str(obj),
            "CONNECTOR": "",
        }
    )
    return True


# ---------------------------------------------------------------- placements


def _bind_error(code: str, text: str, **extra: Any) -> ApiError:
    """A placement.bind error: answered with HTTP 200 (issue #11 point 6; the b24restdocs
    placement-bind page lists 200 for ERROR_PLACEMENT_MAX_COUNT and ERROR_ARGUMENT; we take the
    stricter reading, every placement.bind error). Inside a batch it lands among the results.
    """
    return ApiError(code, text, 200, **extra)


def _offered(ctx: Ctx, code: str) -> bool:
    """Whether this portal offers the placement: known, its tool scope granted, not missing."""
    need = PLACEMENTS.get(code, "?")
    return (
        code in PLACEMENTS
        and (not need or need in ctx.portal.scope.split(","))
        and code not in ctx.portal.missing_placements
    )


def _check_bind(ctx: Ctx, code: str, handler: str, options: Any) -> None:
    if not code:
        raise _bind_error("ERROR_ARGUMENT", "Argument 'PLACEMENT' is null or empty",
                          argument="PLACEMENT")
    if not _offered(ctx, code):
        raise _bind_error("ERROR_PLACEMENT_NOT_FOUND", "Placement not found")
    if not handler:
        raise _bind_error("ERROR_ARGUMENT", "Argument 'HANDLER' is null or empty",
                          argument="HANDLER")
    parts = urlsplit(handler)
    if parts.scheme not in ("http", "https"):
        raise _bind_error("ERROR_UNSUPPORTED_PROTOCOL", "Unsupported handler protocol")
    if not parts.hostname or "." not in parts.hostname:
        raise _bind_error("ERROR_WRONG_HANDLER_URL", "Wrong handler URL")
    if code == "PAGE_BACKGROUND_WORKER" and not (
        isinstance(options, dict) and options.get("errorHandlerUrl")
    ):
        raise _bind_error("EMPTY_ERROR_HANDLER_URL", "errorHandlerUrl is required")


@method("placement.bind", scope="placement", admin=True)
def placement_bind(ctx: Ctx, params: dict[str, Any]) -> bool:
    """Bind a widget handler; every error comes with HTTP 200."""
    code = str(arg(params, "PLACEMENT", "placement", default="")).upper()
    handler = str(arg(params, "HANDLER", "handler", default=""))
    options = arg(params, "OPTIONS", "options", default={})
    _check_bind(ctx, code, handler, options)
    user_id = int(arg(params, "USER_ID", default=0) or 0)
    existing = [b for b in ctx.portal.placements if b.placement == code]
    if any(b.handler == handler and b.user_id == user_id for b in existing):
        raise _bind_error("ERROR_PLACEMENT_HANDLER_EXISTS", "Handler already binded")
    if code in SINGLE_INSTANCE and existing:
        raise _bind_error("ERROR_PLACEMENT_MAX_COUNT", "Placement max count: 1")
    ctx.portal.placements.append(
        PlacementBinding(
            code,
            handler,
            str(arg(params, "TITLE", default="")),
            str(arg(params, "DESCRIPTION", default="")),
            user_id,
            options,
            arg(params, "LANG_ALL", default={}),
        )
    )
    return True


@method("placement.unbind", scope="placement", admin=True)
def placement_unbind(ctx: Ctx, params: dict[str, Any]) -> dict[str, int]:
    """Remove handlers; ``count`` grows by 2 per handler removed (1 found + 1 deleted), as the
    b24restdocs placement-unbind page describes it.
    """
    code = str(arg(params, "PLACEMENT", "placement", default="")).upper()
    if not code:
        raise ApiError(
            "ERROR_ARGUMENT", "Argument 'PLACEMENT' is null or empty", 400, argument="PLACEMENT"
        )
    handler = str(arg(params, "HANDLER", "handler", default=""))
    user = arg(params, "USER_ID", default=None)
    keep = [
        b
        for b in ctx.portal.placements
        if not (
            b.placement == code
            and (not handler or b.handler == handler)
            and (user is None or str(b.user_id) == str(user))
        )
    ]
    removed = len(ctx.portal.placements) - len(keep)
    ctx.portal.placements = keep
    return {"count": 2 * removed}


@method("placement.get", scope="placement", admin=True)
def placement_get(ctx: Ctx, params: dict[str, Any]) -> list[dict[str, Any]]:
    return [b.as_rest() for b in ctx.portal.placements]


@method("placement.list", scope="placement")
def placement_list(ctx: Ctx, params: dict[str, Any]) -> list[str]:
    return sorted(code for code in PLACEMENTS if _offered(ctx, code))
