"""The outgoing dispatcher (issue #12): outbox, batch engine, rate bucket, credentials.

Services submit REST commands with ``submit`` (``ref`` points a later command at an
earlier one's result); the engine (``app.dispatcher.engine``) sends them in parallel
batches per portal.
"""

from app.dispatcher.outbox import submit
from app.dispatcher.refs import ref

__all__ = ["ref", "submit"]
