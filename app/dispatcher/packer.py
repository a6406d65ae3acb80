"""Packing ready commands into one batch: order by key, references, priority (pure).

A candidate goes into the batch when
- no earlier command of its ordering key is unfinished outside this batch (an earlier one
  in the same batch runs first: a batch executes its commands in order);
- every command it depends on (``after``, ``ref``) is done, or in this batch;
- its method is not paused by the operating-time ledger, and the round has not yet taken
  as many of its method's commands as the ledger's room for it (``allowance``);
- and, on the portal's last free slots, it is not bulk work (bulk keeps them free for
  real-time work; normal work, ``finish``, may take them as real-time work does: it
  closes a call a person sees).

Commands that depend on a dead command cannot run: they are returned to be dead-lettered.
Inside the batch, real-time commands run first wherever their keys and references let
them (:func:`in_running_order`).
"""

from __future__ import annotations

import heapq
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import Any

from app.dispatcher.models import CommandStatus, Priority
from app.dispatcher.refs import REF_RE, references

MAX_BATCH = 50
MISSING = "missing"  # a dependency that is not a command of the portal
_PATH = re.compile(r"\[([^\[\]]*)\]")


@dataclass(frozen=True)
class Candidate:
    """A queued, due command as the packer sees it."""

    id: int
    method: str
    params: dict[str, Any]
    key: str | None
    after_id: int | None
    priority: int
    attempts: int = 0
    first_sent_at: datetime | None = None
    submitted_at: datetime | None = None
    handler: str | None = None  # its outcome handler's tag (settled once it finishes)

    @property
    def batch_key(self) -> str:
        """Its key inside the batch request (never numeric: PHP would turn them into lists)."""
        return f"c{self.id}"

    def depends_on(self) -> frozenset[int]:
        """The commands whose completion (and result) this one waits for."""
        return self._depends_on

    @cached_property
    def _depends_on(self) -> frozenset[int]:  # params never change: walk them once
        deps = references(self.params)
        return frozenset(deps | {self.after_id} if self.after_id is not None else deps)


@dataclass(frozen=True)
class Dependency:
    """The stored state of a command some candidate depends on."""

    status: str
    result: Any = None


@dataclass
class Packed:
    """One batch to send, and the commands that can never run."""

    commands: list[Candidate] = field(default_factory=list)
    doomed: dict[int, str] = field(default_factory=dict)  # id -> dead reason

    @property
    def realtime(self) -> bool:
        """Whether the batch carries work that is not bulk (it may use the bucket's reserve)."""
        return any(c.priority < Priority.BULK for c in self.commands)

    def wire(self, deps: Mapping[int, Dependency]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The ``{key: (method, params)}`` map for ``batch``, references resolved."""
        inside = {c.id for c in self.commands}
        return {c.batch_key: (c.method, resolve(c.params, inside, deps)) for c in self.commands}


def pack_round(candidates: Iterable[Candidate], blockers: Mapping[str, int],
               deps: Mapping[int, Dependency], *, batches: int, realtime_only_from: int,
               paused: frozenset[str] = frozenset(), complete: bool = True,
               allowance: Mapping[str, int] | None = None) -> list[Packed]:
    """Up to ``batches`` batches from one fetch, to be sent side by side.

    Batches in flight together run in any order, so a later batch treats the commands of
    the earlier ones as unfinished: a key's next command or a reference's target waits
    for the next round. Batches from index ``realtime_only_from`` on (the slots kept for
    real-time work) leave only with real-time work in them, filled up with whatever else
    fits: a call's batch costs a token like any other, so it carries what it can. A batch
    may carry commands that can never run (``doomed``); the last one may carry only those.
    ``allowance``: per method (lower case), how many of its commands the whole round may
    take (the operating-time ledger's room; a method not in it is not limited).
    """
    left = list(candidates)
    block, known = dict(blockers), dict(deps)
    room = dict(allowance or {})
    open_end = None if complete or not left else max(c.id for c in left)
    out: list[Packed] = []
    for index in range(batches):
        packed = pack(left, block, known, realtime_only=index >= realtime_only_from,
                      paused=paused, complete=complete, open_end=open_end, allowance=room)
        if not packed.commands:
            if index == 0 and packed.doomed:
                out.append(packed)
            break
        out.append(packed)
        _taken(packed, left, block, known)
        for c in packed.commands:
            if c.method.lower() in room:
                room[c.method.lower()] -= 1
    return out


def _taken(packed: Packed, left: list[Candidate], block: dict[str, int],
           known: dict[int, Dependency]) -> None:
    """What a later batch of the round must see: these commands are in flight."""
    gone = {c.id for c in packed.commands} | set(packed.doomed)
    left[:] = [c for c in left if c.id not in gone]
    for c in packed.commands:
        known[c.id] = Dependency(CommandStatus.INFLIGHT.value)
        if c.key is not None:
            block[c.key] = min(block.get(c.key, c.id), c.id)


def pack(candidates: Iterable[Candidate], blockers: Mapping[str, int],
         deps: Mapping[int, Dependency], *, limit: int = MAX_BATCH, realtime_only: bool = False,
         paused: frozenset[str] = frozenset(), complete: bool = True,
         open_end: int | None = None, allowance: Mapping[str, int] | None = None) -> Packed:
    """Choose up to ``limit`` candidates (given in priority, id order) for one batch.

    ``blockers``: per ordering key, the lowest id of an unfinished command of that key that
    is not among the candidates. ``deps``: the state of the commands candidates depend on.
    ``complete``: the candidates are every due command (else a key chain reaching the last
    candidate, ``open_end`` or the highest id, may go on beyond them). ``realtime_only``:
    the batch is empty unless real-time work fits (candidates come real-time first).
    ``allowance``: per method (lower case), how many of its commands may be taken.
    """
    ordered = list(candidates)
    by_key: dict[str, list[int]] = defaultdict(list)
    for c in sorted(ordered, key=lambda c: c.id):
        if c.key is not None:
            by_key[c.key].append(c.id)
    out, chosen = Packed(), set[int]()
    room = dict(allowance or {})
    if complete or not ordered:
        open_end = None
    elif open_end is None:
        open_end = max(c.id for c in ordered)
    for c in ordered:
        if len(out.commands) >= limit:
            break
        if realtime_only and not out.commands and c.priority >= Priority.BULK.value:
            break  # no real-time (or normal) work fits: the slot stays free
        reason = _doomed(c, deps)
        if reason:
            out.doomed[c.id] = reason
        elif (room.get(c.method.lower(), 1) > 0
              and _fits(c, chosen, by_key, blockers, deps, paused)
              and not _splits_chain(c, chosen, by_key, limit - len(out.commands), open_end)):
            out.commands.append(c)
            chosen.add(c.id)
            if c.method.lower() in room:
                room[c.method.lower()] -= 1
    out.commands = in_running_order(out.commands)
    return out


def in_running_order(commands: Iterable[Candidate]) -> list[Candidate]:
    """The order a batch runs its commands in: command by command, each as early as its key
    and its references allow, the most urgent ready one first.

    Bitrix24 runs a batch's commands one after the other, so a command waits for every one
    before it: a call's register and show behind other calls' finishes (a second of
    operating time each, protocol §8.14) would put the card seconds late. Only the
    commands of one key (in id order) and a reference's target before its reader must keep
    their order. Of the commands whose predecessors have all been placed (list scheduling),
    the next is the most urgent: by the most urgent work it holds up (itself or any command
    that must run after it; real-time, then normal, then bulk), then by its own priority,
    then by id. A call's card (register, show) is real-time and waits for nothing but its
    own call's earlier real-time commands, so it runs before every finish; a finish goes
    early only when real-time work waits behind it (its key's, or a reference's), and then
    still after the ready real-time commands. (Ranked by key instead, a key holding a hide
    and a finish put the finish ahead of other calls' registers.)"""
    by_id = sorted(commands, key=lambda c: c.id)
    before = _predecessors(by_id)
    after: dict[int, list[int]] = {c.id: [] for c in by_id}
    for c in by_id:
        for p in before[c.id]:
            after[p].append(c.id)
    topo = _topological(by_id, before, after)
    if topo is None:  # a cycle (never from the packer: references point back)
        return by_id
    urgency = {c.id: c.priority for c in by_id}
    for c in reversed(topo):  # the most urgent work a command holds up
        urgency[c.id] = min([urgency[c.id], *(urgency[n] for n in after[c.id])])
    return _scheduled(by_id, before, after, lambda c: (urgency[c.id], c.priority, c.id))


def _predecessors(by_id: list[Candidate]) -> dict[int, set[int]]:
    """Per command, the commands of the batch that must run before it: the previous one of
    its key and the targets of its references (``after``, ``ref``)."""
    inside = {c.id for c in by_id}
    last: dict[str, int] = {}
    before: dict[int, set[int]] = {}
    for c in by_id:
        deps = {d for d in c.depends_on() if d in inside and d != c.id}
        if c.key is not None:
            if c.key in last:
                deps.add(last[c.key])
            last[c.key] = c.id
        before[c.id] = deps
    return before


def _topological(by_id: list[Candidate], before: Mapping[int, set[int]],
                 after: Mapping[int, list[int]]) -> list[Candidate] | None:
    """Any order that keeps ``before``; None when there is none (a cycle)."""
    order = _scheduled(by_id, before, after, lambda c: (c.id,))
    return order if len(order) == len(by_id) else None


def _scheduled(by_id: list[Candidate], before: Mapping[int, set[int]],
               after: Mapping[int, list[int]],
               rank: Callable[[Candidate], tuple[int, ...]]) -> list[Candidate]:
    """List scheduling: repeatedly the lowest-ranked command whose predecessors are placed."""
    by = {c.id: c for c in by_id}
    waiting = {c.id: len(before[c.id]) for c in by_id}
    ready = [(rank(c), c.id) for c in by_id if waiting[c.id] == 0]
    heapq.heapify(ready)
    out: list[Candidate] = []
    while ready:
        _, cid = heapq.heappop(ready)
        out.append(by[cid])
        for n in after[cid]:
            waiting[n] -= 1
            if waiting[n] == 0:
                heapq.heappush(ready, (rank(by[n]), n))
    return out


def _doomed(c: Candidate, deps: Mapping[int, Dependency]) -> str | None:
    for dep in sorted(c.depends_on()):
        state = deps.get(dep)
        if dep >= c.id or (state is not None and state.status == MISSING):
            return f"depends on command {dep}, which is not an earlier command of its portal"
        if state is not None and state.status == CommandStatus.DEAD.value:
            return f"depends on command {dep}, which is dead"
    return None


def _fits(c: Candidate, chosen: set[int], by_key: Mapping[str, list[int]],
          blockers: Mapping[str, int], deps: Mapping[int, Dependency],
          paused: frozenset[str]) -> bool:
    if c.method.lower() in paused:
        return False
    if c.key is not None:
        if blockers.get(c.key, c.id + 1) < c.id:
            return False
        if any(other < c.id and other not in chosen for other in by_key[c.key]):
            return False
    for dep in c.depends_on():
        state = deps.get(dep)
        done = state is not None and state.status == CommandStatus.DONE.value
        if not done and not (dep in chosen and dep < c.id):
            return False
    return True


def _splits_chain(c: Candidate, chosen: set[int], by_key: Mapping[str, list[int]],
                  room: int, open_end: int | None) -> bool:
    """Whether starting c's key chain here would cut it at the batch's end.

    The cut-off rest would wait a whole round trip for this batch; leading the next
    batch instead, the chain goes at once. Only when something else fills this batch.
    """
    if c.key is None or not chosen or any(i in chosen for i in by_key[c.key]):
        return False
    if open_end is not None and by_key[c.key][-1] == open_end:
        return True  # the chain may go on beyond the candidates: length unknown
    return len([i for i in by_key[c.key] if i >= c.id]) > room


def resolve(value: Any, inside: set[int], deps: Mapping[int, Dependency]) -> Any:
    """Replace ``ref`` placeholders: ``$result[c<id>]...`` within the batch, else the value."""
    if isinstance(value, dict):
        return {k: resolve(v, inside, deps) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, inside, deps) for v in value]
    if not isinstance(value, str) or "$ref[" not in value:
        return value
    whole = REF_RE.fullmatch(value)
    if whole and int(whole.group(1)) not in inside:
        found, target = _stored(whole, deps)
        return target if found else value
    return REF_RE.sub(lambda m: _text(m, inside, deps), value)


def _text(m: re.Match[str], inside: set[int], deps: Mapping[int, Dependency]) -> str:
    if int(m.group(1)) in inside:
        return f"$result[c{m.group(1)}]{m.group(2)}"
    found, target = _stored(m, deps)
    if not found or isinstance(target, (dict, list)):
        return m.group(0)
    return {True: "1", False: "0", None: ""}.get(target, str(target)) \
        if isinstance(target, (bool, type(None))) else str(target)


def _stored(m: re.Match[str], deps: Mapping[int, Dependency]) -> tuple[bool, Any]:
    state = deps.get(int(m.group(1)))
    if state is None or state.status != CommandStatus.DONE.value:
        return False, None
    node = state.result
    for part in _PATH.findall(m.group(2)):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node
