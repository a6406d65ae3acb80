"""on_done actors: the dispatcher hands each the id of a command that is done (thin; the work
is in app.tenants.upkeep, which reads the command's stored result)."""

from __future__ import annotations

from typing import Any

import dramatiq

from app.extensions import db
from app.tenants import upkeep

# Per-message retries cover a database hiccup; the command's result stays on its row.
RETRIES: dict[str, Any] = {"queue_name": "default", "max_retries": 20, "min_backoff": 500,
                           "max_backoff": 60_000}


@dramatiq.actor(actor_name=upkeep.SETUP_READ, **RETRIES)
def tenants_setup_read(command_id: int) -> None:
    """The setup reads are done: submit the missing bindings and the user sync."""
    upkeep.setup_read(command_id)
    db.session.commit()


@dramatiq.actor(actor_name=upkeep.USERS_PAGE, **RETRIES)
def tenants_users_page(command_id: int) -> None:
    """A page of users is in: upsert it, ask for the next one."""
    upkeep.users_page(command_id)
    db.session.commit()


@dramatiq.actor(actor_name=upkeep.USER_FETCHED, **RETRIES)
def tenants_user_fetched(command_id: int) -> None:
    """A new user's record is in: put their extension into the map."""
    upkeep.user_fetched(command_id)
    db.session.commit()
