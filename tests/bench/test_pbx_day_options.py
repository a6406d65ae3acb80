"""bench.pbx_day's scenario options and what its faults report counts (no stack, no network).

``--faults`` bare or ``default`` is issue 22's mix on register and finish; a mix is
``kind:rate,...`` with short names or the sandbox's own kinds, and a typo is refused before
any process starts. ``--operating-budget`` only makes sense with ``--finish-cost``. The
faults point's three results come from the sandbox's per-call view: a call created twice is
a duplicate, a register the dedup answered is not, a call without a successful finish is
unfinished, and an event is lost when it was not stored or not handled.
"""

from __future__ import annotations

import pytest

from bench import pbx_day, pbx_day_check, pbx_day_gen
from sandbox.callhistory import history

ISSUE_MIX = {"http_500": 0.05, "reset": 0.02, "executed_504": 0.01}


def test_a_bare_faults_flag_is_the_issues_mix() -> None:
    assert pbx_day.parse_args(["--faults"]).faults == ISSUE_MIX
    assert pbx_day.parse_args(["--faults", "default"]).faults == ISSUE_MIX
    assert pbx_day.parse_args(["--faults", "--calls", "5"]).faults == ISSUE_MIX
    assert pbx_day.parse_args([]).faults is None


def test_a_mix_names_kinds_short_or_as_the_sandbox_does() -> None:
    args = pbx_day.parse_args(["--faults", "5xx:0.1, html_503:0.2,504_after:1"])
    assert args.faults == {"http_500": 0.1, "html_503": 0.2, "executed_504": 1.0}


@pytest.mark.parametrize("spec", ["5xx", "5xx:lots", "5xx:0", "5xx:1.5", "timeout:0.1",
                                  "reset:0.1,reset:0.2", "hang:0.1", ","])
def test_a_bad_mix_is_refused(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        pbx_day.parse_args(["--faults", spec])
    assert "--faults" in capsys.readouterr().err


def test_the_operating_budget_goes_with_a_finish_cost() -> None:
    with pytest.raises(SystemExit):
        pbx_day.parse_args(["--operating-budget", "60"])
    args = pbx_day.parse_args(["--finish-cost", "1", "--operating-budget", "60"])
    assert (args.finish_cost, args.operating_budget) == (1.0, 60.0)
    with pytest.raises(SystemExit):
        pbx_day.parse_args(["--finish-cost", "0"])


def _entry(seq: int, method: str, **fields: object) -> dict[str, object]:
    return {"seq": seq, "method": f"telephony.externalcall.{method}", "finish": float(seq),
            "error": None, **fields}


def test_the_faults_point_counts_duplicates_unfinished_calls_and_lost_events() -> None:
    day = pbx_day_gen.generate(calls=3, seed=5)
    a, b, c = (call.call_id for call in day.calls)
    log = [
        # a: its register re-sent and answered by the dedup, its finish re-sent and refused
        _entry(1, "register", external_call_id=a, call_id="A", created=True),
        _entry(2, "register", external_call_id=a, call_id="A", created=False),
        _entry(3, "finish", call_id="A", finisher=1, status_code="200"),
        _entry(4, "finish", call_id="A", error="ERROR_CORE"),
        # b: registered twice as two calls (a second CALL_ID), finished once
        _entry(5, "register", external_call_id=b, call_id="B1", created=True),
        _entry(6, "register", external_call_id=b, call_id="B2", created=True),
        _entry(7, "finish", call_id="B1", finisher=1, status_code="304"),
        # c: registered, never finished
        _entry(8, "register", external_call_id=c, call_id="C", created=True),
    ]
    got = pbx_day_check.outcomes(day, history(log), posted=10, stored=9,
                                 inbox={"done": 8, "dead": 1})
    assert got["duplicate_calls"] == [b]
    assert got["unfinished"] == [c]
    assert got["lost_events"] == 2  # one never stored, one stored and dead
    assert (got["registers_deduplicated"], got["finishes_refused"]) == (1, 1)


def test_dead_letters_are_grouped_by_method_and_reason() -> None:
    finish = "telephony.externalcall.finish"
    reasons = pbx_day_check.dead_letter_reasons([
        (1, finish, "OPERATION_TIME_LIMIT: Method is blocked due to operation time limit."),
        (2, finish, "still failing after 6 h of retries: OPERATION_TIME_LIMIT: blocked"),
        (3, "telephony.externalcall.register", "unknown outcome: reset, not sent again: old"),
    ])
    assert reasons == {f"{finish}: OPERATION_TIME_LIMIT": 2,
                       "telephony.externalcall.register: unknown outcome": 1}
    assert pbx_day_check.operating_dead(reasons) == 2


def test_registers_behind_finishes_in_one_batch_are_counted() -> None:
    finish, register = "telephony.externalcall.finish", "telephony.externalcall.register"
    writes = [
        {"seq": 1, "method": register, "batch_id": "b1"},
        {"seq": 2, "method": finish, "batch_id": "b1"},
        {"seq": 3, "method": finish, "batch_id": "b1"},
        {"seq": 4, "method": register, "batch_id": "b1"},  # two finishes ahead of it
        {"seq": 5, "method": register, "batch_id": "b2"},
        {"seq": 6, "method": register, "batch_id": None},
    ]
    assert pbx_day_check.registers_behind_finishes(writes) == {
        "registers": 4, "behind_finishes": 1, "most_finishes_ahead": 2}
    # b1, b2, the single call, and two requests a fault stopped before they ran
    assert pbx_day_check.fault_targets(writes, {"http_500": 1, "reset": 1,
                                                "executed_504": 3}) == 5
