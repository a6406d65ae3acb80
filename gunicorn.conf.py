"""gunicorn settings for the web tier; the Procfile's ``web`` line and ``make run`` use them.

One gthread worker process per core by default: the event endpoints are short
and partly I/O-bound, and on a small host extra processes only fight over the
cores (measured with ``python -m bench.ingest``: 2 workers on 2 cores kept the
p99 at 500 events/s under 25 ms where 4 workers did not). Override with
``WEB_CONCURRENCY`` / ``WEB_THREADS``; ``BIND`` overrides ``0.0.0.0:$PORT``.

The worker class is gthread's, buffering each request in its main loop before a thread
sees it (``app/serving.py``): a client that stalls or trickles mid-request costs no thread
and is answered 408 after ``REQUEST_DEADLINE_SECONDS`` (10 s); stock gthread gave such a
client a thread for as long as it liked (bench: ``python -m bench.slow_clients``).

No access log unless ``ACCESS_LOG`` names a file (``-`` for stdout; ``make run`` sets
it): a line per event is 43 million lines a day at 500 events/s and cost 8% of the
web tier's CPU (bench/ingest, 1.35 vs 1.24 ms per event). The reverse proxy in front
logs requests anyway; intake logs every refusal with its reason, and /metrics counts
the events received, refused (by reason) and stored.
"""

import multiprocessing
import os

bind = os.environ.get("BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count())
worker_class = "app.serving.BufferingWorker"
threads = int(os.environ.get("WEB_THREADS") or 4)
accesslog = os.environ.get("ACCESS_LOG") or None
keepalive = 5


def worker_exit(server, worker):  # noqa: ANN001, ARG001 - gunicorn's hook signature
    """Before a worker process ends, send the stored rows intake still holds for the broker
    (app/ingress/enqueuer.py); without this they would wait for the sweeper."""
    from app.ingress import enqueuer

    app = getattr(worker, "wsgi", None)
    if hasattr(app, "extensions"):
        enqueuer.drain(app)
