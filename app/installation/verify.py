"""Who is asking: the iframe POST, the auth server's ``app.info``, the admin check.

* :func:`parse_iframe` reads the portal's iframe POST (§2.3), in either form: the
  short one real portals send (no ``SERVER_ENDPOINT``, ``APPLICATION_TOKEN``,
  ``APPLICATION_SCOPE``) or the full one of the 2026 docs.
* :func:`verify_token` asks a *trusted* auth server (``B24_AUTH_SERVERS``) whose
  token it is: our ``client_id``, the given ``member_id``, and the portal's address
  (:func:`portal_endpoint`, from ``app.info`` only) matching the posted domain (§7.4).
* :func:`user_is_admin` asks the portal (``user.admin``) with the user's own token. Only a
  yes or a refusal about the user is a verdict: a limit or an outage is "the portal is busy"
  (:class:`PortalBusy`), and ``PAYMENT_REQUIRED``, ``NOT_INSTALLED`` or ``PORTAL_DELETED``
  describe the portal, so they move it through the status machine (:class:`PortalHeld`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from flask import current_app

from app.bitrix import OAuthClient, errors
from app.bitrix.errors import ApiError, BitrixError
from app.dispatcher import direct
from app.framing import valid_host
from app.i18n import N_
from app.tenants import status as portal_status
from app.tenants import tokens
from app.tenants.models import Portal

log = logging.getLogger(__name__)

REQUIRED_QUERY = ("DOMAIN",)
# What every portal sends (§2.3). The portal's own iframe template and the install POSTs
# captured in 2023-2024 carry no SERVER_ENDPOINT, APPLICATION_TOKEN or APPLICATION_SCOPE:
# those are used when present and never required.
REQUIRED_FORM = ("AUTH_ID", "REFRESH_ID", "member_id")


class InstallError(Exception):
    """The request cannot be honoured; ``status`` and ``message`` go to the page shown.

    ``message`` is ``Words``: English as a ``str`` (the log, a stored reason), the page's
    language where a page shows it (``app.i18n.shown``, or a template)."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadIframeRequest(InstallError):
    """Fields are missing or malformed (400)."""


class TokenRejected(InstallError):
    """The auth server did not accept the token, or it belongs elsewhere (401/403)."""

    status = 401


class PortalBusy(InstallError):
    """The portal answered with a limit (or an outage): no verdict about the user (503)."""

    status = 503


class PortalHeld(InstallError):
    """Bitrix24 answered with the portal's state (unpaid, uninstalled, deleted), not about
    the user; ``portal`` (when known) has been moved to ``portal_status`` (403)."""

    status = 403

    def __init__(self, message: str, portal_status: str, portal: Portal | None) -> None:
        super().__init__(message)
        self.portal_status = portal_status
        self.portal = portal


@dataclass(frozen=True)
class IframeAuth:
    """What the portal POSTs to the installer and to every placement iframe (§2.3)."""

    domain: str
    protocol: str
    lang: str
    member_id: str
    access_token: str
    refresh_token: str
    expires_in: int
    server_endpoint: str  # the form's SERVER_ENDPOINT, else the auth server that knew the token
    application_token: str  # "" when the form carries none (the short form)
    scope: str
    placement: str
    placement_options: str = ""
    app_sid: str = ""
    server_named: bool = True  # False: the short form named no SERVER_ENDPOINT (§2.3)

    @property
    def origin(self) -> str:
        """The portal's web origin, for ``frame-ancestors``."""
        scheme = "https" if self.protocol == "1" else "http"
        return f"{scheme}://{self.domain}"

    @property
    def client_endpoint(self) -> str:
        """REST base from PROTOCOL + DOMAIN, until Bitrix24 hands one over."""
        return f"{self.origin}/rest/"


def parse_iframe(query: Mapping[str, str], form: Mapping[str, str]) -> IframeAuth:
    """Read the iframe POST (short or full form); a missing or malformed field raises naming it."""
    missing = [k for k in REQUIRED_QUERY if not (query.get(k) or "").strip()]
    missing += [k for k in REQUIRED_FORM if not (form.get(k) or "").strip()]
    if missing:
        raise BadIframeRequest(N_("missing fields: %(fields)s", fields=", ".join(missing)))
    domain = query["DOMAIN"].strip().lower()
    if not valid_host(domain):
        raise BadIframeRequest(N_("DOMAIN is not a host name"))
    named = (form.get("SERVER_ENDPOINT") or "").strip()
    server = named or default_auth_server()
    if urlsplit(server).scheme not in ("http", "https"):
        raise BadIframeRequest(N_("SERVER_ENDPOINT is not an http(s) URL"))
    try:
        expires_in = int(form.get("AUTH_EXPIRES") or 3600)
    except ValueError:
        raise BadIframeRequest(N_("AUTH_EXPIRES is not a number")) from None
    return IframeAuth(
        domain=domain, protocol=(query.get("PROTOCOL") or "1").strip(),
        lang=query.get("LANG", "")[:8],
        member_id=form["member_id"].strip(), access_token=form["AUTH_ID"].strip(),
        refresh_token=form["REFRESH_ID"].strip(), expires_in=expires_in, server_endpoint=server,
        application_token=(form.get("APPLICATION_TOKEN") or "").strip(),
        scope=form.get("APPLICATION_SCOPE", ""),
        placement=(form.get("PLACEMENT") or "DEFAULT").upper(),
        placement_options=form.get("PLACEMENT_OPTIONS", ""), app_sid=query.get("APP_SID", ""),
        server_named=bool(named),
    )


def setting(name: str) -> str | None:
    """A setting from the app config (app/config.py declares it), None when it is empty."""
    value = current_app.config[name]
    return str(value) if value else None


def _auth_server_entries() -> list[str]:
    """``B24_AUTH_SERVERS`` as a list: each entry a host (https) or a ``scheme://host`` URL."""
    raw = setting("B24_AUTH_SERVERS") or ""
    return [entry.strip().lower() for entry in raw.split(",") if entry.strip()]


def _as_url(entry: str) -> tuple[str, str]:
    """``(scheme, host)`` of an auth-server entry; a bare host means https."""
    if "://" in entry:
        parts = urlsplit(entry)
        return parts.scheme, parts.netloc
    return "https", entry


def trusted_auth_servers() -> set[str]:
    """Auth-server hosts whose ``app.info`` answer we believe (``B24_AUTH_SERVERS``)."""
    return set(_trusted_schemes())


def _trusted_schemes() -> dict[str, set[str]]:
    """Each trusted auth-server host and the schemes it may be reached by.

    https always; plain http only where the entry itself says ``http://`` (the sandbox):
    a bare host, or an https entry, is never asked over http.
    """
    schemes: dict[str, set[str]] = {}
    entries = [_as_url(entry) for entry in _auth_server_entries()]
    override = setting("B24_OAUTH_TOKEN_URL")
    if override:
        parts = urlsplit(override)
        entries.append((parts.scheme.lower(), parts.netloc.lower()))
    for scheme, host in entries:
        schemes.setdefault(host, {"https"}).add(scheme)
    return schemes


def default_auth_server() -> str:
    """The auth server's REST base for an iframe POST that names none (the short form, §2.3).

    The host of ``B24_OAUTH_TOKEN_URL`` when it is set (every token goes there anyway),
    else the first entry of ``B24_AUTH_SERVERS`` (see app/config.py).
    """
    override = setting("B24_OAUTH_TOKEN_URL")
    if override:
        parts = urlsplit(override)
        return f"{parts.scheme}://{parts.netloc}/rest/"
    scheme, host = _as_url(_auth_server_entries()[0])  # config.validate: there is one
    return f"{scheme}://{host}/rest/"


def oauth_client() -> OAuthClient:
    """This app's OAuth client (``B24_CLIENT_ID``/``SECRET``, token-URL override)."""
    if not setting("B24_CLIENT_ID") or not setting("B24_CLIENT_SECRET"):
        raise InstallError(N_("B24_CLIENT_ID and B24_CLIENT_SECRET are not configured"), 503)
    return tokens.oauth_client()


# ---------------------------------------------------------------- verification


def verify_token(server_endpoint: str, access_token: str, member_id: str,
                 domain: str | None = None) -> dict[str, Any]:
    """Ask the auth server whose token this is; return its ``app.info`` result or raise."""
    _check_auth_server(server_endpoint)
    try:
        info = oauth_client().app_info(server_endpoint, access_token)
    except ApiError as exc:
        raise TokenRejected(N_("the portal rejected the access token (%(code)s: "
                               "%(description)s); open the app again from your Bitrix24",
                               code=exc.code, description=exc.description)) from exc
    except BitrixError as exc:
        raise InstallError(N_("the Bitrix24 authorization server did not answer (%(error)s)",
                              error=str(exc)), 502) from exc
    _check_app_info(info, member_id, domain)
    return info


def _check_auth_server(server_endpoint: str) -> None:
    """Refuse an auth server we do not trust, or a trusted one at another scheme or path.

    Only the host was matched once: ``http://oauth.bitrix.info/anything`` was then asked
    in the clear, where anyone on the path could answer ``app.info`` for it.
    """
    parts = urlsplit(server_endpoint)
    host = parts.netloc.lower()
    schemes = _trusted_schemes().get(host)
    if schemes is None:
        raise TokenRejected(N_("%(host)s is not a Bitrix24 authorization server this app "
                               "trusts", host=host), 403)
    if parts.scheme.lower() not in schemes:
        raise TokenRejected(N_("the authorization server %(host)s is asked over https only",
                               host=host), 403)
    if parts.path != "/rest/" or parts.query or parts.fragment:
        raise TokenRejected(N_("the authorization server's address must be %(address)s",
                               address=f"{parts.scheme}://{host}/rest/"), 403)


def _check_app_info(info: Mapping[str, Any], member_id: str, domain: str | None) -> None:
    client_id = setting("B24_CLIENT_ID")
    if not client_id or not hmac.compare_digest(str(info.get("client_id") or ""), client_id):
        raise TokenRejected(N_("the access token belongs to another application"), 403)
    install_info = info.get("install") or {}
    if not hmac.compare_digest(str(install_info.get("member_id") or ""), member_id):
        raise TokenRejected(N_("the access token belongs to another portal (member_id "
                               "differs)"), 403)
    endpoint = portal_endpoint(info)  # raises when the auth server names no address
    if domain is not None and urlsplit(endpoint).netloc.lower() != domain.strip().lower():
        raise TokenRejected(N_("the access token belongs to another portal (domain differs)"),
                            403)


def portal_endpoint(info: Mapping[str, Any]) -> str:
    """The portal's REST base as the auth server's ``app.info`` names it (never the request's).

    ``install.client_endpoint``, else ``install.domain`` (scheme from ``install.uri``,
    https by default). Neither named → :class:`TokenRejected`: REST calls carry tokens,
    so their address must not come from the POST or the event.
    """
    install_info = info.get("install") or {}
    endpoint = str(install_info.get("client_endpoint") or "").strip()
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme in ("http", "https") and parts.netloc:
            return endpoint if endpoint.endswith("/") else endpoint + "/"
    domain = str(install_info.get("domain") or "").strip().lower()
    if domain and valid_host(domain):
        scheme = urlsplit(str(install_info.get("uri") or "")).scheme
        return f"{scheme if scheme in ('http', 'https') else 'https'}://{domain}/rest/"
    raise TokenRejected(N_("the Bitrix24 authorization server did not name the portal's "
                           "address; open the app again from your Bitrix24"), 403)


def verify_iframe_token(auth: IframeAuth) -> tuple[IframeAuth, dict[str, Any]]:
    """Verify an iframe POST's AUTH_ID (§7.4 steps 1–2): the POST as verified, and ``app.info``.

    A POST that names its SERVER_ENDPOINT is asked there. The short form names none
    (§2.3), and West and East portals have auth servers of their own, so it is asked at
    the portal's stored auth server first, then at each trusted one in
    ``B24_AUTH_SERVERS`` order, until one knows the token; the returned POST names that
    server. An East portal is then neither refused nor moved to the West default on a
    reinstall. All refusing: the first refusal, or 502 when a server did not answer.
    """
    if auth.server_named:
        return auth, verify_token(auth.server_endpoint, auth.access_token, auth.member_id,
                                  auth.domain)
    failures: list[InstallError] = []
    for server in _auth_server_candidates(auth.member_id):
        try:
            info = verify_token(server, auth.access_token, auth.member_id, auth.domain)
        except InstallError as exc:
            failures.append(exc)
            continue
        return replace(auth, server_endpoint=server), info
    unanswered = [exc for exc in failures if exc.status >= 500]
    raise (unanswered or failures)[0]


def _auth_server_candidates(member_id: str) -> list[str]:
    """Auth servers to ask about a POST that names none: the portal's own, then the trusted."""
    trusted = trusted_auth_servers()
    portal = Portal.by_member_id(member_id)
    stored = portal.server_endpoint if portal is not None else None
    candidates = [stored] if stored and urlsplit(stored).netloc.lower() in trusted else []
    candidates.append(default_auth_server())
    candidates += ["{}://{}/rest/".format(*_as_url(entry)) for entry in _auth_server_entries()]
    return list(dict.fromkeys(candidates))


class HasApplicationToken(Protocol):
    """What holds a portal's application_token: the Portal row, or intake's cached copy."""

    @property
    def application_token(self) -> str | None: ...


def application_token_matches(portal: HasApplicationToken, token: str | None) -> bool:
    """Constant-time comparison with the portal's stored application_token."""
    stored = portal.application_token or ""
    return bool(stored) and hmac.compare_digest(stored.encode(), (token or "").encode())


def user_is_admin(client_endpoint: str, access_token: str, portal: Portal | None = None) -> bool:
    """``user.admin`` with the viewing user's own token: may they manage the app?

    Raises :class:`PortalBusy` (limits), :class:`PortalHeld` (the portal's state; ``portal``
    is moved to it) or :class:`InstallError` 502 (no answer) rather than say "no" for the
    portal. Uses the process's shared REST client (one connection pool), not a new one per open.
    """
    try:
        body = direct.call_with_token(client_endpoint, access_token, "user.admin", {})
    except ApiError as exc:
        _raise_unless_about_the_user(exc, portal)
        log.warning("user.admin refused at %s: %s", client_endpoint, exc)
        return False
    except BitrixError as exc:
        raise InstallError(N_("the portal did not answer (%(error)s); try again", error=str(exc)),
                           502) from exc
    return body.get("result") is True


# What user.admin may answer that says nothing about the user.
PORTAL_STATES = (errors.PaymentRequired, errors.NotInstalled, errors.PortalDeleted,
                 errors.OverloadLimit)  # OVERLOAD_LIMIT: support's block, not a busy minute
LIMITS = (errors.QueryLimitExceeded, errors.OperationTimeLimit)


def _raise_unless_about_the_user(exc: ApiError, portal: Portal | None) -> None:
    """Raise for a refusal about the portal (its state, a limit, an outage); return otherwise."""
    if isinstance(exc, PORTAL_STATES):
        raise _held(exc, portal) from exc
    if isinstance(exc, LIMITS) or exc.http_status == 429:
        # QUERY_LIMIT_EXCEEDED came as 429 before Dec 2024, OPERATION_TIME_LIMIT still does.
        raise PortalBusy(N_("the portal is busy (%(code)s); try again in a minute",
                            code=exc.code)) from exc
    if (exc.http_status or 0) >= 500:
        raise InstallError(N_("the portal did not answer (%(error)s); try again",
                              error=exc.code), 502) from exc


def _held(exc: ApiError, portal: Portal | None) -> PortalHeld:
    """An error naming the portal's state, the portal (when known) moved to it first.

    The status machine's move (what ``status.apply_error`` does for any call): the
    settings page and the CLI then show the same reason, and the portal's calls are held.
    """
    target = portal_status.transition_for(exc)
    assert target is not None  # each of PORTAL_STATES has a transition
    reason = (portal_status.reason_for(target, f"{exc.code} {exc.description}".strip())
              or N_(exc.code))
    if portal is not None:
        portal_status.record(portal, target, reason)
    return PortalHeld(reason, target.value, portal)
