"""telephony.externalCall.attachRecord and its upload URL, with the rules of protocol §8.6:
only after a successful finish; RECORD_URL first (downloaded inside the request: status 200, a
mp3/wav/flac name and an audio/* type), then FILENAME + base64 FILE_CONTENT (wav/mp3), then
FILENAME alone (an upload URL tied to the request's access token; the file must be wav/mp3).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from .methods_telephony import core
from .rest import ApiError, Ctx, method
from .state import Portal

NOT_FINISHED = "Call is not found in the statistic table. Looks like it is not finished yet."
NO_SOURCE = "Required parameters are not set. Request should contain or URL or FILENAME parameter"
WRONG_EXT = "Wrong file extension. Only wav and mp3 are allowed"
EMPTY = "File content is empty."
NOT_BASE64 = "File content is not properly encoded. Base64 encoding is expected."
# recordfile.php: a downloaded record needs one of these extensions and an audio/* type. The
# error text is ours (the protocol doc does not quote one).
URL_EXTENSIONS = ("mp3", "wav", "flac")
UPLOAD_EXTENSIONS = ("mp3", "wav")
_DISPOSITION_RE = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.I)


def _ext_ok(name: str, allowed: tuple[str, ...]) -> bool:
    return "." in name and name.lower().rsplit(".", 1)[-1] in allowed


def _finished(ctx: Ctx, call_id: str) -> dict[str, Any]:
    """The statistics row of a finished call, else the "not finished yet" error."""
    portal = ctx.portal
    stat = portal.finished_calls.get(call_id)
    if stat is None:
        if call_id in portal.calls:
            portal.violation("attach_before_finish")
        raise core(NOT_FINISHED)
    return stat


@method("telephony.externalCall.attachRecord", scope="telephony")
async def call_attach(ctx: Ctx, params: dict[str, Any]) -> dict[str, Any]:
    """Attach a record to a finished call (RECORD_URL, base64 content, or an upload URL)."""
    call_id = str(params.get("CALL_ID") or "")
    stat = _finished(ctx, call_id)
    ctx.note = {"call_id": call_id, "external_call_id": stat["EXTERNAL_CALL_ID"]}
    filename = str(params.get("FILENAME") or "")
    if params.get("RECORD_URL") is not None:
        return await _from_url(ctx, stat, str(params["RECORD_URL"]), filename)
    if not filename:
        raise core(NO_SOURCE)
    if not _ext_ok(filename, UPLOAD_EXTENSIONS):
        raise core(WRONG_EXT)
    if params.get("FILE_CONTENT") is not None:  # "" counts as given: "File content is empty."
        return _store_record(ctx.portal, stat, filename, _decode(params["FILE_CONTENT"]))
    token = secrets.token_hex(16)
    ctx.portal.uploads[token] = {"CALL_ID": call_id, "FILENAME": filename, "AUTH": ctx.token}
    ctx.note["upload_url"] = True
    return {
        "uploadUrl": f"{ctx.portal.client_endpoint}upload.json?auth={ctx.token}&token={token}",
        "fieldName": "file",
    }


def _decode(content: Any) -> bytes:
    """Strict base64 of FILE_CONTENT."""
    if not isinstance(content, str) or not content.strip():
        raise core(EMPTY)
    try:
        data = base64.b64decode(content.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise core(NOT_BASE64) from None
    if not data:
        raise core(EMPTY)
    return data


def _private(url: str) -> bool:
    """A private address other than this machine's loopback: unreachable from the cloud."""
    host = urlsplit(url).hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host.endswith((".local", ".lan", ".internal"))
    return addr.is_private and not addr.is_loopback


async def _from_url(ctx: Ctx, stat: dict[str, Any], url: str, filename: str) -> dict[str, Any]:
    """Download RECORD_URL inside the request, as the platform does."""
    if _private(url):
        raise ApiError("SERVER_NOT_AVAILABLE", "Server is not available", 400)
    status, data, headers = await ctx.cloud.download(url)
    if status == 0:
        raise ApiError("SERVER_NOT_AVAILABLE", "Server is not available", 400)
    if status != 200:
        raise core(f"Server returns HTTP error code {status}")
    name = filename or _disposition_name(headers) or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    mime = headers.get("content-type", "").split(";")[0].strip().lower()
    if not _ext_ok(name, URL_EXTENSIONS) or not mime.startswith("audio/"):
        raise core("Wrong file type. The record must be a mp3, wav or flac file of an audio type")
    return _store_record(ctx.portal, stat, name, data)


def _disposition_name(headers: dict[str, str]) -> str:
    m = _DISPOSITION_RE.search(headers.get("content-disposition", ""))
    return unquote(m.group(1)) if m else ""


def _store_record(
    portal: Portal, stat: dict[str, Any], filename: str, data: bytes
) -> dict[str, Any]:
    """Attach (again: replaces) the record of a finished call."""
    portal.file_seq += 1
    stat["RECORD"] = {"FILE_ID": portal.file_seq, "FILENAME": filename, "SIZE": len(data)}
    stat["RECORDS_ATTACHED"] = stat.get("RECORDS_ATTACHED", 0) + 1
    return {"FILE_ID": portal.file_seq}


def upload_error(portal: Portal, cloud: Any, token: str, filename: str) -> ApiError | None:
    """Why an upload to attachRecord's URL is refused, if it is: unknown token, the access
    token it embeds no longer valid (post promptly), or a file name not ending in wav/mp3."""
    pending = portal.uploads.get(token)
    if pending is None:
        return ApiError("invalid_token", "Unable to get application by token", 401)
    access = cloud.tokens.access.get(pending["AUTH"])
    if access is None or access.expires <= time.time():
        return ApiError("expired_token", "The access token provided has expired.", 401)
    if not _ext_ok(filename, UPLOAD_EXTENSIONS):
        return core(WRONG_EXT)
    return None


def store_upload(portal: Portal, token: str, filename: str, data: bytes) -> dict[str, Any] | None:
    """Finish an upload started by attachRecord(FILENAME only)."""
    pending = portal.uploads.pop(token, None)
    if pending is None:
        return None
    stat = portal.finished_calls[pending["CALL_ID"]]
    portal.record({"method": "upload", "params": {"FILENAME": filename}, "start": time.time(),
                   "finish": time.time(), "status": 200, "error": None, "in_batch": False,
                   "batch_id": None, "user_id": None, "call_id": pending["CALL_ID"],
                   "external_call_id": stat["EXTERNAL_CALL_ID"]})
    return _store_record(portal, stat, filename, data)
