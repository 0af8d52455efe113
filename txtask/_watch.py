"""
Watching workers from outside: hung calls and clients that left.

How this works. Each worker shares an 8-byte status page with the server (a
memfd, file descriptor 4 in the worker) holding a counter that the worker
bumps as each call starts and ends: odd while a call runs, even while idle.
The worker pays two memory writes per call; the server never hears about
calls otherwise, since they do not pass through it.

A periodic check reads every page. A counter that stayed on the same odd
value for C{hung_worker_timeout} seconds is one call that never ended: the
worker is killed from here, which works even when the call is stuck in C
code that never returns to the interpreter.

The server also polls each worker's connection for the peer hanging up
(C{EPOLLRDHUP}, on an epoll set of its own, without reading). A client that
leaves mid-call (its timeout, abort or cancel) gets its worker killed, so
abandoned work does not run on; an idle worker sees the end of the stream
itself and exits. A relayed connection (TLS, see L{txtask._relay}) is not
polled: the server hears its client leave and calls L{WorkerWatch.client_left}.
Linux only, as is txtask's server.
"""

from __future__ import annotations

import mmap
import os
import select
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall

from txtask.worker import STATUS_COUNTER

#: Bytes in a status page.
PAGE_SIZE = STATUS_COUNTER.size
#: Longest time between two checks of the status pages, in seconds.
MAX_CHECK_INTERVAL = 1.0


class StatusPage:
    """
    The server's view of one worker's call counter.
    """

    def __init__(self) -> None:
        self.fd = os.memfd_create("txtask-status", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, PAGE_SIZE)
        self._map = mmap.mmap(self.fd, PAGE_SIZE)
        self.seen = 0
        self.seen_at = 0.0

    def close_fd(self) -> None:
        """
        Drop the descriptor once the worker inherited it; the map stays.
        """
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.close_fd()
        self._map.close()

    @property
    def counter(self) -> int:
        return STATUS_COUNTER.unpack_from(self._map)[0]

    @property
    def busy(self) -> bool:
        return self.counter % 2 == 1


class Watched(Protocol):
    """
    What the watch needs of a worker process.
    """

    page: StatusPage
    #: The client connection to poll for a hangup; C{None} when the server
    #: hears of it itself (see L{WorkerWatch.client_left}).
    hangup_fd: int | None

    def kill_hung(self, elapsed: float) -> None:
        """
        The worker spent C{elapsed} seconds on one call.
        """

    def kill_abandoned(self) -> None:
        """
        The worker's client left while a call ran.
        """


class WorkerWatch:
    """
    Check workers' status pages and connections; see the module docstring.
    """

    def __init__(self, reactor: Any, hung_worker_timeout: float | None) -> None:
        self._reactor = reactor
        self._hung_timeout = hung_worker_timeout
        self._interval = MAX_CHECK_INTERVAL
        if hung_worker_timeout is not None:
            self._interval = min(MAX_CHECK_INTERVAL, hung_worker_timeout / 4)
        self._workers: set[Watched] = set()
        self._hangup_fds: dict[int, Watched] = {}
        self._abandoned: set[Watched] = set()
        self._epoll = select.epoll()
        self._reader = _HangupReader(self._epoll, self._hung_up)
        self._check: IDelayedCall | None = None

    def add(self, worker: Watched) -> None:
        """
        Start watching a worker that was just spawned.
        """
        if worker.hangup_fd is not None:
            self._epoll.register(worker.hangup_fd, select.EPOLLRDHUP)
            self._hangup_fds[worker.hangup_fd] = worker
        self._workers.add(worker)
        worker.page.seen_at = self._reactor.seconds()
        if len(self._workers) == 1:
            self._reactor.addReader(self._reader)
            self._schedule()

    def remove(self, worker: Watched) -> None:
        """
        Stop watching a worker that exited.
        """
        self._workers.discard(worker)
        if self._hangup_fds.pop(worker.hangup_fd, None) is not None:
            try:
                self._epoll.unregister(worker.hangup_fd)
            except (OSError, ValueError):
                # The hangup already unregistered it.
                pass
        self._abandoned.discard(worker)
        if not self._workers:
            self._reactor.removeReader(self._reader)
            if self._check is not None and self._check.active():
                self._check.cancel()
            self._check = None

    def close(self) -> None:
        """
        Release the epoll set; call once no worker is left.
        """
        self._epoll.close()

    def _schedule(self) -> None:
        self._check = self._reactor.callLater(self._interval, self._run_check)

    def _run_check(self) -> None:
        self._check = None
        now = self._reactor.seconds()
        for worker in list(self._workers):
            page = worker.page
            counter = page.counter
            if counter != page.seen:
                page.seen, page.seen_at = counter, now
            if counter % 2 == 0:
                continue
            if worker in self._abandoned:
                self._abandoned.discard(worker)
                worker.kill_abandoned()
            elif self._hung_timeout is not None and (
                now - page.seen_at >= self._hung_timeout
            ):
                worker.kill_hung(now - page.seen_at)
        if self._workers:
            self._schedule()

    def _hung_up(self, fd: int) -> None:
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        worker = self._hangup_fds.get(fd)
        if worker is not None:
            self.client_left(worker)

    def client_left(self, worker: Watched) -> None:
        """
        The client of a worker hung up.
        """
        if worker not in self._workers:
            return
        if worker.page.busy:
            worker.kill_abandoned()
        else:
            # Idle workers read the end of the stream and exit; the check
            # catches one that took a call just before its client left.
            self._abandoned.add(worker)


class _HangupReader:
    """
    Puts the epoll set in the reactor: readable when a connection hung up.
    """

    def __init__(self, epoll: select.epoll, hung_up: Callable[[int], None]) -> None:
        self._epoll = epoll
        self._hung_up = hung_up

    def fileno(self) -> int:
        return self._epoll.fileno()

    def doRead(self) -> None:
        for fd, _ in self._epoll.poll(0):
            self._hung_up(fd)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "txtask-watch"
