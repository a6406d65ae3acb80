"""Web endpoints of the install: ``POST /install`` and the OAuth code flow (§1.2, §2.3)."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from urllib.parse import urlencode, urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    make_response,
    redirect,
    render_template_string,
    request,
)
from flask_babel import gettext as _
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from werkzeug.wrappers import Response as BaseResponse

from app.extensions import db
from app.framing import frameable, framed_by, valid_host
from app.i18n import shown
from app.installation import diagnosis, install
from app.installation.chains import connect_with_code
from app.installation.plan import EVENTS, PLACEMENTS
from app.installation.verify import InstallError, default_auth_server, parse_iframe, setting
from app.tenants.models import Portal

log = logging.getLogger(__name__)
bp = Blueprint("installation", __name__)

STATE_SALT = "b24relay-oauth-state"
STATE_TTL_SECONDS = 600
STATE_COOKIE = "b24relay_oauth"

PAGE = """<!doctype html>
<html lang="{{ current_locale }}"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body{font:15px/1.5 system-ui,sans-serif;margin:2rem;color:#333}h1{font-size:1.3rem}</style>
{% if sdk_url %}<script src="{{ sdk_url }}"></script>{% endif %}
</head><body><main>
<h1>{{ title }}</h1>
{% for line in lines %}<p>{{ line }}</p>{% endfor %}
</main>
{% if finish %}<script>
BX24.init(function () { BX24.installFinish(); });
</script>{% endif %}
</body></html>
"""


def page(title: str, *lines: str, status: int = 200, finish: bool = False,
         sdk_url: str | None = None) -> Response:
    """A small HTML page (installer answer, errors, OAuth result), in the request's language:
    callers translate their words, and a refusal's ``Words`` are translated here."""
    body = render_template_string(PAGE, title=title, lines=[shown(line) for line in lines],
                                  finish=finish, sdk_url=sdk_url)
    return make_response(body, status)


@bp.after_request
def _unframed_unless_said(response: Response) -> Response:
    """Pages not framed on purpose (the OAuth flow runs top-level) may not be framed at all."""
    if "Content-Security-Policy" not in response.headers:
        framed_by(response, None)
    return response


def sdk_url() -> str:
    """Where the BX24 JS library is loaded from (``B24_JS_SDK_URL``)."""
    return str(current_app.config["B24_JS_SDK_URL"])


# ---------------------------------------------------------------- install


@bp.post("/install")
@frameable
def install_view() -> Response:
    """The installer iframe POST: verify, store, set up, then ``BX24.installFinish()``."""
    try:
        auth = parse_iframe(request.args, request.form)
        portal, report = install.install(auth)
    except InstallError as exc:
        db.session.commit()  # keeps what install() recorded about a failed setup (its reason)
        log.warning("install refused: %s", exc.message)  # English: Words are a str
        return page(_("b24relay could not be installed"), exc.message,
                    _("Nothing was saved. Open the installer again from your Bitrix24 portal."),
                    status=exc.status)
    db.session.commit()  # the install is one unit of work, committed before the page answers
    diagnosis.request_check(portal, "install")  # a worker's, once installFinish had its time
    lines = [_("Portal %(domain)s is connected (%(plan)s plan).", domain=portal.domain,
               plan=report.plan),
             _("%(events)d event handlers and %(widgets)d widgets are in place; %(users)d "
               "users read.", events=len(EVENTS), widgets=len(PLACEMENTS), users=report.users)]
    return page(_("b24relay is installed"), *lines, finish=True, sdk_url=sdk_url())


# ---------------------------------------------------------------- OAuth code flow


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.config["SECRET_KEY"], salt=STATE_SALT)


def _domain_digest(domain: str) -> str:
    """A keyed digest of a portal's domain: the state binds it without naming it."""
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, f"{STATE_SALT}:{domain.lower()}".encode(), hashlib.sha256).hexdigest()


def _start_domain() -> str:
    """The domain to send the user to: ``domain`` as asked, or a known ``member_id``'s."""
    member_id = (request.args.get("member_id") or "").strip()
    if member_id:
        portal = Portal.by_member_id(member_id)
        if portal is None:
            abort(page(_("Unknown portal"), _("Install b24relay from the Bitrix24 Market first."),
                       status=404))
        return portal.domain
    domain = (request.args.get("domain") or "").strip().lower()
    if not domain:
        abort(page(_("Which portal?"), _("Pass member_id or domain."), status=400))
    if not valid_host(domain):
        abort(page(_("Which portal?"), _("domain is not a host name."), status=400))
    return domain


@bp.get("/oauth/start")
def oauth_start() -> BaseResponse:  # flask.redirect is typed as werkzeug's Response
    """Send the user to the portal's authorize page with a signed, short-lived, opaque state.

    A ``domain`` is not looked up: a customer's and a stranger's domain get the same
    redirect (the portal itself says whether the app is installed there), so this page
    lists no customers. The state names no member_id; the callback finds the portal.
    """
    domain = _start_domain()
    nonce = secrets.token_urlsafe(16)
    state = _serializer().dumps({"n": nonce, "d": _domain_digest(domain)})
    query = urlencode({"client_id": setting("B24_CLIENT_ID") or "", "state": state})
    # One scheme for every domain (the trusted auth server's): a per-portal scheme would
    # tell a customer (its stored address) from a stranger.
    scheme = urlsplit(default_auth_server()).scheme
    response = redirect(f"{scheme}://{domain}/oauth/authorize/?{query}")
    response.set_cookie(STATE_COOKIE, nonce, max_age=STATE_TTL_SECONDS, httponly=True,
                        samesite="Lax", secure=request.is_secure)
    return response


def _state_portal() -> Portal | None:
    """The portal the callback names, if the signed state was issued for it in this browser.

    Aborts on a bad, stale or foreign state. The portal comes from the callback's
    ``member_id`` (else its ``domain``), and must have the domain the state was issued
    for; the code's own member_id is checked against it when the code is exchanged.
    """
    try:
        state = _serializer().loads(request.args.get("state", ""), max_age=STATE_TTL_SECONDS)
    except SignatureExpired:
        abort(page(_("The sign-in link expired"), _("Start again from the app."), status=400))
    except BadSignature:
        abort(page(_("Invalid sign-in state"), _("Start again from the app."), status=400))
    nonce = request.cookies.get(STATE_COOKIE, "")
    if not nonce or not hmac.compare_digest(nonce, str(state.get("n", ""))):
        abort(page(_("Invalid sign-in state"), _("This browser did not start the sign-in."),
                   status=400))
    member_id = (request.args.get("member_id") or "").strip()
    domain = (request.args.get("domain") or "").strip().lower()
    if member_id:
        portal = Portal.by_member_id(member_id)
    else:
        portal = db.session.scalars(select(Portal).where(Portal.domain == domain)).first()
    if portal is not None and not hmac.compare_digest(_domain_digest(portal.domain),
                                                      str(state.get("d", ""))):
        abort(page(_("Invalid sign-in state"), _("The portal answered for another portal."),
                   status=400))
    return portal


@bp.get("/oauth/callback")
def oauth_callback() -> Response:
    """Exchange the code (it lives 30 s) and keep the new chain for the portal."""
    if request.args.get("error"):
        return page(_("Bitrix24 refused the sign-in"), request.args.get("error", ""), status=400)
    if not request.args.get("code"):
        return page(_("Missing code"), _("The portal did not send an authorization code."),
                    status=400)
    portal = _state_portal()
    if portal is None:
        return page(_("Unknown portal"), _("Install b24relay from the Bitrix24 Market first."),
                    status=404)
    try:
        connect_with_code(portal, request.args["code"])
    except InstallError as exc:
        return page(_("b24relay could not connect"), exc.message, status=exc.status)
    response = page(_("b24relay is connected"),
                    _("Portal %(domain)s is linked again.", domain=portal.domain))
    response.delete_cookie(STATE_COOKIE)
    return response
