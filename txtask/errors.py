"""
Every exception txtask raises or fails a Deferred with.

The tree is split by what the caller does next::

    TaskError
     +-- RemoteError          the interface raised; fix the call or the data
     |    +-- SetupError      the worker's setup raised; fix the server
     +-- CallSkipped          an earlier queued call failed; see .cause
     +-- CheckoutReleased     the checkout was used after release()
     +-- ClientClosed         the client was closed
     +-- Overloaded           too many checkouts waiting; retry later
     +-- ProtocolError        the peer sent a malformed or oversized message
     +-- FatalError           the checkout is finished; take a new one
          +-- WorkerDied      connection lost or worker exited
          +-- CheckoutTimeout the checkout's timer ran out
          +-- CheckoutAborted abort() or a cancelled call ended it

This module is plain Python: the worker imports it without Twisted.
"""

from __future__ import annotations

__all__ = [
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


class TaskError(Exception):
    """
    Base class of every txtask error.
    """


class RemoteError(TaskError):
    """
    The interface raised an exception inside the worker.

    The checkout keeps its worker: the caller may go on with more calls, for
    example to roll back.

    @ivar type_name: The remote exception's class name, such as
        C{"ValueError"}.
    @ivar message: The remote exception's text.
    @ivar remote_traceback: The worker's formatted traceback.
    @ivar method: The method called, or C{None} for a direct call.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str,
        method: str | None = None,
    ) -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        self.method = method
        where = "the interface" if method is None else f"{method}()"
        super().__init__(f"{where} raised {type_name}: {message}")


class SetupError(RemoteError):
    """
    The server's setup function raised in the worker before its first call.

    That worker is never reused; every call on the checkout that got it fails
    with this error. Fix the setup function or what it depends on.
    """

    def __init__(
        self,
        type_name: str,
        message: str,
        remote_traceback: str,
        method: str | None = None,
    ) -> None:
        super().__init__(type_name, message, remote_traceback, method)
        self.args = (f"worker setup raised {type_name}: {message}",)


class CallSkipped(TaskError):
    """
    A call was not run because a call queued before it on the same checkout
    failed.

    @ivar cause: The L{RemoteError} of the earlier call.
    """

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(f"call skipped because an earlier call failed: {cause}")


class CheckoutReleased(TaskError):
    """
    A call was made on a checkout after C{release()}; take a new checkout.
    """


class ClientClosed(TaskError):
    """
    The client was closed while this checkout or call was waiting.
    """


class Overloaded(TaskError):
    """
    C{checkout()} refused because C{max_pending_checkouts} checkouts were
    already waiting for a worker; retry later or raise the limit.
    """


class ProtocolError(TaskError):
    """
    The peer sent bytes that are not a valid txtask message: garbage, a frame
    over the size limit, or a message of the wrong shape.

    The connection it arrived on is closed; nothing else is affected.
    """


class FatalError(TaskError):
    """
    The checkout is finished: this call and every later call on it fail with
    the same error, and its worker is never reused. Take a new checkout.
    """


class WorkerDied(FatalError):
    """
    The connection to the worker was lost, or the worker process exited,
    while the checkout held it.
    """


class CheckoutTimeout(FatalError):
    """
    A call waited for a worker, or ran, longer than the checkout's timeout;
    the worker connection was dropped.

    @ivar timeout: The timeout, in seconds.
    """

    def __init__(self, message: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(message)


class CheckoutAborted(FatalError):
    """
    The checkout was ended by C{abort()} or by cancelling one of its calls.

    @ivar reason: The reason given to C{abort()}.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"checkout aborted: {reason}")
