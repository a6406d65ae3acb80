"""The outgoing dispatcher (issue #12): outbox, batch engine, rate bucket, credentials.

Services submit REST commands with ``submit`` (``ref`` points a later command at an
earlier one's result); the engine (``app.dispatcher.engine``) sends them in parallel
batches per portal. Each command's ``Outcome`` (done, dead or unknown) reaches the
handler its submitter registered for the tag it submitted with (``app.dispatcher.results``).
"""

from app.dispatcher.models import Priority
from app.dispatcher.outbox import submit
from app.dispatcher.refs import ref
from app.dispatcher.results import (
    NotYet,
    Outcome,
    OutcomeKind,
    earlier,
    outcome_handler,
    register_outcome_handlers,
)

__all__ = ["NotYet", "Outcome", "OutcomeKind", "Priority", "earlier", "outcome_handler", "ref",
           "register_outcome_handlers", "submit"]
