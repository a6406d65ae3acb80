"""gunicorn settings for the web tier; the Procfile's ``web`` line and ``make run`` use them.

One gthread worker process per core by default: the event endpoints are short
and partly I/O-bound, and on a small host extra processes only fight over the
cores (measured with ``python -m bench.ingest``: 2 workers on 2 cores kept the
p99 at 500 events/s under 25 ms where 4 workers did not). Override with
``WEB_CONCURRENCY`` / ``WEB_THREADS``; ``BIND`` overrides ``0.0.0.0:$PORT``.
"""

import multiprocessing
import os

bind = os.environ.get("BIND") or f"0.0.0.0:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count())
worker_class = "gthread"
threads = int(os.environ.get("WEB_THREADS") or 4)
accesslog = "-"
keepalive = 5
