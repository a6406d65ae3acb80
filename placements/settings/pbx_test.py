"""The settings page's "send a test originate": one signed request to the portal's PBX, its
answer shown to the administrator.

It is signed exactly as click-to-call signs an originate (``app.telephony.click.sign`` and its
headers), so a PBX that takes the test takes the real ones. It is marked as a test three ways,
so that no PBX rings anyone for it: ``"kind": "test"``, ``"test": true``, and no extension or
number to call. app/ingress/PBX_EVENTS.md asks a PBX to check the signature and answer a test
2xx without placing a call; one that predates that rule answers 4xx for the missing number,
which still proves the signature was taken (401 would not).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

import httpx

from app.telephony.click import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from app.tenants.models import PortalSettings

TIMEOUT = 5.0
BODY_SHOWN = 300  # characters of the PBX's answer shown on the page
TEST_HEADER = "X-B24Relay-Test"


@dataclass(frozen=True)
class Answer:
    """What the PBX answered: status (None: no answer), milliseconds, its body's start."""

    status: int | None
    ms: int
    body: str
    error: str = ""

    @property
    def signature_refused(self) -> bool:
        """The PBX refused the signature or the key: the secret differs."""
        return self.status in (401, 403)

    @property
    def reached(self) -> bool:
        """The PBX answered and took the signature (a 4xx about the missing number is fine)."""
        return self.status is not None and self.status < 500 and not self.signature_refused


def body() -> bytes:
    """The test request's JSON: marked as a test, naming nobody to call."""
    return json.dumps({"kind": "test", "test": True,
                       "call_id": "b24relay-test-" + secrets.token_hex(6),
                       "extension": "", "phone": "",
                       "text": "b24relay test request: do not place a call"},
                      separators=(",", ":")).encode()


def send(settings: PortalSettings) -> Answer:
    """Post one signed test request to the portal's originate URL (it must be set)."""
    url, secret = settings.pbx_originate_url or "", settings.pbx_secret or ""
    payload, stamp = body(), int(time.time())
    began = time.perf_counter()
    try:
        response = httpx.post(url, content=payload, timeout=TIMEOUT, headers={
            "Content-Type": "application/json", TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(secret, stamp, payload), TEST_HEADER: "1"})
    except httpx.HTTPError as exc:
        return Answer(None, _ms(began), "", f"{type(exc).__name__}: {exc}"[:BODY_SHOWN])
    return Answer(response.status_code, _ms(began), response.text[:BODY_SHOWN])


def _ms(began: float) -> int:
    return int((time.perf_counter() - began) * 1000)
