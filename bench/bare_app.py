"""The baseline for bench/ingest.py: Flask answering 200 and nothing else."""

from flask import Flask

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> tuple[str, int]:
    """For the bench's readiness poll."""
    return "ok", 200


@app.post("/b24/events")
def events() -> tuple[str, int]:
    """Answer 200 without reading, checking or storing anything."""
    return "", 200
