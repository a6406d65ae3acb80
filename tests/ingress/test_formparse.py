"""Bitrix24's PHP-style form bodies parse into the nested data they encode (protocol §3.6)."""

from __future__ import annotations

import string
import time
from urllib.parse import parse_qsl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.ingress.formparse import MalformedBody, decode_pairs, encode_form, parse_form

# Keys as Bitrix24 uses them: names, never brackets; a dict key never looks like an index.
names = st.text(alphabet=string.ascii_letters + "_-.", min_size=1, max_size=8).filter(
    lambda s: not s.isdigit())
# Any text but NUL, which no stored field may hold (refused: see the NUL test below).
scalars = st.text(alphabet=st.characters(blacklist_categories=("Cs",),
                                         blacklist_characters="\x00"), max_size=20)
nested = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, min_size=1, max_size=4),
                            st.dictionaries(names, inner, min_size=1, max_size=4)),
    max_leaves=25)
documents = st.dictionaries(names, nested, min_size=1, max_size=6)


@given(documents)
def test_any_nested_document_survives_encoding_and_parsing(document):
    assert parse_form(encode_form(document).encode()) == document


# Raw form text, heavy on what the decoder has to get right: separators, escapes, pluses.
form_text = st.lists(st.sampled_from(list("&=%+[]aZ09fF_ é") + ["%2", "%41", "%C3%A9", "%ff",
                                                               "%E2%82"]),
                     max_size=30).map("".join)


@given(form_text)
def test_the_pair_decoder_agrees_with_the_standard_library(text):
    try:
        expected = parse_qsl(text, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError):  # UnicodeDecodeError is a ValueError, say so
        with pytest.raises((MalformedBody, UnicodeDecodeError)):
            decode_pairs(text)
    else:
        assert decode_pairs(text) == expected


@given(st.lists(scalars, min_size=1, max_size=6))
def test_empty_brackets_append_in_order(values):
    body = "&".join(f"ids%5B%5D={v}" for v in
                    (encode_form({"x": v})[2:] for v in values))
    assert parse_form(body.encode()) == {"ids": values}


def test_the_documented_deal_update_body():
    body = (b"event=ONCRMDEALUPDATE&event_handler_id=201&data%5BFIELDS%5D%5BID%5D=759"
            b"&ts=1736405807&auth%5Bmember_id%5D=a223c6b3710f85df22e9377d6c4f7553"
            b"&auth%5Bscope%5D=crm%2Ctelephony&auth%5Bapplication_token%5D=51856fef")
    assert parse_form(body) == {
        "event": "ONCRMDEALUPDATE", "event_handler_id": "201", "data": {"FIELDS": {"ID": "759"}},
        "ts": "1736405807",
        "auth": {"member_id": "a223c6b3710f85df22e9377d6c4f7553", "scope": "crm,telephony",
                 "application_token": "51856fef"}}


def test_indexes_out_of_order_still_make_a_list_and_gaps_keep_a_dict():
    assert parse_form(b"a[1]=y&a[0]=x") == {"a": ["x", "y"]}
    assert parse_form(b"a[0]=x&a[2]=z") == {"a": {"0": "x", "2": "z"}}


def test_the_top_level_stays_a_form_of_names_even_when_they_are_digits():
    assert parse_form(b"0=a") == {"0": "a"}
    assert parse_form(b"1=y&0=x&0x[0]=z") == {"1": "y", "0": "x", "0x": ["z"]}


@pytest.mark.parametrize("body", [b"a=%00", b"a%00=1", b"a[%00]=1", b"a=x\x00"])
def test_a_nul_character_anywhere_is_malformed(body):
    with pytest.raises(MalformedBody, match="NUL"):
        parse_form(body)
    assert parse_form(b"a=%2500") == {"a": "%00"}


def test_empty_values_are_kept_as_empty_strings():
    assert parse_form(b"data[EXTENSION]=&event=X") == {"data": {"EXTENSION": ""}, "event": "X"}


@pytest.mark.parametrize("body", [
    b"a[b=1",            # unclosed bracket
    b"a]=1",             # bracket without a name
    b"[x]=1",            # no top-level name
    b"a[b]c=1",          # text after the brackets
    b"a=1&a[b]=2",       # a scalar and a dict under one name
    b"a[b]=1&a=2",
    b"a=1&a=2",          # a field given twice
    b"\xff\xfe=1",       # not UTF-8
    b"just-text",        # not key=value
])
def test_malformed_bodies_are_refused(body):
    with pytest.raises(MalformedBody):
        parse_form(body)


def test_nesting_and_field_count_are_bounded():
    with pytest.raises(MalformedBody):
        parse_form(b"a" + b"[x]" * 40 + b"=1")
    with pytest.raises(MalformedBody):
        parse_form("&".join(f"f{i}=1" for i in range(6000)).encode())


# Bodies an attacker shapes to make parsing expensive before the token is checked.
HOSTILE_SHAPES = {
    "repeated a[]": lambda n: "&".join(["a[]=1"] * n),
    "distinct names": lambda n: "&".join(f"k{i}=1" for i in range(n)),
    "deep keys": lambda n: "&".join("a" + "[x]" * 14 + f"[{i}]=1" for i in range(n)),
    "huge indexes": lambda n: "&".join(f"a[{99999999 - i}]=1" for i in range(n)),
    "mixed a[] and indexes": lambda n: "&".join(f"a[{i}]=1&a[]=2" for i in range(n // 2)),
    "one long key": lambda n: "a" + "[x]" * n + "=1",
}


def _parse_cpu_seconds(body: bytes, repeats: int = 3) -> float:
    """Best-of CPU time of one parse (refusals count: they must be cheap too)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        try:
            parse_form(body, max_fields=10**6)
        except MalformedBody:
            pass
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_parsing_a_hostile_body_costs_time_linear_in_its_size(shape):
    # Past the parser's caches (4096 names), so both sizes take the same path per field.
    n = 5000
    small, large = (_parse_cpu_seconds(HOSTILE_SHAPES[shape](k).encode()) for k in (n, 4 * n))
    # Linear is a ratio of 4, quadratic 16; the margin absorbs a busy machine.
    assert large < 8 * max(small, 0.0005), (shape, small, large)


def test_the_field_cap_is_checked_before_any_field_is_parsed():
    body = "&".join(["a[]=1"] * 1000).encode()
    assert len(parse_form(body)["a"]) == 1000
    with pytest.raises(MalformedBody, match="more than 1000 fields"):
        parse_form(body + b"&b=1")


def test_refusals_show_a_clipped_field_name():
    name = "n" * 100_000
    with pytest.raises(MalformedBody) as refused:
        parse_form(f"{name}]=1".encode())
    assert len(str(refused.value)) < 120 and "..." in str(refused.value)
