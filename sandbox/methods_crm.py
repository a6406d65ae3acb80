"""A few crm.* methods on an in-memory store; writes fire the matching CRM events."""

from __future__ import annotations

import operator
import time
from typing import Any

from .methods_core import arg
from .rest import ApiError, Ctx, iso, method, page

OPS = {
    "": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "!": operator.ne,
}


def _fields(params: dict[str, Any]) -> dict[str, Any]:
    fields = arg(params, "fields", "FIELDS", default={})
    if not isinstance(fields, dict):
        raise ApiError(
            "ERROR_ARGUMENT", "Argument 'fields' must be an array", 400, argument="fields"
        )
    return fields


def _id(params: dict[str, Any]) -> int:
    raw = arg(params, "id", "ID", default=None)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ApiError("ERROR_ARGUMENT", "ID is not defined or invalid.", 400) from None
    if value <= 0:
        raise ApiError("ERROR_ARGUMENT", "ID is not defined or invalid.", 400)
    return value


def add_entity(ctx: Ctx, kind: str, fields: dict[str, Any]) -> int:
    """Create a CRM record; used by methods and by telephony auto-create."""
    ctx.portal.crm_seq += 1
    new_id = ctx.portal.crm_seq
    now = iso(time.time(), ctx.portal.tz)
    rec = {
        "ID": str(new_id),
        "DATE_CREATE": now,
        "DATE_MODIFY": now,
        "ASSIGNED_BY_ID": str(ctx.user.id),
        "CREATED_BY_ID": str(ctx.user.id),
    }
    rec.update(fields)
    ctx.portal.crm[kind][new_id] = rec
    ctx.cloud.emit(
        ctx.portal, f"ONCRM{kind.upper()}ADD", {"FIELDS": {"ID": str(new_id)}}, ctx.user.id
    )
    return new_id


def _get(ctx: Ctx, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    rec = ctx.portal.crm[kind].get(_id(params))
    if rec is None:
        raise ApiError("NOT_FOUND", "Not found", 400)
    return rec


def _list(ctx: Ctx, kind: str, params: dict[str, Any]) -> Any:
    flt = arg(params, "filter", "FILTER", default={})
    rows = [r for _, r in sorted(ctx.portal.crm[kind].items())]
    if isinstance(flt, dict):
        for key, want in flt.items():
            op = ""
            while key and key[0] in "<>=!":
                op, key = op + key[0], key[1:]
            if key.upper() == "ID":
                w = int(want)
                cmp = OPS[op]
                rows = [r for r in rows if cmp(int(r["ID"]), w)]
            else:
                rows = [r for r in rows if str(r.get(key.upper(), "")) == str(want)]
    select = arg(params, "select", "SELECT", default=None)
    if isinstance(select, list) and select and "*" not in select:
        keys = {str(s).upper() for s in select} | {"ID"}
        rows = [{k: v for k, v in r.items() if k in keys} for r in rows]
    return page(rows, params)


@method("crm.contact.add", scope="crm")
def contact_add(ctx: Ctx, params: dict[str, Any]) -> int:
    return add_entity(ctx, "contact", _fields(params))


@method("crm.contact.get", scope="crm")
def contact_get(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return _get(ctx, "contact", params)


@method("crm.contact.list", scope="crm")
def contact_list(ctx: Ctx, params: dict[str, Any]) -> Any:
    return _list(ctx, "contact", params)


@method("crm.lead.add", scope="crm")
def lead_add(ctx: Ctx, params: dict[str, Any]) -> int:
    return add_entity(ctx, "lead", _fields(params))


@method("crm.lead.get", scope="crm")
def lead_get(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return _get(ctx, "lead", params)


@method("crm.lead.list", scope="crm")
def lead_list(ctx: Ctx, params: dict[str, Any]) -> Any:
    return _list(ctx, "lead", params)


@method("crm.activity.list", scope="crm")
def activity_list(ctx: Ctx, params: dict[str, Any]) -> Any:
    return _list(ctx, "activity", params)


@method("crm.deal.add", scope="crm")
def deal_add(ctx: Ctx, params: dict[str, Any]) -> int:
    return add_entity(ctx, "deal", _fields(params))


@method("crm.deal.get", scope="crm")
def deal_get(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    return _get(ctx, "deal", params)


@method("crm.deal.list", scope="crm")
def deal_list(ctx: Ctx, params: dict[str, Any]) -> Any:
    return _list(ctx, "deal", params)


@method("crm.deal.update", scope="crm")
def deal_update(ctx: Ctx, params: dict[str, Any]) -> bool:
    """Update a deal; your own update fires ONCRMDEALUPDATE back to you (as in Bitrix24)."""
    rec = _get(ctx, "deal", params)
    rec.update(_fields(params))
    rec["DATE_MODIFY"] = iso(time.time(), ctx.portal.tz)
    ctx.cloud.emit(ctx.portal, "ONCRMDEALUPDATE", {"FIELDS": {"ID": rec["ID"]}}, ctx.user.id)
    return True
