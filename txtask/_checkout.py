"""
Checkout: ordered calls on one exclusively held worker.

How this works. A checkout starts with no worker. Its first call asks the
pool for one; calls queue in order and run one at a time, the next sent when
the previous reply arrives. A timer runs while a call waits for a worker or
runs, restarted as each call is made and as each one starts.

  - A C{RemoteError} fails its call; calls queued behind it at that moment
    fail with C{CallSkipped}, and the checkout goes on.
  - A fatal error (worker died, timeout, abort, protocol error) fails the
    running and queued calls and sticks: every later call fails at once with
    it. The worker is dropped, never reused.
  - C{release()} returns the worker to the pool once the queue drains.
  - A worker that says C{bye} before answering anything in this checkout
    took none of its calls, so the checkout quietly asks for another.

The user holds a L{Checkout}; the pool and the worker connection hold only
its L{_CheckoutCore}, so dropping the last L{Checkout} releases it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from txtask import _wire
from txtask._requestlog import RequestLog, level_name
from txtask.errors import (
    CallSkipped,
    CheckoutAborted,
    CheckoutReleased,
    CheckoutTimeout,
    ClientClosed,
    FatalError,
    ProtocolError,
    RemoteError,
    SetupError,
    WorkerDied,
)

if TYPE_CHECKING:
    from txtask._protocol import WorkerConnection

_checkout_ids = itertools.count(1)

#: Why a worker left the pool, as counted by L{Counters.workers_retired}.
RETIRE_REASONS = (
    "error",
    "max_checkouts",
    "death",
    "timeout",
    "abort",
    "protocol",
    "stopped",
    "closed",
)

#: The twisted.logger level of each RequestLog level name.
_LOG_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}


class Counters:
    """
    What a pool and its checkouts did since the client started.

    @ivar checkouts_served: Checkouts that were lent a worker.
    @ivar calls_made: Calls queued on a checkout (not those refused at once,
        on a released or failed checkout, or with unsendable arguments).
    @ivar calls_failed: Of those, the ones that failed, by error class name.
    @ivar workers_started: Worker connections that said hello.
    @ivar workers_retired: Workers that left the pool, by reason (one of
        L{RETIRE_REASONS}).
    """

    def __init__(self) -> None:
        self.checkouts_served = 0
        self.calls_made = 0
        self.calls_failed: dict[str, int] = {}
        self.workers_started = 0
        self.workers_retired = dict.fromkeys(RETIRE_REASONS, 0)

    def retired(self, reason: str) -> None:
        self.workers_retired[reason] += 1

    def call_failed(self, error: BaseException) -> None:
        name = type(error).__name__
        self.calls_failed[name] = self.calls_failed.get(name, 0) + 1


def _retire_reason(error: BaseException) -> str:
    if isinstance(error, CheckoutTimeout):
        return "timeout"
    if isinstance(error, CheckoutAborted):
        return "abort"
    if isinstance(error, ProtocolError):
        return "protocol"
    if isinstance(error, ClientClosed):
        return "closed"
    return "death"


class Pool(Protocol):
    """
    What a checkout needs from the client's pool.
    """

    reactor: IReactorTime
    name: str | None
    counters: Counters
    #: Seconds a checkout may hold a worker with no call in flight before
    #: a warning is logged; C{None}: never.
    leak_warning: float | None
    #: Why the latest attempt to reach a server failed, if none succeeded
    #: since; C{None} otherwise.
    connect_error: str | None

    def request_worker(self, core: _CheckoutCore, first: bool = False) -> None:
        """
        Queue for a worker (at the front if C{first}); the pool calls
        C{core.worker_assigned} when one is free.
        """

    def withdraw(self, core: _CheckoutCore) -> None:
        """
        The checkout is done with the pool: it no longer waits for a worker
        and holds none.
        """

    def return_worker(self, connection: WorkerConnection, retire: bool) -> None:
        """
        Take back a worker after a checkout, retiring it if asked.
        """

    def discard_worker(self, connection: WorkerConnection, reason: str) -> None:
        """
        Drop a worker that must never be reused; C{reason} is one of
        L{RETIRE_REASONS}.
        """


class _Call:
    __slots__ = ("method", "frame", "result", "made_at")

    def __init__(
        self, method: str | None, frame: bytes, result: Deferred, made_at: float
    ) -> None:
        self.method = method
        self.frame = frame
        self.result = result
        self.made_at = made_at

    @property
    def label(self) -> str:
        return "__call__()" if self.method is None else f"{self.method}()"


class _CheckoutCore:
    """
    The state of one checkout, as the pool and the worker connection see it.

    @ivar checkout_id: A number unique in this process, for logs.
    @ivar site: Where the checkout was taken (C{file:line}), for warnings.
    """

    log = Logger()

    def __init__(
        self,
        pool: Pool,
        timeout: float | None,
        log: RequestLog | None = None,
        site: str = "an unknown place",
    ) -> None:
        self.checkout_id = next(_checkout_ids)
        self.site = site
        self._request_log = log
        self._counters = pool.counters
        self._leak_timer: IDelayedCall | None = None
        self._idle_since: float | None = None
        self._leak_warned = False
        self.released = False
        self._pool = pool
        self._timeout = timeout
        self._queue: deque[_Call] = deque()
        self._running: _Call | None = None
        self._worker: WorkerConnection | None = None
        self._requested = False
        self._fatal: FatalError | ProtocolError | ClientClosed | None = None
        self._saw_error = False
        self._setup_failed = False
        self._replied = False
        self._timer: IDelayedCall | None = None
        self._deadline: float | None = None

    @property
    def finished(self) -> bool:
        """
        Whether the checkout was released or ended by a fatal error.
        """
        return self.released or self._fatal is not None

    def call(self, method: str | None, args: tuple, kwargs: dict) -> Deferred:
        """
        Queue a call; see L{Checkout.call}.
        """
        if self._fatal is not None:
            return fail(self._fatal)
        if self.released:
            return fail(
                CheckoutReleased(
                    f"{_label(method)} called on a released checkout; "
                    f"take a new checkout"
                )
            )
        try:
            frame = _wire.call(method, args, kwargs)
        except TypeError as error:
            return fail(
                TypeError(f"cannot send the arguments of {_label(method)}: {error}")
            )

        made_at = time.time() if self._request_log is not None else 0.0
        call = _Call(method, frame, Deferred(self._cancel), made_at)
        self._counters.calls_made += 1
        self._idle_since = None
        if self._running is None and self._worker is not None and not self._queue:
            # The common case, what _advance would do: send it now.
            self._running = call
            self._restart_timer()
            self._worker.send(frame)
        else:
            self._queue.append(call)
            self._restart_timer()
            self._advance()
        return call.result

    def release(self) -> None:
        """
        Give the worker back once the queued calls are done.
        """
        self.released = True
        if self._running is None and not self._queue:
            self._finish()

    def abort(self, error: FatalError | ProtocolError | ClientClosed) -> None:
        """
        End the checkout with a fatal error: fail the running and queued
        calls, make every later call fail with it, drop the worker.
        """
        if self._fatal is not None:
            return
        self._fatal = error
        self._cancel_timer()

        self._drop_worker(_retire_reason(error))
        self._pool.withdraw(self)
        self._requested = False

        failed = ([self._running] if self._running else []) + list(self._queue)
        self._running = None
        self._queue.clear()
        for call in failed:
            self._call_timer(call)
        # Before any errback: the caller may resume and drop its last
        # reference to the log there.
        self._request_log = None
        for call in failed:
            self._fail_call(call, error)

    def worker_assigned(self, connection: WorkerConnection) -> None:
        """
        The pool lends this checkout a worker.
        """
        self._requested = False
        if not self._replied and self._worker is None:
            self._counters.checkouts_served += 1
        self._worker = connection
        connection.listener = self
        self._advance()
        if self._leak_timer is None:
            self._start_leak_watch()

    def reply_received(self, connection: WorkerConnection, message: list) -> None:
        call, self._running = self._running, None
        if call is None:
            self.abort(ProtocolError(f"worker {connection.pid} replied to no call"))
            return
        self._replied = True
        ok = message[0] == "ok"
        events = message[2 if ok else 5] if len(message) > (2 if ok else 5) else None
        if events:
            try:
                self._replay(connection, call, _wire.check_events(events))
            except ProtocolError as error:
                self._running = call
                self.abort(error)
                return
        if self._leak_timer is not None:
            # Idle from now, unless the next queued call goes out.
            self._idle_since = self._pool.reactor.seconds()
        if ok:
            # The next call goes out, or the worker goes back to the pool,
            # before the caller's callbacks run and perhaps ask for one.
            self._pause_timer()
            self._call_timer(call)
            if self._queue or self.released:
                self._advance()
            call.result.callback(message[1])
            return

        _, kind, type_name, text, remote_traceback = message[:5]
        error_class = SetupError if kind == "setup" else RemoteError
        error = error_class(type_name, text, remote_traceback, call.method)
        self._saw_error = True
        self._setup_failed = self._setup_failed or kind == "setup"

        # Calls queued now are skipped; calls the errback makes are not.
        skipped = list(self._queue)
        self._queue.clear()
        self._pause_timer()
        for failed in (call, *skipped):
            self._call_timer(failed)
        self._advance()
        self._fail_call(call, error)
        for later in skipped:
            self._fail_call(later, CallSkipped(error))

    def _replay(self, connection: WorkerConnection, call: _Call, events: list) -> None:
        """
        Re-emit a reply's worker records here, and add them and the worker's
        timers to the request log.
        """
        request_log = self._request_log
        method = call.method or "__call__"
        for event in events:
            if event[0] == "timer":
                if request_log is not None:
                    request_log.add_timer(event[1], event[2], event[3], connection.pid)
                continue
            _, when, levelno, logger_name, text, exception = event
            level = level_name(levelno)
            if exception is not None:
                text = f"{text}\n{exception}"
            Logger(namespace=f"txtask.remote.{logger_name}").emit(
                _LOG_LEVELS[level],
                "{message}",
                message=text,
                worker_pid=connection.pid,
                method=method,
                checkout_id=self.checkout_id,
                remote_logger=logger_name,
                remote_time=when,
            )
            if request_log is not None:
                request_log.add_log(when, level, text, connection.pid)

    def _call_timer(self, call: _Call) -> None:
        if self._request_log is not None:
            self._request_log.add_timer(
                call.method or "__call__", call.made_at, time.time(), os.getpid()
            )

    def _fail_call(self, call: _Call, error: BaseException) -> None:
        """
        Count and fail a call; its timer is already in the request log.
        """
        self._counters.call_failed(error)
        call.result.errback(Failure(error))

    def bye_received(self, connection: WorkerConnection) -> None:
        if self._replied:
            self.abort(WorkerDied(f"worker {connection.pid} exited during a checkout"))
            return

        # It took nothing from this checkout: ask for another worker.
        self._drop_worker("stopped")
        if self._running is not None:
            self._queue.appendleft(self._running)
            self._running = None
        self._requested = True
        self._pool.request_worker(self, first=True)

    def connection_failed(
        self, connection: WorkerConnection, reason: BaseException
    ) -> None:
        if isinstance(reason, ProtocolError):
            self.abort(reason)
            return
        doing = (
            f"while running {self._running.label}"
            if self._running is not None
            else "while the checkout held it"
        )
        self.abort(
            WorkerDied(
                f"worker {connection.pid} died or its connection was lost {doing}"
                f"{self._client_text()}: {reason}"
            )
        )

    def _drop_worker(self, reason: str) -> None:
        """
        Give the worker back to the pool as one that must never be reused.
        """
        self._stop_leak_watch()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.listener = None
            self._pool.discard_worker(worker, reason)

    def _advance(self) -> None:
        """
        Send the next call, ask for a worker, or finish a release.
        """
        if self._running is not None or self._fatal is not None:
            return
        if not self._queue:
            if self.released:
                self._finish()
            return
        if self._worker is None:
            if not self._requested:
                self._requested = True
                self._pool.request_worker(self)
            return

        self._running = self._queue.popleft()
        self._idle_since = None
        self._restart_timer()
        self._worker.send(self._running.frame)

    def _finish(self) -> None:
        self._cancel_timer()
        self._stop_leak_watch()
        self._request_log = None
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.listener = None
            retire = self._setup_failed or self._saw_error and self._retire_on_error
            self._pool.return_worker(worker, retire)
        self._requested = False
        self._pool.withdraw(self)

    @property
    def _retire_on_error(self) -> bool:
        return bool(getattr(self._pool, "refork_after_error", True))

    def _cancel(self, result: Deferred) -> None:
        """
        A call's Deferred was cancelled: abort the checkout; the Deferred
        itself fails with C{CancelledError}.
        """
        for call in [self._running, *self._queue]:
            if call is not None and call.result is result:
                break
        else:
            return
        if call is self._running:
            self._running = None
        else:
            self._queue.remove(call)
        self._counters.call_failed(CancelledError())
        self._call_timer(call)
        self.abort(CheckoutAborted(f"{call.label} was cancelled"))

    # The timer is lazy: restarting it, once per call, only moves a
    # deadline; the delayed call, when it fires, waits out what is left.

    def _restart_timer(self) -> None:
        if self._timeout is None:
            return
        reactor = self._pool.reactor
        self._deadline = reactor.seconds() + self._timeout
        if self._timer is None:
            self._timer = reactor.callLater(self._timeout, self._timer_fired)

    def _pause_timer(self) -> None:
        """
        Stop the clock while no call waits or runs.
        """
        self._deadline = None

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timer_fired(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        reactor = self._pool.reactor
        left = self._deadline - reactor.seconds()
        if left > 0:
            self._timer = reactor.callLater(left, self._timer_fired)
            return
        if self._running is not None:
            waiting = f"for {self._running.label} to return"
        elif self._pool.connect_error is not None:
            waiting = (
                f"for a worker; the latest attempt to connect failed: "
                f"{self._pool.connect_error}"
            )
        else:
            waiting = "for a worker"
        self.abort(
            CheckoutTimeout(
                f"checkout{self._client_text()} timed out after "
                f"{self._timeout:g} seconds waiting {waiting}; pass a larger "
                f"timeout= to checkout() if this is expected",
                self._timeout,
            )
        )

    # Leak watch: like the checkout timer, lazy. While the checkout holds a
    # worker, one delayed call looks at how long it has been idle.

    def _start_leak_watch(self) -> None:
        period = self._pool.leak_warning
        if period is None or self._leak_warned:
            return
        reactor = self._pool.reactor
        self._idle_since = reactor.seconds() if self._running is None else None
        self._leak_timer = reactor.callLater(period, self._leak_check)

    def _stop_leak_watch(self) -> None:
        if self._leak_timer is not None and self._leak_timer.active():
            self._leak_timer.cancel()
        self._leak_timer = None
        self._idle_since = None

    def _leak_check(self) -> None:
        period = self._pool.leak_warning
        reactor = self._pool.reactor
        idle = 0.0 if self._idle_since is None else reactor.seconds() - self._idle_since
        if idle < period:
            self._leak_timer = reactor.callLater(period - idle, self._leak_check)
            return
        self._leak_timer = None
        self._leak_warned = True
        self.log.warn(
            "checkout {checkout_id}{client} taken at {site} has held worker "
            "{pid} for {idle:.0f} seconds with no call; release() it when done, "
            "or the pool runs short of workers",
            checkout_id=self.checkout_id,
            client=self._client_text(),
            site=self.site,
            pid=self._worker.pid if self._worker is not None else None,
            idle=idle,
        )

    def _client_text(self) -> str:
        name = self._pool.name
        return "" if name is None else f" of client {name!r}"

    def close(self) -> None:
        """
        The client closed: fail everything with L{ClientClosed}.
        """
        self.abort(ClientClosed(f"client{self._client_text()} was closed"))


def _label(method: str | None) -> str:
    return "__call__()" if method is None else f"{method}()"


class Checkout:
    """
    One worker, lent exclusively to the caller until L{release}.

    Calls are methods of the checkout (C{co.hash("secret")}), a direct call
    (C{co(...)}) or L{call}. They never raise: each returns a Deferred, and
    they run in order, one at a time, on the same worker.
    """

    log = Logger()

    def __init__(self, core: _CheckoutCore) -> None:
        self._core = core

    @property
    def checkout_id(self) -> int:
        """
        A number unique in this process, used in log events.
        """
        return self._core.checkout_id

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Call C{method} on the worker's interface.

        @param method: The method name; names starting with C{_} reach the
            worker, which refuses them with L{RemoteError}.
        @return: A Deferred firing with the return value. It fails with
            L{RemoteError} (the interface raised; the checkout goes on),
            L{SetupError}, L{CallSkipped} (an earlier queued call failed),
            L{WorkerDied}, L{CheckoutTimeout}, L{CheckoutAborted},
            L{CheckoutReleased}, L{ClientClosed}, L{ProtocolError}, or
            C{TypeError} when an argument cannot be sent.
        """
        if not isinstance(method, str):
            return fail(TypeError(f"method name must be a str, not {method!r}"))
        return self._core.call(method, args, kwargs)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Call the interface itself; fails as L{call} does.
        """
        return self._core.call(None, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._core.call(name, args, kwargs)

    def release(self) -> None:
        """
        Return the worker to the pool after the queued calls finish. Later
        calls fail with L{CheckoutReleased}. Releasing twice does nothing.
        """
        self._core.release()

    def abort(self, reason: str = "aborted by the caller") -> None:
        """
        End the checkout: the running and queued calls, and every later one,
        fail with L{CheckoutAborted}, and the worker is dropped.
        """
        self._core.abort(CheckoutAborted(reason))

    def __enter__(self) -> Checkout:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    async def __aenter__(self) -> Checkout:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __del__(self) -> None:
        core = self.__dict__.get("_core")
        if core is None or core.finished:
            return
        self.log.warn(
            "checkout {checkout_id} was garbage-collected without release(); "
            "release it, or use it in a with block",
            checkout_id=core.checkout_id,
        )
        core.release()
