"""Worker bootstrap: ``dramatiq workers``.

Build the app, build the broker with the app-context middleware, make it the
global broker, then import the actor modules (actors bind to the global broker
at import, so the order matters).
"""

from __future__ import annotations

import dramatiq

from app import create_app, queue
from app.extensions import redis_ext
from workers.middleware import AppContextMiddleware
from workers.scheduler import PeriodicMiddleware

app = create_app()
broker = queue.build_broker(app.config)
broker.add_middleware(AppContextMiddleware(app))
broker.add_middleware(PeriodicMiddleware(redis_ext.client, app.config))
app.extensions["broker"] = broker
dramatiq.set_broker(broker)

# Actors register on import, so these come after set_broker.
from workers import calls, clicks, dispatcher, ingress, install, system, telephony, tenants  # noqa: E402,F401

# The dispatcher engine per worker process (its module declares an actor, so it comes here).
broker.add_middleware(dispatcher.DispatcherMiddleware(app))
