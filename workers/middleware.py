"""Cross-cutting worker concerns as Dramatiq middleware, not actor code."""

from __future__ import annotations

import logging
import threading
from typing import Any

import dramatiq
from dramatiq.broker import MessageProxy
from dramatiq.middleware import Middleware
from flask import Flask

log = logging.getLogger(__name__)


class AppContextMiddleware(Middleware):
    """Run every message inside a fresh Flask app context; release the DB session after."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self._local = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        ctx = self.app.app_context()
        ctx.push()
        self._local.ctx = ctx

    def _pop(self) -> None:
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            return
        from app.extensions import db

        try:
            db.session.remove()
        finally:
            ctx.pop()
            self._local.ctx = None

    def after_process_message(self, broker: dramatiq.Broker, message: MessageProxy, *,
                              result: Any = None, exception: BaseException | None = None) -> None:
        self._pop()

    def after_skip_message(self, broker: dramatiq.Broker, message: MessageProxy) -> None:
        self._pop()
