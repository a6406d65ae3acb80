"""Russian and English: the portal's ``LANG`` picks the language of every page and finding.

Every string a person reads is written in English in the code and the templates, wrapped
in ``_()`` (or ``lazy_gettext`` at import time), and translated in one catalogue per
language under ``app/translations/`` (Flask-Babel; ``make translations`` re-extracts and
compiles it). Bitrix24 passes the portal user's language as ``LANG`` in the iframe URL;
a view that has no such query (a form saved with a signed token, a JSON poll) names the
portal's stored language with :func:`use_language`.

A message that operators read too (a refusal that is logged, a status reason that is
stored) is written ``N_("English %(value)s", value=...)``: a :class:`Words`, which is its
English text as a ``str`` (so logs, the database and the terminal get English) and the
page's language where a page shows it (a template, or :func:`shown`).
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, g, has_request_context, request
from flask_babel import Babel, get_locale, gettext
from markupsafe import escape

LANGUAGES = ("en", "ru")
DEFAULT = "en"
# Bitrix24's LANG codes whose users read Russian better than English (the CIS portals).
READS_RUSSIAN = frozenset({"ru", "ua", "by", "kz"})
TRANSLATIONS = Path(__file__).resolve().parent / "translations"


def language_of(code: str | None) -> str:
    """One of LANGUAGES for a Bitrix24 LANG code (``ru``, ``en``, ``de``, ``ua``...)."""
    code = (code or "").strip().lower()[:2]
    if code in LANGUAGES:
        return code
    return "ru" if code in READS_RUSSIAN else DEFAULT


def use_language(code: str | None) -> None:
    """This request speaks ``code`` (a portal's stored language) unless its URL names one."""
    g.b24_lang = language_of(code)


def select_locale() -> str:
    """Flask-Babel's locale selector: the URL's LANG, else what the view chose, else English."""
    if not has_request_context():
        return DEFAULT
    if request.args.get("LANG"):
        return language_of(request.args["LANG"])
    return str(g.get("b24_lang") or DEFAULT)


def init_app(app: Flask) -> None:
    """Bind Flask-Babel with the app's catalogue and the portal's language."""
    app.config.setdefault("BABEL_TRANSLATION_DIRECTORIES", str(TRANSLATIONS))
    app.config.setdefault("BABEL_DEFAULT_LOCALE", DEFAULT)
    Babel(app, locale_selector=select_locale)
    app.context_processor(lambda: {"current_locale": str(get_locale() or DEFAULT)})


class Words(str):
    """A message a person reads that operators read too: English as a ``str`` (logs, the
    database, the terminal), the page's language in a template (``__html__``) or through
    :func:`shown`.

    Made by :func:`N_` from the English msgid and its values; a value may itself be
    ``Words`` (a status reason inside a refusal), translated along with it.
    """

    msgid: str
    values: dict[str, object]

    def __new__(cls, msgid: str, values: dict[str, object]) -> Words:
        text = super().__new__(cls, msgid % values if values else msgid)
        text.msgid, text.values = msgid, values
        return text

    def __html__(self) -> str:
        return str(escape(shown(self)))


def N_(msgid: str, **values: object) -> Words:  # noqa: N802 (pybabel's default keyword)
    """English now, translated where shown: for exceptions and stored reasons (``Words``)."""
    return Words(msgid, values)


def shown(text: object) -> str:
    """``text`` in this request's language: ``Words`` (and their values) translated; any
    other text (a lazy string, Bitrix24's own words) as it renders."""
    if isinstance(text, Words):
        values = {key: shown(value) if isinstance(value, Words) else value
                  for key, value in text.values.items()}
        return gettext(text.msgid, **values) if values else gettext(text.msgid)
    return str(text)
