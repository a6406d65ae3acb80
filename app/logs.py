"""Log records kept to one line: control characters in a message are escaped.

Messages carry what senders chose (a user id from an event's auth block, an event name):
a newline there would start a forged line in the log, an ANSI escape would rewrite the
operator's terminal. The record factory, installed once per process by ``create_app``,
escapes them in every record's rendered message, whoever logs it and whichever handler
(ours, gunicorn's, dramatiq's) writes it. Tracebacks (``exc_info``) are left as they are.
"""

from __future__ import annotations

import logging
from typing import Any

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators.
_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escaped(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``)."""
    return text if text.isprintable() else text.translate(_ESCAPES)


def _one_line(factory: Any) -> Any:
    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - bad arguments: the handler reports them as usual
            return record
        if not message.isprintable():
            record.msg, record.args = escaped(message), None
        return record

    make_record.one_line = True  # type: ignore[attr-defined]
    return make_record


def keep_records_to_one_line() -> None:
    """Install the escaping record factory (once per process, however often it is called)."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "one_line", False):
        logging.setLogRecordFactory(_one_line(factory))
