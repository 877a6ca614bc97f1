"""Structured logs: one event per line, `key=value` after the level and logger."""
from __future__ import annotations

import logging
import sys


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if not msg.startswith("event="):
            msg = f'event=log msg="{msg}"'
        line = f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} {msg}"
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", "\\n") + '"'
        return line


def setup_logging(level: str = "INFO") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(level)
    logging.Formatter.converter = __import__("time").gmtime
