"""The order a batch runs its commands in (Bitrix24 runs them one after the other): command
by command, every key and reference kept, real-time work as early as they allow."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from app.dispatcher import ref
from app.dispatcher.models import Priority
from app.dispatcher.packer import Candidate, in_running_order, pack_round

REGISTER = "telephony.externalcall.register"
SHOW = "telephony.externalcall.show"
HIDE = "telephony.externalcall.hide"
FINISH = "telephony.externalcall.finish"
ATTACH = "telephony.externalCall.attachRecord"
PRIORITY = {REGISTER: Priority.REALTIME, SHOW: Priority.REALTIME, HIDE: Priority.REALTIME,
            FINISH: Priority.NORMAL, ATTACH: Priority.BULK, "crm.deal.add": Priority.BULK}
CARD = (REGISTER, SHOW)


def cand(cid: int, method: str, key: str | None, refs: tuple[int, ...] = (),
         after: int | None = None) -> Candidate:
    params = {f"P{n}": ref(target, "CALL_ID") for n, target in enumerate(refs)}
    return Candidate(cid, method, params, key, after, PRIORITY[method].value)


@st.composite
def batches(draw: st.DrawFn) -> list[Candidate]:
    """Up to 50 commands as the packer leaves them: ids ascending, some sharing call keys,
    some referencing or waiting for earlier ones of the batch, in any priority."""
    n = draw(st.integers(1, 50))
    ids = sorted(draw(st.sets(st.integers(1, 10_000), min_size=n, max_size=n)))
    out: list[Candidate] = []
    for i, cid in enumerate(ids):
        method = draw(st.sampled_from(sorted(PRIORITY)))
        key = draw(st.one_of(st.none(), st.sampled_from([f"call-{k}" for k in range(8)])))
        earlier = ids[:i]
        refs = tuple(draw(st.lists(st.sampled_from(earlier), max_size=2))) if earlier else ()
        after = draw(st.one_of(st.none(), st.sampled_from(earlier))) if earlier else None
        out.append(cand(cid, method, key, refs, after))
    return draw(st.permutations(out))  # the packer's own order varies (priority, then id)


def constraints(commands: list[Candidate]) -> dict[int, set[int]]:
    """Per command, the commands of the batch it must run after (its key's earlier ones, its
    references' and ``after``'s targets), transitively."""
    inside = {c.id for c in commands}
    direct = {c.id: {d for d in c.depends_on() if d in inside}
              | {o.id for o in commands if c.key is not None and o.key == c.key and o.id < c.id}
              for c in commands}
    closed: dict[int, set[int]] = {}
    for c in sorted(commands, key=lambda c: c.id):  # every constraint points to a lower id
        closed[c.id] = set(direct[c.id]).union(*(closed[d] for d in direct[c.id]))
    return closed


def descendants(commands: list[Candidate], must: dict[int, set[int]]) -> dict[int, set[int]]:
    """Per command, the commands of the batch that must run after it."""
    out: dict[int, set[int]] = {c.id: set() for c in commands}
    for later, earlier in must.items():
        for e in earlier:
            out[e].add(later)
    return out


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_running_order_keeps_every_key_and_reference_and_runs_urgent_work_first(
        commands: list[Candidate]) -> None:
    order = in_running_order(commands)
    assert sorted(c.id for c in order) == sorted(c.id for c in commands)  # each once
    place = {c.id: i for i, c in enumerate(order)}
    must = constraints(commands)
    for c in commands:  # a topological order of the key order and the references
        assert all(place[d] < place[c.id] for d in must[c.id]), (c, must[c.id])
    by_id = {c.id: c for c in commands}
    holds = descendants(commands, must)
    urgency = {c.id: min([c.priority, *(by_id[d].priority for d in holds[c.id])])
               for c in commands}
    for i, c in enumerate(order):  # list scheduling: nothing ready was more urgent
        ready = [o for o in order[i:] if all(place[d] < i for d in must[o.id])]
        best = min((urgency[o.id], o.priority) for o in ready)
        assert (urgency[c.id], c.priority) == best, (c, ready)


@st.composite
def call_batches(draw: st.DrawFn) -> list[Candidate]:
    """A batch of calls as telephony submits them (one key per call, its later commands
    referencing its register's CALL_ID): each call a stretch of register, shows, hides,
    finish, attachRecord, cut where earlier batches took its head and the packer its tail,
    the calls' commands interleaved in time."""
    calls = draw(st.integers(1, 12))
    sequences = []
    for _ in range(calls):
        middle = draw(st.lists(st.sampled_from([SHOW, HIDE]), max_size=5))
        tail = draw(st.sampled_from([[], [FINISH], [FINISH, ATTACH]]))
        sequences.append([REGISTER, SHOW, *middle, *tail])
    pending = [0] * calls  # the next step of each call to get an id
    turns = draw(st.permutations([n for n, seq in enumerate(sequences) for _ in seq]))
    commands: list[list[Candidate]] = [[] for _ in range(calls)]
    register: dict[int, int] = {}
    for cid, call in enumerate(turns, start=1):
        method = sequences[call][pending[call]]
        pending[call] += 1
        if method == REGISTER:
            register[call] = cid
        refs = () if method == REGISTER else (register[call],)
        commands[call].append(cand(cid, method, f"call-{call}", refs))
    out = []
    for seq in commands:
        start = draw(st.integers(0, len(seq) - 1))
        end = draw(st.integers(start + 1, len(seq)))
        out += seq[start:end]
    return sorted(out, key=lambda c: (c.priority, c.id))  # as the store hands them over


@settings(max_examples=300, deadline=None)
@given(call_batches())
def test_in_a_batch_of_calls_every_card_runs_before_any_finish_it_does_not_wait_for(
        commands: list[Candidate]) -> None:
    order = in_running_order(commands)
    must = constraints(commands)
    for i, c in enumerate(order):
        if c.method in CARD:
            ahead = [o.id for o in order[:i] if o.method == FINISH and o.id not in must[c.id]]
            assert not ahead, f"{c.method} {c.id} runs behind finishes {ahead}"


def test_a_register_runs_before_the_finish_of_a_call_that_also_holds_real_time_work():
    """Call a's key holds a hide and its finish; call b's a register and its show. Ranked by
    key, a's real-time hide put a's whole key first: b's card waited for a's finish (a second
    of portal time, seconds with a few). Command by command, only the hide goes first."""
    hide_a, finish_a = cand(1, HIDE, "a"), cand(2, FINISH, "a")
    register_b, show_b = cand(3, REGISTER, "b"), cand(4, SHOW, "b", refs=(3,))
    finish_c, register_d = cand(5, FINISH, "c"), cand(6, REGISTER, "d")
    order = in_running_order([hide_a, register_b, show_b, register_d, finish_a, finish_c])
    assert [c.id for c in order] == [1, 3, 4, 6, 2, 5]


def test_a_finish_that_a_hide_waits_for_goes_before_other_finishes_not_before_cards():
    finish_a, hide_a = cand(1, FINISH, "a"), cand(2, HIDE, "a")  # a hide after its finish
    finish_b = cand(3, FINISH, "b")
    register_c, show_c = cand(4, REGISTER, "c"), cand(5, SHOW, "c", refs=(4,))
    order = in_running_order([finish_b, finish_a, hide_a, register_c, show_c])
    assert [c.id for c in order] == [4, 5, 1, 2, 3]


def test_a_card_that_must_wait_for_a_finish_waits_for_that_one_only():
    """A register that references another call's finish (never so in telephony, allowed by
    the outbox) runs right after it, before finishes it does not need."""
    finish_a, finish_b = cand(1, FINISH, "a"), cand(2, FINISH, "b")
    register_c = cand(3, REGISTER, "c", refs=(2,))
    order = in_running_order([finish_a, finish_b, register_c])
    assert [c.id for c in order] == [2, 3, 1]


def test_a_packed_batch_of_calls_runs_every_card_before_the_finishes():
    """Twenty calls: ten ending (hide for the others, then finish), ten starting (register,
    show); the batch the packer builds runs all twenty card commands first."""
    candidates, cid = [], 0
    for call in range(20):
        steps = [HIDE, FINISH] if call % 2 == 0 else [REGISTER, SHOW]
        for method in steps:
            cid += 1
            candidates.append(cand(cid, method, f"call-{call}",
                                   refs=(cid - 1,) if method == SHOW else ()))
    candidates.sort(key=lambda c: (c.priority, c.id))  # as the store hands them over
    [batch] = pack_round(candidates, {}, {}, batches=1, realtime_only_from=1)
    methods = [c.method for c in batch.commands]
    assert len(methods) == 40 and methods[-10:] == [FINISH] * 10
