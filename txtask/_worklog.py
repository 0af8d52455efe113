"""
The worker's log handler: records of a running request become events of its
reply; all others go to standard error, which the server logs.

Only L{txtask.worker} imports this module, and only once something in the
worker has imported C{logging}: see C{txtask.worker._capture_logging}. Like
the worker, it never imports Twisted.
"""

from __future__ import annotations

import logging
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from txtask.worker import _Recording


class Capture(logging.Handler):
    """
    The root logger's handler in a worker.

    While a request runs, its records are kept as events for the reply;
    otherwise they go to standard error, and while setup runs they are also
    kept, for the callers should setup fail. The worker's own records
    (logger C{own_logger}) always go to standard error.
    """

    def __init__(self, recording: _Recording, level: int | str, own_logger: str):
        super().__init__(level)
        self._recording = recording
        self._own_logger = own_logger
        self._stderr = logging.StreamHandler(sys.stderr)
        self._stderr.setFormatter(
            logging.Formatter("%(levelname)s %(name)s: %(message)s")
        )
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        recording = self._recording
        if record.name == self._own_logger:
            self._stderr.emit(record)
        elif recording.events is not None:
            recording.events.append(self._event(record))
        else:
            self._stderr.emit(record)
            if recording.kept is not None:
                recording.kept.append(self._event(record))

    def _event(self, record: logging.LogRecord) -> list:
        try:
            message = record.getMessage()
        except Exception:
            message = f"{record.msg!r} (its arguments did not fit: {record.args!r})"
        details = []
        if record.exc_info:
            details.append(self._formatter.formatException(record.exc_info))
        elif record.exc_text:
            details.append(record.exc_text)
        if record.stack_info:
            details.append(record.stack_info)
        return [
            "log",
            record.created,
            record.levelno,
            record.name,
            message,
            "\n".join(details) or None,
        ]
