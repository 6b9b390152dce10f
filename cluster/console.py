"""What the CLI prints: the library packages log (``logging``); this shows their records on the terminal.

INFO lines of rayfine's own loggers (``core``, ``training``, ``serving``, ``cluster``) go to stdout as they are
(progress, reports, tables); warnings and errors go to stderr as ``warning: ...``. Other libraries' loggers
are left alone.
"""

from __future__ import annotations

import logging
import sys

PACKAGES = ("core", "training", "serving", "cluster")


class ConsoleHandler(logging.Handler):
    """Writes to the current ``sys.stdout`` / ``sys.stderr`` at each record (so a captured or replaced stream,
    as in tests, gets the lines too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                stream, message = sys.stderr, f"{record.levelname.lower()}: {message}"
            else:
                stream = sys.stdout
            stream.write(message + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never break the command
            self.handleError(record)


def install_console() -> None:
    """Route rayfine's loggers to the terminal (idempotent)."""
    for name in PACKAGES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
            logger.addHandler(ConsoleHandler())
        logger.setLevel(logging.INFO)
