"""``KEYAOS_LOG_FORMAT=json``: every log record as one JSON object on one line.

A record's ``data`` (``logger.info(..., extra={"data": {...}})``) becomes fields of the object:
the request line, refreshes and key state changes carry theirs. Tracebacks go in ``exc_info``.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            entry.update(data)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def logging_config(*, log_format: str, level: str) -> dict:
    """Django's ``LOGGING``: one console handler; in JSON mode uvicorn's loggers use it too."""
    formatter = "json" if log_format == "json" else "plain"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
            "json": {"()": JsonFormatter},
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": formatter}},
        "root": {"handlers": ["console"], "level": level},
        "loggers": {"httpx": {"level": "WARNING"}, "httpcore": {"level": "WARNING"}},
    }
    if log_format == "json":
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            config["loggers"][name] = {"handlers": ["console"], "propagate": False}
    return config
