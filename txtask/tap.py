"""
The twistd plugin's options and service: C{twistd -n txtask --interface ...}.
"""

from __future__ import annotations

import os

from twisted.application.service import IService
from twisted.python import usage

from txtask import _wire
from txtask._listen import check_client_certificate_description
from txtask._server import TaskServer

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def _size(value: str) -> int:
    """
    A size in bytes, with an optional K, M or G suffix (powers of 1024).
    """
    number, unit = value, ""
    if value[-1:].upper() in _UNITS:
        number, unit = value[:-1], value[-1].upper()
    size = int(number) * _UNITS[unit]
    if size < 1:
        raise ValueError(f"expected a positive size, got {value!r}")
    return size


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


class Options(usage.Options):
    """
    Command-line options of C{twistd txtask}.
    """

    synopsis = "--interface IMPORT_PATH [options]"
    longdesc = (
        "Start a txtask server: each client connection gets its own worker "
        "process running the interface."
    )
    optParameters = [
        [
            "interface",
            "i",
            None,
            "Import path of the interface: package.module "
            "or package.module:attribute (required).",
        ],
        [
            "listen",
            "l",
            "unix:txtask.sock",
            "Server endpoint description to "
            "listen on, such as unix:/run/app.sock or tcp:7000:interface=127.0.0.1.",
        ],
        [
            "setup",
            None,
            None,
            "Import path of a function each worker runs once before its first call.",
        ],
        [
            "checkout-done",
            None,
            None,
            "Import path of a function a worker runs "
            "each time a checkout of it is released.",
        ],
        ["name", None, None, "Name shown in process titles."],
        [
            "hung-worker-timeout",
            None,
            300.0,
            "Seconds one call may run before its worker is killed.",
            _positive,
        ],
        ["max-workers", None, 64, "Most worker processes alive at once.", int],
        [
            "shutdown-grace",
            None,
            30.0,
            "Seconds a graceful stop waits for busy workers before killing them.",
            float,
        ],
        [
            "max-frame-size",
            None,
            _wire.DEFAULT_MAX_FRAME_SIZE,
            "Largest message a worker accepts, in bytes (K, M, G suffixes "
            "allowed); a client sending more loses its worker.",
            _size,
        ],
        [
            "worker-memory-limit",
            None,
            None,
            "Most memory (address space) each worker may use, such as 512M; "
            "a call that needs more fails with MemoryError. Default: no limit.",
            _size,
        ],
        [
            "client-ca",
            None,
            None,
            "PEM file of certificate authorities: with an ssl: --listen, only "
            "clients presenting a certificate signed by one of them may connect.",
        ],
        [
            "log-level",
            None,
            "INFO",
            "Lowest level of worker log records captured: DEBUG, INFO, WARNING, ERROR.",
        ],
    ]

    def postOptions(self) -> None:
        if not self["interface"]:
            raise usage.UsageError("--interface is required")
        if self["max-workers"] < 1:
            raise usage.UsageError("--max-workers must be at least 1")
        if self["shutdown-grace"] < 0:
            raise usage.UsageError("--shutdown-grace must not be negative")
        if self["client-ca"] is not None:
            try:
                check_client_certificate_description(self["listen"])
            except ValueError as error:
                raise usage.UsageError(f"--client-ca: {error}") from None
            if not os.path.isfile(self["client-ca"]):
                raise usage.UsageError(
                    f"--client-ca: no such file: {self['client-ca']!r}"
                )
        level = self["log-level"].upper()
        if level not in _LOG_LEVELS:
            raise usage.UsageError(
                f"--log-level must be one of {', '.join(_LOG_LEVELS)}, "
                f"not {self['log-level']!r}"
            )


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def makeService(options: Options) -> IService:
    """
    Build the L{TaskServer} the options describe.
    """
    return TaskServer(
        options["interface"],
        listen=options["listen"],
        setup=options["setup"],
        checkout_done=options["checkout-done"],
        name=options["name"],
        hung_worker_timeout=options["hung-worker-timeout"],
        max_workers=options["max-workers"],
        shutdown_grace=options["shutdown-grace"],
        log_level=options["log-level"].upper(),
        max_frame_size=options["max-frame-size"],
        worker_memory_limit=options["worker-memory-limit"],
        client_ca=options["client-ca"],
    )
