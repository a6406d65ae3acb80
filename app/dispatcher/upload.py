"""Two-step file uploads: a method that answers with an upload URL, then the file posted there.

``telephony.externalCall.attachRecord`` with ``FILENAME`` and no content answers
``{"uploadUrl": ..., "fieldName": ...}`` (protocol §8.6); the file then goes as a
multipart POST under ``fieldName`` to ``uploadUrl``, a second request that cannot go in a
batch. The URL embeds the access token the first request was made with, so both steps run
together, on the direct path's ground (``app.dispatcher.direct``): the same credentials,
the same portal rate bucket (each step takes a token), and the same verdicts. An expired
token in either step refreshes the chain once and runs both steps again with the new one.

The file's bytes stay in memory here and never reach the outbox's table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from app.bitrix import errors
from app.bitrix.rest import decode, transport_error
from app.dispatcher import direct
from app.dispatcher.credentials import Snapshot
from app.tenants.models import Portal

__all__ = ["upload_file"]


def upload_file(portal: Portal, method: str, params: Mapping[str, Any], filename: str,
                content: bytes, content_type: str) -> Any:
    """Call ``method`` (which answers with an upload URL), post ``content`` there as
    ``filename``; return the upload's ``result``. Errors are raised as ``BitrixError``."""

    def both(snap: Snapshot) -> dict[str, Any]:
        client = direct.rest_client()
        answer = client.call(snap.client_endpoint, method, params, snap.access_token or "")
        target = answer.get("result")
        if not isinstance(target, dict) or not target.get("uploadUrl"):
            raise errors.TransportError(f"{method} answered without an uploadUrl: "
                                        f"{str(target)[:200]}")
        direct.pace(portal)
        try:
            response = client.http.post(
                str(target["uploadUrl"]),
                files={str(target.get("fieldName") or "file"): (filename, content,
                                                                 content_type)})
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        return decode(response)

    return direct.send(portal, both).get("result")
