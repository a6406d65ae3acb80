"""telephony.externalLine.*: the sandbox answers as protocol §8.2 says the platform does."""

from __future__ import annotations

from .conftest import call

REG = {"USER_ID": 1, "PHONE_NUMBER": "+4930123456", "TYPE": 2,
       "CALL_START_DATE": "2026-03-07T10:20:30+03:00"}


def _error(response) -> str:
    return response.json().get("error_description", "")


def _lines(http, portal) -> list[dict[str, str]]:
    return call(http, portal, "telephony.externalLine.get").json()["result"]


def test_add_trims_the_number_and_reads_only_a_literal_y(portal, http):
    call(http, portal, "telephony.externalLine.add", NUMBER="  +4930555  ", NAME="Main",
         CRM_AUTO_CREATE="1")
    call(http, portal, "telephony.externalLine.add", NUMBER="8" * 60, CRM_AUTO_CREATE="true")
    call(http, portal, "telephony.externalLine.add", NUMBER="9", CRM_AUTO_CREATE="Y")
    call(http, portal, "telephony.externalLine.add", NUMBER="10")
    assert _lines(http, portal) == [
        {"NUMBER": "+4930555", "NAME": "Main", "CRM_AUTO_CREATE": "N"},
        {"NUMBER": "8" * 50, "NAME": "", "CRM_AUTO_CREATE": "N"},
        {"NUMBER": "9", "NAME": "", "CRM_AUTO_CREATE": "Y"},
        {"NUMBER": "10", "NAME": "", "CRM_AUTO_CREATE": "Y"}]
    assert _error(call(http, portal, "telephony.externalLine.add", NUMBER=" ")) == (
        "NUMBER should not be empty")
    assert _error(call(http, portal, "telephony.externalLine.add", NUMBER="+4930555 ")) == (
        "Line already exists")


def test_update_and_delete_of_an_unknown_line_say_could_not_find(portal, http):
    assert _error(call(http, portal, "telephony.externalLine.update", NUMBER="77",
                       NAME="x")) == "Could not find line with number 77"
    assert _error(call(http, portal, "telephony.externalLine.delete", NUMBER="77")) == (
        "Could not find line with number 77")
    call(http, portal, "telephony.externalLine.add", NUMBER="77", NAME="a")
    assert _error(call(http, portal, "telephony.externalLine.update", NUMBER="77")) == (
        "There are no fields to update")
    assert call(http, portal, "telephony.externalLine.update", NUMBER=" 77", NAME="b",
                CRM_AUTO_CREATE="N").json()["result"] == {"ID": "1"}
    assert _lines(http, portal) == [{"NUMBER": "77", "NAME": "b", "CRM_AUTO_CREATE": "N"}]
    assert call(http, portal, "telephony.externalLine.delete", NUMBER="77").json()[
        "result"] == []
    assert _lines(http, portal) == []


def test_register_auto_creates_a_nameless_line_that_get_lists(portal, http):
    reg = call(http, portal, "telephony.externalCall.register", LINE_NUMBER=" 555 ", **REG)
    assert reg.json()["result"]["CALL_ID"]
    assert _lines(http, portal) == [{"NUMBER": "555", "NAME": "", "CRM_AUTO_CREATE": "Y"}]
