"""The installation use case's own table: each portal's last self-diagnosis."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import Model
from app.tenants.models import utcnow


class PortalDiagnosis(Model):
    """The last report of a portal's self-diagnosis (app/installation/diagnosis.py), one row per
    portal, replaced by each run: the settings page shows it, ``flask portals check`` writes it.

    Its own table rather than a column of ``portals``: that row is read by every event and
    call and written in side transactions (status, tokens); a report of a few kilobytes, written
    once a minute at most, stays out of its way.
    """

    __tablename__ = "portal_diagnoses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    portal_id: Mapped[int] = mapped_column(ForeignKey("portals.id", ondelete="CASCADE"),
                                           unique=True, index=True)
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8))  # the worst finding's: ok | warn | error
    trigger: Mapped[str] = mapped_column(String(16))  # install | settings | cli | page
    # {"seconds": ..., "findings": [{"code", "level", "key", "facts"}, ...]}: message keys and
    # facts, not text, so the page can word it in the reader's language.
    report: Mapped[dict[str, Any]] = mapped_column(JSON)

    def __repr__(self) -> str:
        return f"<PortalDiagnosis {self.portal_id} {self.level} at {self.checked_at}>"
