"""Group commit: the concurrent events of one web process share one statement and commit.

gunicorn's gthread worker serves a few requests at once (``WEB_THREADS``). Alone, each
paid its own INSERT round trip and its own commit, and on a small host those per-event
costs, not the work, set the ceiling. Here the first request to arrive leads: it takes
every event waiting at that moment and stores them all with one statement, checked
against their portals' token hashes (``inbox.store_verified``); the others sleep
meanwhile. Once that commit returns they answer, the leader hands over to a request that
arrived in the meantime, if any, and queues the group's rows with one message.

Every event is still acknowledged only after the commit that holds it. An event the group
did not store (its token does not match, a duplicate, a database error) goes down the
checked path in its own request, as if the group had never seen it.
"""

from __future__ import annotations

import threading

from flask import current_app

from app.ingress import inbox


class _Waiting:
    """One request's event in the queue, and what became of it."""

    __slots__ = ("event", "token_hash", "stored", "done", "lead")

    def __init__(self, event: inbox.NewEvent, token_hash: str) -> None:
        self.event, self.token_hash = event, token_hash
        self.stored: inbox.Stored | None = None
        self.done = threading.Event()
        self.lead = False  # woken to lead the next group rather than with a result


class GroupCommit:
    """Per app and process: the events waiting, and whether a group is being stored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: list[_Waiting] = []
        self._busy = False

    def store(self, event: inbox.NewEvent, token_hash: str) -> inbox.Stored | None:
        """Store ``event`` if its token hash matches, committed (None: take the checked path)."""
        me = _Waiting(event, token_hash)
        with self._lock:
            self._waiting.append(me)
            follow, self._busy = self._busy, True
        if follow:
            me.done.wait()
            if not me.lead:
                return me.stored
        self._lead()
        return me.stored

    def _lead(self) -> None:
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            self._store(group)
        finally:
            for waiting in group:
                waiting.done.set()  # None sends a follower the checked way
            self._hand_over()
        stored = [w.stored.id for w in group if w.stored is not None]
        if stored:
            inbox.enqueue(stored, "b24", together=True)

    @staticmethod
    def _store(group: list[_Waiting]) -> None:
        results = inbox.store_verified([(w.event, w.token_hash) for w in group])
        for waiting, stored in zip(group, results, strict=True):
            waiting.stored = stored

    def _hand_over(self) -> None:
        with self._lock:
            if not self._waiting:
                self._busy = False
                return
            successor = self._waiting[0]
        successor.lead = True
        successor.done.set()


def store(event: inbox.NewEvent, token_hash: str) -> inbox.Stored | None:
    """Through the current app's group commit (see the module docstring)."""
    ext = current_app.extensions
    group = ext.get("ingress_group_commit")
    if group is None:
        group = ext.setdefault("ingress_group_commit", GroupCommit())
    return group.store(event, token_hash)
