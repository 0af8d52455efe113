"""
txtask: run blocking code in worker processes and call it from Twisted.

A L{TaskServer} starts one worker process per client connection; a
L{Client} keeps a pool of those connections and lends them out as exclusive
L{Checkout}s whose calls return Deferreds.

The Twisted-side names load on first use, so that a worker process, which
imports this package, never pays for importing Twisted.
"""

from __future__ import annotations

from txtask.errors import (
    CallSkipped,
    CheckoutAborted,
    CheckoutReleased,
    CheckoutTimeout,
    ClientClosed,
    FatalError,
    Overloaded,
    ProtocolError,
    RemoteError,
    SetupError,
    TaskError,
    WorkerDied,
)

# Workers import this package; typing alone would add milliseconds to
# every worker's start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from txtask._checkout import Checkout
    from txtask._client import Client
    from txtask._requestlog import RequestLog
    from txtask._server import TaskServer

__all__ = [
    "Client",
    "RequestLog",
    "Checkout",
    "TaskServer",
    "TaskError",
    "RemoteError",
    "SetupError",
    "CallSkipped",
    "CheckoutReleased",
    "ClientClosed",
    "Overloaded",
    "ProtocolError",
    "FatalError",
    "WorkerDied",
    "CheckoutTimeout",
    "CheckoutAborted",
]

_LAZY = {
    "Client": "txtask._client",
    "Checkout": "txtask._checkout",
    "TaskServer": "txtask._server",
    "RequestLog": "txtask._requestlog",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'txtask' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value
