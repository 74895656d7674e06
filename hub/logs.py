"""Logging setup: one event per line on stderr, as key=value pairs (default) or JSON objects.

Convention: a log call carries its structured values in ``extra={"kv": {...}}``::

    log.info("device connected", extra={"kv": {"device": "d1", "epoch": 3}})

which the ``kv`` format writes as::

    ts=2026-11-24T12:00:00.123Z level=info logger=hub.session msg="device connected" device=d1 epoch=3

and the ``json`` format as one object per line with the same keys. A value is quoted (with ``\\``, ``"`` and
line breaks escaped) when it is empty or contains a space, a quote, ``=`` or a control character. An exception
attached to the record (``log.exception``, ``exc_info=``) goes in an ``exc`` key, on the same line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import TextIO

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "KvFormatter", "setup_logging"]

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("kv", "json")

_LEVEL_NAMES = {logging.WARNING: "warning", logging.CRITICAL: "critical"}
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})
#: A value that needs quotes: a space, a quote, `=` or a control character (one C pass, not a Python loop a character).
_NEEDS_QUOTES = re.compile('[ "=\x00-\x1f\x7f]')
#: (a second, its text): the last second a timestamp was made for, since most events fall in the one before.
_second: tuple[int, str] = (-1, "")


def _timestamp(record: logging.LogRecord) -> str:
    global _second
    second = int(record.created)
    cached, text = _second
    if second != cached:
        text = f"{datetime.fromtimestamp(second, UTC):%Y-%m-%dT%H:%M:%S}"
        _second = (second, text)
    return f"{text}.{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord, formatter: _Formatter) -> dict[str, object]:
    """The event's keys in output order: ts, level, logger, msg, the process's context, the record's kv, exc."""
    fields: dict[str, object] = {
        "ts": _timestamp(record),
        "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
        "logger": record.name,
        "msg": record.getMessage(),
        **formatter.context,
    }
    kv = getattr(record, "kv", None)
    if isinstance(kv, dict):
        for key, value in kv.items():
            fields[str(key)] = value
    if record.exc_info:
        fields["exc"] = formatter.formatException(record.exc_info)
    elif record.exc_text:
        fields["exc"] = record.exc_text
    return fields


def _kv_value(value: object) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    if not text or _NEEDS_QUOTES.search(text) is not None:
        return '"' + text.translate(_ESCAPES) + '"'
    return text


class _Formatter(logging.Formatter):
    """A formatter that adds the same `context` (say, a worker's id) to every event."""

    def __init__(self, context: dict[str, object] | None = None) -> None:
        super().__init__()
        self.context = dict(context or {})


class KvFormatter(_Formatter):
    """``key=value`` pairs on one line (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of key=value pairs."""
        return " ".join(f"{key}={_kv_value(value)}" for key, value in _fields(record, self).items())


class JsonFormatter(_Formatter):
    """One JSON object per line; values that JSON cannot hold are written as strings."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        return json.dumps(_fields(record, self), default=str, ensure_ascii=False)


class _HubHandler(logging.StreamHandler[TextIO]):
    """Marks the handler `setup_logging` installed, so a second call replaces it instead of adding one."""


def setup_logging(level: str, fmt: str = "kv", context: dict[str, object] | None = None) -> None:
    """Send all logging to stderr at `level` (debug, info, warning, error), in format `fmt` (kv or json); every
    event carries `context` (a worker's `worker=K`) after its message.

    Raises ValueError for an unknown level or format.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    # The formats carry no source location, thread or process: no event looks them up (the logging HOWTO's
    # "Optimization"; 10 -> 8 us an event).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = _HubHandler(sys.stderr)
    handler.setFormatter(KvFormatter(context) if fmt == "kv" else JsonFormatter(context))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _HubHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
