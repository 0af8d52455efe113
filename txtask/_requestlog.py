"""
RequestLog: everything that happened for one request, across processes.
"""

from __future__ import annotations

import os
import time
from types import TracebackType

#: Level names, as in C{twisted.logger.LogLevel}, by the lowest standard
#: C{logging} level number that maps to each.
_LEVELS = ((50, "critical"), (40, "error"), (30, "warn"), (20, "info"))


def level_name(levelno: int) -> str:
    """
    The RequestLog level name of a standard C{logging} level number.
    """
    for lowest, name in _LEVELS:
        if levelno >= lowest:
            return name
    return "debug"


class RequestLog:
    """
    A log for one request: pass it as C{client.checkout(log=...)}.

    It collects, in time order, the caller's own messages and timers, a timer
    for every call on the checkout (named after the method, C{__call__} for
    a direct call), and the C{logging} records and timers of the worker that
    served it. Each entry carries the pid of the process that produced it.
    """

    def __init__(self) -> None:
        self.start = time.time()
        self._logs: list[list] = []
        self._timers: list[list] = []
        self._last = self.start

    def debug(self, message: str) -> None:
        self.add_log(time.time(), "debug", message)

    def info(self, message: str) -> None:
        self.add_log(time.time(), "info", message)

    def warn(self, message: str) -> None:
        self.add_log(time.time(), "warn", message)

    def error(self, message: str) -> None:
        self.add_log(time.time(), "error", message)

    def timer(self, name: str) -> _Timer:
        """
        Time a step of the caller's own: C{with log.timer("render"): ...}.
        """
        return _Timer(self, name)

    def add_log(
        self, when: float, level: str, message: str, pid: int | None = None
    ) -> None:
        """
        Record a message logged at C{when} (seconds since the epoch).

        @param pid: The process that logged it; this one by default.
        """
        self._logs.append([when, level, str(message), _pid(pid)])
        self._last = max(self._last, when)

    def add_timer(
        self, name: str, started: float, ended: float, pid: int | None = None
    ) -> None:
        """
        Record a step that ran from C{started} to C{ended} (seconds since the
        epoch).
        """
        self._timers.append([str(name), started, ended, _pid(pid)])
        self._last = max(self._last, ended)

    def as_dict(self) -> dict:
        """
        The whole log, times in seconds from its start::

            {"start": epoch seconds, "end": seconds to the last event,
             "logs": [[t, level, message, pid], ...],
             "timers": [[name, t_start, t_end, pid], ...]}

        Both lists are in time order (timers by their start).
        """
        start = self.start
        return {
            "start": start,
            "end": self._last - start,
            "logs": [
                [when - start, level, message, pid]
                for when, level, message, pid in sorted(
                    self._logs, key=lambda entry: entry[0]
                )
            ],
            "timers": [
                [name, began - start, ended - start, pid]
                for name, began, ended, pid in sorted(
                    self._timers, key=lambda entry: entry[1]
                )
            ],
        }


class _Timer:
    def __init__(self, log: RequestLog, name: str) -> None:
        self._log = log
        self._name = name
        self._started = 0.0

    def __enter__(self) -> _Timer:
        self._started = time.time()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._log.add_timer(self._name, self._started, time.time())


def _pid(pid: int | None) -> int:
    return os.getpid() if pid is None else pid
