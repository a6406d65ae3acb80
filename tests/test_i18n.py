"""Russian and English: every string a person reads is in the catalogue, translated, and chosen
by the portal's LANG."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from babel.messages.frontend import CommandLineInterface
from babel.messages.mofile import read_mo
from babel.messages.pofile import read_po

from app import i18n

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = ROOT / "app" / "translations" / "ru" / "LC_MESSAGES"


def _extracted(tmp_path: Path) -> set[str]:
    """The strings asked to be translated, extracted as `make translations` does."""
    pot = tmp_path / "messages.pot"
    CommandLineInterface().run(["pybabel", "-q", "extract", "-F", str(ROOT / "babel.cfg"),
                                "-k", "lazy_gettext", "-k", "_l", "-o", str(pot), str(ROOT)])
    with pot.open("rb") as f:
        return {str(m.id if isinstance(m.id, str) else m.id[0]) for m in read_po(f) if m.id}


def _po() -> dict[str, str]:
    with (CATALOGUE / "messages.po").open("rb") as f:
        return {str(m.id if isinstance(m.id, str) else m.id[0]):
                str(m.string if isinstance(m.string, str) else m.string[0])
                for m in read_po(f) if m.id}


def test_every_string_shown_has_a_russian_translation(tmp_path):
    translated = {k for k, v in _po().items() if v}
    missing = sorted(_extracted(tmp_path) - translated)
    assert not missing, f"not translated (run `make translations`, fill the .po): {missing[:20]}"


def test_the_compiled_catalogue_is_the_one_written():
    with (CATALOGUE / "messages.mo").open("rb") as f:
        compiled = {str(m.id if isinstance(m.id, str) else m.id[0]):
                    str(m.string if isinstance(m.string, str) else m.string[0])
                    for m in read_mo(io.BytesIO(f.read())) if m.id}
    written = {k: v for k, v in _po().items() if v}
    assert compiled == written, "messages.mo is stale: run `make translations`"


@pytest.mark.parametrize(("code", "language"), [("ru", "ru"), ("en", "en"), ("ua", "ru"),
                                                ("de", "en"), ("", "en"), ("RU", "ru")])
def test_the_portals_lang_picks_the_language(code, language):
    assert i18n.language_of(code) == language


@pytest.mark.parametrize(("lang", "heading"), [("ru", "b24relay не может открыть эту страницу"),
                                               ("en", "b24relay cannot open this page"),
                                               ("de", "b24relay cannot open this page")])
def test_a_page_speaks_the_portals_language(client, lang, heading):
    resp = client.post(f"/placements/settings?DOMAIN=nowhere.example&LANG={lang}", data={})
    body = resp.get_data(as_text=True)
    assert heading in body
    assert f'<html lang="{i18n.language_of(lang)}">' in body


def test_each_translation_keeps_its_placeholders():
    placeholder = re.compile(r"%\(\w+\)s")
    wrong = {k: v for k, v in _po().items()
             if v and sorted(placeholder.findall(k)) != sorted(placeholder.findall(v))}
    assert not wrong, wrong


def test_the_diagnosis_speaks_russian(app):
    from flask_babel import force_locale

    from app.installation import diagnosis_text as text

    with app.app_context(), force_locale("ru"):
        summary, advice = text.render("scopes", "scopes.missing",
                                      {"missing_scopes": ["crm"], "granted": ["telephony"],
                                       "source": "scope"}, {"member_id": "m1"})
    assert summary.startswith("Не выданы нужные приложению права: crm (поиск клиентов")
    assert "метод scope портала" in summary
    assert advice.startswith("Их должен выдать администратор")
