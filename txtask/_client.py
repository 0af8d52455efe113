"""
Client: the pool of worker connections and the queue of waiting checkouts.

How this works. Each connection is in one of three states: connecting (until
the worker says hello), idle (in the pool), or busy (lent to a checkout).
The pool keeps at least C{min_workers} connections, opens more while
checkouts wait, and never holds more than C{max_workers}. A checkout that
finds no idle worker waits in a first-come-first-served queue.

Each endpoint has its own back-off: a connection attempt that fails, or a
connection that closes before hello, delays the next attempt to that
endpoint only, so one dead server never holds up the others. While every
endpoint is backing off, a single delayed call retries at the earliest
moment one is due.

The pool knows nothing of calls: L{_CheckoutCore} does.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from txtask import _wire
from txtask._checkout import Checkout, Counters, _CheckoutCore
from txtask._protocol import WorkerConnection
from txtask._requestlog import RequestLog
from txtask.errors import ClientClosed, Overloaded, ProtocolError

#: First delay before reconnecting to an endpoint that failed, in seconds.
RETRY_INITIAL = 0.05
#: Longest delay between reconnection attempts, in seconds.
RETRY_MAX = 1.0

_DEFAULT: Any = object()


class _Target:
    """
    One endpoint and its reconnection back-off.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, label: str) -> None:
        self.endpoint = endpoint
        self.label = label
        self.failures = 0
        self.retry_at = 0.0
        self.connections = 0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.retry_at = now + min(RETRY_MAX, RETRY_INITIAL * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class Client:
    """
    A pool of worker connections to one or more txtask servers, lent out as
    exclusive checkouts.

    @ivar name: Label used in log events and error text, or C{None}.
    @ivar refork_after_error: Whether a worker whose checkout saw an error is
        retired on release.
    """

    log = Logger()

    def __init__(
        self,
        connect: str | IStreamClientEndpoint | Sequence[str | IStreamClientEndpoint],
        min_workers: int = 2,
        max_workers: int = 20,
        max_checkouts: int | None = None,
        timeout: float | None = 30,
        refork_after_error: bool = True,
        max_pending_checkouts: int | None = None,
        name: str | None = None,
        max_frame_size: int = _wire.DEFAULT_MAX_FRAME_SIZE,
        leak_warning: float | None = 60,
        reactor: Any = None,
    ) -> None:
        """
        @param connect: A client endpoint description (C{"unix:txtask.sock"}),
            an endpoint, or a list of them; workers are spread over all.
        @param min_workers: Connections kept open and idle as hot standby.
        @param max_workers: Most connections at once; C{min_workers} above it
            is lowered to it.
        @param max_checkouts: Retire a worker after this many checkouts;
            C{None}: never.
        @param timeout: Default checkout timeout in seconds; C{None}: none.
        @param refork_after_error: Retire a worker on release if its checkout
            saw any error.
        @param max_pending_checkouts: Beyond this many waiting checkouts,
            C{checkout()} raises L{Overloaded}; C{None}: no limit.
        @param name: Label for log events and error text.
        @param max_frame_size: Largest frame accepted from a worker, in bytes.
        @param leak_warning: Seconds a checkout may hold a worker with no
            call in flight before a warning naming where it was taken is
            logged (once per checkout); C{None}: never.
        @param reactor: The reactor; the global one by default.
        """
        targets = [connect] if isinstance(connect, str) else connect
        if IStreamClientEndpoint.providedBy(targets):
            targets = [targets]
        targets = list(targets)
        if not targets:
            raise ValueError("connect= needs at least one endpoint")
        for target in targets:
            if not (
                isinstance(target, str) or IStreamClientEndpoint.providedBy(target)
            ):
                raise TypeError(
                    f"connect= takes endpoint descriptions or endpoints, not {target!r}"
                )
        _check_count("max_workers", max_workers, minimum=1)
        _check_count("min_workers", min_workers, minimum=0)
        if max_checkouts is not None:
            _check_count("max_checkouts", max_checkouts, minimum=1)
        if max_pending_checkouts is not None:
            _check_count("max_pending_checkouts", max_pending_checkouts, minimum=0)
        _check_timeout(timeout)
        _check_timeout(leak_warning, "leak_warning")

        self._connect = targets
        self.min_workers = min(min_workers, max_workers)
        self.max_workers = max_workers
        self.max_checkouts = max_checkouts
        self.timeout = timeout
        self.refork_after_error = refork_after_error
        self.max_pending_checkouts = max_pending_checkouts
        self.name = name
        self.max_frame_size = max_frame_size
        self.leak_warning = leak_warning
        self.counters = Counters()
        self._reactor = reactor

        self._targets: list[_Target] | None = None
        self._idle: list[WorkerConnection] = []
        self._busy: set[WorkerConnection] = set()
        self._connecting: dict[WorkerConnection, Deferred[Any]] = {}
        self._waiting: deque[_CheckoutCore] = deque()
        self._holders: set[_CheckoutCore] = set()
        self._retry: IDelayedCall | None = None
        self._closed: Deferred[None] | None = None
        self._unreachable_logged = False
        self.connect_error: str | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def checkout(
        self, timeout: float | None = _DEFAULT, log: RequestLog | None = None
    ) -> Checkout:
        """
        Take a checkout. It gets a worker on its first call.

        @param timeout: Seconds a call may wait for a worker or run; the
            client's default if not given; C{None}: no timeout.
        @param log: A L{RequestLog} collecting this checkout's calls, and the
            worker's records and timers. The client drops it when the
            checkout ends.
        @raise Overloaded: C{max_pending_checkouts} checkouts already wait.
        @raise ClientClosed: The client was closed.
        """
        if timeout is _DEFAULT:
            timeout = self.timeout
        _check_timeout(timeout)
        if self._closed is not None:
            raise ClientClosed(f"client{self._name_text()} is closed")
        limit = self.max_pending_checkouts
        if limit is not None and len(self._waiting) >= limit:
            raise Overloaded(
                f"{len(self._waiting)} checkouts are already waiting for a "
                f"worker (max_pending_checkouts={limit}); retry later"
            )
        if log is not None and not isinstance(log, RequestLog):
            raise TypeError(f"log= takes a txtask.RequestLog, not {log!r}")
        self._start()
        return Checkout(_CheckoutCore(self, timeout, log, _caller_site()))

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Make one call on a fresh checkout and release it.

        @return: A Deferred firing with the return value, failing as
            L{Checkout.call} does, or with L{Overloaded} or L{ClientClosed}.
        """
        try:
            checkout = self.checkout()
        except (Overloaded, ClientClosed) as error:
            return fail(error)
        result = checkout.call(method, *args, **kwargs)
        checkout.release()
        return result

    def stats(self) -> dict[str, Any]:
        """
        The pool now and what it did since the client was made.

        @return: A new dict: the integers C{idle}, C{busy} and C{connecting}
            (workers), C{waiting} (checkouts), C{checkouts_served},
            C{calls_made} and C{workers_started}; C{calls_failed}, a dict of
            counts by error class name; C{workers_retired}, a dict of counts
            by reason: C{error} (refork after an error or a setup failure),
            C{max_checkouts}, C{death}, C{timeout}, C{abort} (including a
            cancelled call), C{protocol}, C{stopped} (the server stopped it)
            and C{closed} (the client closed).
        """
        counters = self.counters
        return {
            "idle": len(self._idle),
            "busy": len(self._busy),
            "connecting": len(self._connecting),
            "waiting": len(self._waiting),
            "checkouts_served": counters.checkouts_served,
            "calls_made": counters.calls_made,
            "calls_failed": dict(counters.calls_failed),
            "workers_started": counters.workers_started,
            "workers_retired": dict(counters.workers_retired),
        }

    def close(self) -> Deferred[None]:
        """
        Close the client: waiting checkouts and calls on held checkouts fail
        with L{ClientClosed}, and every connection is closed.

        @return: A Deferred firing with C{None} once every connection is
            closed. Closing twice returns a Deferred firing at the same time.
        """
        if self._closed is not None:
            return _shield(self._closed)
        self._closed = Deferred()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()

        attempts = list(self._connecting.values())
        connections = self._idle + list(self._busy) + list(self._connecting)
        lost = [c.disconnected for c in connections if c.transport is not None]
        for core in list(self._holders):
            core.close()
        self._idle.clear()
        for connection in connections:
            connection.close()
        for attempt in attempts:
            attempt.cancel()

        finished = self._closed
        gathered = DeferredList([_shield(d) for d in lost])
        gathered.addCallback(lambda _: finished.callback(None))
        return finished

    # What checkouts ask of the pool.

    def request_worker(self, core: _CheckoutCore, first: bool = False) -> None:
        if self._closed is not None:
            core.close()
            return
        self._holders.add(core)
        if self._idle:
            self._lend(self._idle.pop(), core)
            return
        if first:
            self._waiting.appendleft(core)
        else:
            self._waiting.append(core)
        self._fill()

    def withdraw(self, core: _CheckoutCore) -> None:
        self._holders.discard(core)
        if core in self._waiting:
            self._waiting.remove(core)

    def return_worker(self, connection: WorkerConnection, retire: bool) -> None:
        self._busy.discard(connection)
        connection.checkouts += 1
        limit = self.max_checkouts
        if retire:
            reason = "error"
        elif self._closed is not None:
            reason = "closed"
        elif limit is not None and connection.checkouts >= limit:
            reason = "max_checkouts"
        else:
            reason = None
        if reason is not None:
            self.counters.retired(reason)
            self._drop(connection)
            return
        connection.send(_wire.DONE)
        self._worker_ready(connection)

    def discard_worker(self, connection: WorkerConnection, reason: str) -> None:
        self._busy.discard(connection)
        self.counters.retired(reason)
        self._drop(connection)

    # The pool itself.

    def _start(self) -> None:
        if self._targets is not None:
            return
        self._targets = [self._target(spec) for spec in self._connect]
        self._fill()

    def _target(self, spec: str | IStreamClientEndpoint) -> _Target:
        if isinstance(spec, str):
            return _Target(clientFromString(self.reactor, spec), spec)
        return _Target(spec, repr(spec))

    def _lend(self, connection: WorkerConnection, core: _CheckoutCore) -> None:
        self._busy.add(connection)
        core.worker_assigned(connection)

    def _worker_ready(self, connection: WorkerConnection) -> None:
        # Checkouts that stop waiting withdraw, so every one queued wants it.
        if self._waiting:
            self._lend(connection, self._waiting.popleft())
            return
        connection.listener = _IdleListener(self)
        self._idle.append(connection)

    def _drop(self, connection: WorkerConnection) -> None:
        connection.close()
        self._fill()

    def _total(self) -> int:
        return len(self._idle) + len(self._busy) + len(self._connecting)

    def _fill(self) -> None:
        """
        Open connections until the pool has what it needs.
        """
        if self._closed is not None or self._targets is None:
            return
        wanted = min(
            self.max_workers,
            max(self.min_workers, len(self._busy) + len(self._waiting)),
        )
        now = self.reactor.seconds()
        while self._total() < wanted:
            ready = [target for target in self._targets if target.retry_at <= now]
            if not ready:
                self._retry_later(min(t.retry_at for t in self._targets) - now)
                return
            self._open(min(ready, key=lambda target: target.connections))

    def _retry_later(self, delay: float) -> None:
        if self._retry is not None and self._retry.active():
            return
        self._retry = self.reactor.callLater(max(delay, 0), self._fill)

    def _open(self, target: _Target) -> None:
        connection = WorkerConnection(self.max_frame_size, target.label)
        target.connections += 1
        factory = Factory.forProtocol(lambda: connection)
        factory.noisy = False
        connected = target.endpoint.connect(factory)
        self._connecting[connection] = connected
        connected.addCallback(lambda _: connection.ready)
        connected.addCallbacks(
            lambda _: self._connected(target, connection),
            lambda failure: self._connect_failed(target, connection, failure),
        )

    def _connected(self, target: _Target, connection: WorkerConnection) -> None:
        del self._connecting[connection]
        target.succeeded()
        self.connect_error = None
        if self._unreachable_logged:
            self._unreachable_logged = False
            self.log.info(
                "server at {endpoint} is reachable again", endpoint=target.label
            )
        connection.disconnected.addCallback(lambda _: self._gone(target))
        self.counters.workers_started += 1
        if self._closed is not None:
            connection.close()
            return
        self._worker_ready(connection)

    def _connect_failed(
        self, target: _Target, connection: WorkerConnection, failure: Failure
    ) -> None:
        self._connecting.pop(connection, None)
        target.connections -= 1
        if self._closed is not None:
            return
        target.failed(self.reactor.seconds())
        self.connect_error = f"{target.label}: {failure.getErrorMessage()}"
        if not self._unreachable_logged:
            self._unreachable_logged = True
            self.log.warn(
                "cannot reach a worker at {endpoint}: {error}; retrying until "
                "the server is up",
                endpoint=target.label,
                error=failure.getErrorMessage(),
            )
        self._fill()

    def _gone(self, target: _Target) -> None:
        target.connections -= 1

    def _idle_connection_gone(self, connection: WorkerConnection, reason: str) -> None:
        if connection in self._idle:
            self._idle.remove(connection)
            self.counters.retired(reason)
        connection.close()
        self._fill()

    def _name_text(self) -> str:
        return "" if self.name is None else f" {self.name!r}"


class _IdleListener:
    """
    Hears an idle worker: anything but silence removes it from the pool.
    """

    def __init__(self, client: Client) -> None:
        self._client = client

    def reply_received(self, connection: WorkerConnection, message: list) -> None:
        self._client.log.warn(
            "worker {pid} sent {verb!r} while idle; dropping it",
            pid=connection.pid,
            verb=message[0],
        )
        self._client._idle_connection_gone(connection, "protocol")

    def bye_received(self, connection: WorkerConnection) -> None:
        self._client._idle_connection_gone(connection, "stopped")

    def connection_failed(
        self, connection: WorkerConnection, reason: BaseException
    ) -> None:
        kind = "protocol" if isinstance(reason, ProtocolError) else "death"
        self._client._idle_connection_gone(connection, kind)


def _shield(d: Deferred[None]) -> Deferred[None]:
    """
    A Deferred firing when C{d} does, leaving C{d}'s own chain alone.
    """
    shielded: Deferred[None] = Deferred()
    d.addBoth(lambda result: (shielded.callback(None), result)[1])
    return shielded


def _check_count(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")


def _check_timeout(timeout: object, name: str = "timeout") -> None:
    if timeout is None:
        return
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or timeout <= 0
    ):
        raise ValueError(f"{name} must be a positive number or None, not {timeout!r}")


#: This package's directory, to find the first caller frame outside it.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_site() -> str:
    """
    The file and line, outside txtask, that asked for a checkout.
    """
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
