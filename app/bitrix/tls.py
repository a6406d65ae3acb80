"""Which certificates the app's outgoing clients trust (``B24_CA_BUNDLE``, app/config.py).

Every client talking to Bitrix24 (REST, the token endpoint, ``app.info``) takes its
``verify`` from :func:`trust`, so one setting decides for all of them.
"""

from __future__ import annotations

import functools
import ssl


@functools.lru_cache(maxsize=8)
def trust(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """``verify=`` for httpx: the CAs in the PEM file ``ca_bundle``, or httpx's default store.

    Cached per path: loading a bundle costs milliseconds, and a context is safe to share
    between clients and threads. A named bundle replaces the default store, as curl's
    ``--cacert`` does, so it must hold every CA the app has to trust.
    """
    if not ca_bundle:
        return True
    return ssl.create_default_context(cafile=ca_bundle)


def describe(exc: Exception) -> str:
    """A transport failure in words, naming an untrusted certificate as such."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return f"{type(exc).__name__}: {exc}"
    reason = getattr(cause, "verify_message", None) or str(cause)
    return f"untrusted TLS certificate ({reason})"
