"""A Russian reader gets every word of the app in Russian, from the status line to a refusal,
while logs, the database and the terminal keep English (issue 24, point 8).

The portal's users read it in a language of their own: the sandbox sends each user's LANG
in the iframe's URL, as Bitrix24 does, so nothing here adds ``LANG=ru`` by hand except the
forged requests, which play an attacker who can write any URL.
"""

from __future__ import annotations

import html
import logging
import re
import time
from urllib.parse import parse_qsl, urlsplit

from flask import render_template_string
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from app.i18n import shown
from app.tenants.models import PortalStatus
from app.tenants.status import INTERRUPTED, reason_for, shown_reason
from placements import page_session
from tests.i18n_pages.conftest import ADA, BORIS, VERA, open_as
from tests.install.conftest import portal_row

CONNECTED_RU = "Подключено: звонки и события проходят."
UNPAID_EN = "The app's subscription on this portal has ended."
UNPAID_RU = "Подписка на приложение на этом портале закончилась."


def _text(body: str) -> str:
    """A page's text as a reader sees it (entities decoded)."""
    return html.unescape(body)


def _session(body: str) -> str:
    match = re.search(r'[?&]s=([^&"]+)', body)
    assert match, body
    return html.unescape(match.group(1))


class _Then(TimestampSigner):
    """A signer whose clock is the session's TTL + 1 s behind: a session that old."""

    def get_timestamp(self) -> int:
        return int(time.time()) - page_session.TTL_SECONDS - 1


def test_each_user_reads_the_page_in_the_language_of_his_portal_profile(sandbox, portal):
    users = {u["id"]: u["lang"] for u in sandbox.portal(portal)["users"]}
    assert users == {ADA: "en", BORIS: "ru", VERA: "ru"}

    russian = open_as(sandbox, portal, BORIS)
    assert russian["status"] == 200, russian["body"]
    assert dict(parse_qsl(urlsplit(russian["url"]).query))["LANG"] == "ru"  # the portal's URL
    assert '<html lang="ru"' in russian["body"]
    assert CONNECTED_RU in _text(russian["body"])  # the status line's advice

    english = open_as(sandbox, portal, ADA)
    assert dict(parse_qsl(urlsplit(english["url"]).query))["LANG"] == "en"
    assert "Connected: calls and events flow." in english["body"]
    assert CONNECTED_RU not in _text(english["body"])


def test_an_unpaid_portals_reason_is_shown_in_russian_and_kept_in_english(sandbox, portal):
    sandbox.set_subscription(portal, active=False)  # Bitrix24: PAYMENT_REQUIRED from REST

    page = open_as(sandbox, portal, BORIS)
    assert page["status"] == 200 and 'data-status="payment_required"' in page["body"]
    text = _text(page["body"])
    assert UNPAID_RU in text and "Битрикс24 Маркете" in text
    assert "(Битрикс24: PAYMENT_REQUIRED" in text  # Bitrix24's own words kept as they came
    assert UNPAID_EN not in text
    row = portal_row(portal)
    assert row.status_reason.startswith(UNPAID_EN)  # stored for operators: English
    assert "PAYMENT_REQUIRED" in row.status_reason

    english = _text(open_as(sandbox, portal, ADA)["body"])
    assert UNPAID_EN in english and UNPAID_RU not in english


def test_a_forged_or_expired_page_session_is_refused_in_the_users_language(sandbox, portal,
                                                                            live_app):
    russian = open_as(sandbox, portal, BORIS)["body"]
    forged = _session(russian)[:-4] + "AAAA"
    row = portal_row(portal)
    expired = URLSafeTimedSerializer(live_app.app.config["SECRET_KEY"], salt=page_session.SALT,
                                     signer=_Then).dumps(
        {"p": row.id, "m": portal, "u": BORIS, "a": True, "l": "ru", "t": 0})
    with live_app.http() as http:
        resp = http.get("/placements/app/settings", params={"s": forged})
        assert resp.status_code == 401
        assert "Сеанс страницы недействителен" in _text(resp.text)
        assert "not valid" not in resp.text and '<html lang="ru"' in resp.text

        polled = http.get("/placements/app/diagnosis/last", params={"s": forged})
        assert polled.status_code == 401
        assert polled.json()["error"].startswith("Сеанс страницы недействителен")

        resp = http.get("/placements/app/settings", params={"s": expired})
        assert resp.status_code == 401 and "Срок действия страницы истёк" in _text(resp.text)

        # An English reader's forged session: the same refusal, in English.
        english = _session(open_as(sandbox, portal, ADA)["body"])[:-4] + "AAAA"
        resp = http.get("/placements/app/settings", params={"s": english})
        assert resp.status_code == 401
        assert "The page&#39;s session is not valid" in resp.text


def test_an_employee_and_a_spent_form_are_refused_in_russian(sandbox, portal, live_app):
    employee = _session(open_as(sandbox, portal, VERA)["body"])
    with live_app.http() as http:
        resp = http.post("/placements/app/settings/api-key", params={"s": employee},
                         data={"form_token": "x"})
    assert resp.status_code == 403
    assert "Это может сделать только администратор портала." in _text(resp.text)

    page = open_as(sandbox, portal, BORIS)["body"]
    token = re.search(r'id="settings-form".*?name="form_token" value="([^"]+)"', page, re.S)
    assert token, page
    form = {"s": _session(page), "form_token": token.group(1), "lines": ""}
    with live_app.http() as http:
        assert http.post("/placements/settings", data=form).status_code == 200
        again = http.post("/placements/settings", data=form)  # the token is single-use
        assert again.status_code == 403
        assert "Эта форма уже была отправлена" in _text(again.text)
        forged = http.post("/placements/settings", data={**form, "form_token": "forged"})
        assert forged.status_code == 403 and "Форма была изменена" in _text(forged.text)


def test_a_forged_iframe_post_is_refused_in_the_urls_language(sandbox, portal, live_app):
    opened = open_as(sandbox, portal, BORIS)
    url = urlsplit(opened["url"])
    form = {**dict(parse_qsl(opened["form"])), "AUTH_ID": "forged-access-token"}
    with live_app.http() as http:
        resp = http.post(f"{url.path}?{url.query}", data=form)
    assert resp.status_code == 401, resp.text
    text = _text(resp.text)
    assert "портал отклонил токен доступа" in text and '<html lang="ru"' in resp.text
    assert "the portal rejected the access token" not in text


def test_the_installer_speaks_russian_and_logs_english(sandbox, make_portal, live_app, caplog):
    portal = make_portal(users=[{"id": 5, "name": "Борис", "admin": True, "extension": "105",
                                 "lang": "ru"}])
    installed = sandbox.install_app(portal["member_id"], live_app.url, user_id=5)
    assert installed["status"] == 200, installed["body"]
    text = _text(installed["body"])
    assert "b24relay установлен" in text
    assert f"Портал {portal['domain']} подключён" in text and "is connected" not in text

    # A forged installer POST that names LANG=ru: refused in Russian, logged in English.
    query = {"DOMAIN": portal["domain"], "PROTOCOL": "0", "LANG": "ru"}
    form = {**dict(parse_qsl(installed["form"])), "AUTH_ID": "forged-access-token"}
    with caplog.at_level(logging.WARNING, logger="app.installation.views"), \
            live_app.http() as http:
        refused = http.post("/install", params=query, data=form)
    assert refused.status_code == 401
    text = _text(refused.text)
    assert "Не удалось установить b24relay" in text and "портал отклонил токен доступа" in text
    logged = [r.getMessage() for r in caplog.records if r.name == "app.installation.views"]
    assert any(m.startswith("install refused: the portal rejected the access token")
               for m in logged), logged  # operators read English


def test_the_terminal_speaks_english_for_a_russian_portal(app, sandbox, make_portal, live_app):
    portal = make_portal(users=[{"id": 5, "name": "Борис", "admin": True, "extension": "105",
                                 "lang": "ru"}])
    assert sandbox.install_app(portal["member_id"], live_app.url, user_id=5)["status"] == 200
    sandbox.finish_install(portal["member_id"])
    assert portal_row(portal["member_id"]).language == "ru"
    runner = app.test_cli_runner()
    refused = runner.invoke(args=["portals", "settings", portal["member_id"], "lines=bad!!"])
    assert refused.exit_code != 0
    assert "is not valid" in refused.output and "nothing was changed" in refused.output
    assert re.search("[а-яА-Я]", refused.output) is None, refused.output

    assert runner.invoke(args=["portals", "disable", portal["member_id"]]).exit_code == 0
    shown_ = runner.invoke(args=["portals", "show", portal["member_id"]])
    assert "Switched off by an operator" in shown_.output
    assert re.search("[а-яА-Я]", shown_.output) is None, shown_.output


def test_our_words_in_a_stored_reason_are_translated_and_bitrix24s_escaped(app):
    detail = 'PAYMENT_REQUIRED <img src=x onerror="alert(1)">'
    reason = reason_for(PortalStatus.PAYMENT_REQUIRED, detail)
    assert reason is not None
    stored = str(reason)  # what the database keeps
    assert stored.startswith(UNPAID_EN) and type(stored) is str
    with app.app_context(), app.test_request_context("/?LANG=ru"):
        shown_ru = shown_reason(PortalStatus.PAYMENT_REQUIRED, stored)
        assert shown_ru is not None and shown_ru.startswith(UNPAID_RU) and detail in shown_ru
        page = render_template_string("<p>{{ m }}</p>", m=reason)
        assert UNPAID_RU in html.unescape(page) and "<img" not in page  # escaped
        # The chain lost after an interrupted refresh (app/tenants/tokens.py writes it so).
        lost = str(INTERRUPTED) + str(reason_for(PortalStatus.AUTH_FAILED, "invalid_grant x"))
        assert shown_reason(PortalStatus.AUTH_FAILED, lost) == (
            "Обновление токена прервалось (процесс остановился, когда запрос уже ушёл), а "
            "Битрикс24 уже выдал новые токены, поэтому сохранённый токен обновления "
            "израсходован. Битрикс24 больше не принимает токен обновления приложения. Один раз "
            "откройте приложение в Битрикс24 от имени администратора, чтобы снова его "
            "подключить. Если это не поможет, переустановите приложение. (Битрикс24: "
            "invalid_grant x)")
        # Free text from somewhere else is shown as it is.
        assert shown_reason(PortalStatus.PAYMENT_REQUIRED, "Setup did not finish: x") == \
            "Setup did not finish: x"
    with app.app_context(), app.test_request_context("/?LANG=en"):
        assert shown(reason) == stored
