"""
TaskServer: a launcher that starts one worker process per connection.

How this works. The server listens on a Twisted endpoint. For each accepted
connection it spawns C{python -m txtask.worker} and hands it the connection
itself as file descriptor 3, so calls go straight from the client to the
worker and never through this process. The server keeps its copy of the
connection open but unread until the worker exits, then closes it: that
close is what tells the client a worker died, even if something the worker
started still holds the descriptor.

A TLS connection is the exception: its encryption lives here, so it counts
only once its handshake succeeded, and its worker gets one end of a socket
pair that L{txtask._relay} joins to it.

The worker's standard input is a control pipe: closing it asks the worker to
exit once its current checkout ends. Its standard output and error are read
line by line into this process's log.

With C{max_workers} workers alive, further connections wait, unread, until
one exits. A graceful stop closes the listening port (removing a unix
socket), drops connections that never got a worker, closes every control
pipe, and after C{shutdown_grace} seconds kills what is left.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from types import FunctionType, ModuleType
from typing import Any

import setproctitle
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IListeningPort,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txtask import _wire
from txtask._listen import (
    check_client_certificate_description,
    endpoint_requiring_client_certificates,
    is_unix,
    safe_description,
)
from txtask._relay import Relay, needs_relay
from txtask._watch import StatusPage, WorkerWatch
from txtask.worker import CONNECTION_FD, STATUS_FD, encode_settings
from txtask.worker import ENTRY as WORKER_ENTRY


def import_path(target: str | Callable[..., Any] | ModuleType, role: str) -> str:
    """
    The import path of an interface or hook given as a string or an object.

    @raise TypeError: C{target} is neither a string nor an importable
        module, module-level function or class.
    """
    if isinstance(target, str):
        if not target or target.startswith(":"):
            raise ValueError(f"{role} must be an import path, not {target!r}")
        return target
    if isinstance(target, ModuleType):
        return target.__name__
    if isinstance(target, (FunctionType, type)) and "<" not in target.__qualname__:
        return f"{target.__module__}:{target.__qualname__}"
    raise TypeError(
        f"{role} must be an import path such as 'package.module:function' or a "
        f"module-level function, not {target!r}"
    )


class _WorkerProcess(ProcessProtocol):
    """
    One worker process, from spawn to exit.
    """

    def __init__(self, server: TaskServer, connection: _Connection, number: int):
        self.server = server
        self.connection = connection
        self.relay: Relay | None = None
        if needs_relay(connection.transport):
            self.relay = Relay(connection.transport)
            self.connection_fd = self.relay.worker_fd
            self.hangup_fd: int | None = None
        else:
            self.connection_fd = self.hangup_fd = connection.transport.fileno()
        self.page = StatusPage()
        self.number = number
        self.pid: int | None = None
        self.exited: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.server.log.info(
            "worker {worker_id} started with pid {pid}",
            worker_id=self.number,
            pid=self.pid,
        )

    def childDataReceived(self, fd: int, data: bytes) -> None:
        *lines, self._partial[fd] = (self._partial[fd] + data).split(b"\n")
        for line in lines:
            self._log_line(fd, line)

    def childConnectionLost(self, fd: int) -> None:
        if self._partial.get(fd):
            self._log_line(fd, self._partial[fd])
            self._partial[fd] = b""

    def _log_line(self, fd: int, line: bytes) -> None:
        self.server.log.info(
            "worker {worker_id} (pid {pid}) {stream}: {line}",
            worker_id=self.number,
            pid=self.pid,
            stream="stdout" if fd == 1 else "stderr",
            line=line.decode("utf-8", "replace").rstrip("\r"),
        )

    def stop(self) -> None:
        """
        Ask the worker to exit once its current checkout is done.
        """
        self.transport.closeStdin()

    def kill(self) -> None:
        """
        Kill the worker and every process in its session.
        """
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            # The worker has not reached setsid() yet, or is already gone.
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def kill_hung(self, elapsed: float) -> None:
        self.server.log.warn(
            "worker {worker_id} (pid {pid}) spent {elapsed:.1f} seconds on one "
            "call, over the hung worker timeout; killing it. Raise "
            "--hung-worker-timeout if such calls are expected",
            worker_id=self.number,
            pid=self.pid,
            elapsed=elapsed,
        )
        self.kill()

    def kill_abandoned(self) -> None:
        # The counter's first odd value is the setup after the hello.
        during = "setup" if self.page.counter == 1 else "a call"
        self.server.log.info(
            "the client of worker {worker_id} (pid {pid}) left during {during}; "
            "killing the worker",
            worker_id=self.number,
            pid=self.pid,
            during=during,
        )
        self.kill()

    def processEnded(self, reason: Failure) -> None:
        status = reason.value
        self.server.log.info(
            "worker {worker_id} (pid {pid}) exited with status {status}"
            " and signal {signal}",
            worker_id=self.number,
            pid=self.pid,
            status=getattr(status, "exitCode", None),
            signal=getattr(status, "signal", None),
        )
        self.server._worker_exited(self)
        self.page.close()
        if self.relay is not None:
            self.relay.finish()
        self.connection.transport.loseConnection()
        self.exited.callback(None)


@implementer(IHandshakeListener)
class _Connection(Protocol):
    """
    An accepted connection, waiting for or owned by a worker process.
    """

    def __init__(self, server: TaskServer) -> None:
        self.server = server
        self.worker: _WorkerProcess | None = None

    def connectionMade(self) -> None:
        # A TLS client counts once its handshake succeeded, so that a
        # client the server refuses never costs a worker process.
        if not needs_relay(self.transport):
            self.server._accepted(self)

    def handshakeCompleted(self) -> None:
        self.server._accepted(self)

    def dataReceived(self, data: bytes) -> None:
        if self.worker is not None and self.worker.relay is not None:
            self.worker.relay.to_worker(data)
            return

        # A client sends nothing before the worker's hello.
        self.server.log.warn(
            "a client sent {size} bytes before it had a worker; closing it",
            size=len(data),
        )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        if self.worker is None:
            self.server._abandoned(self)
        elif self.worker.relay is not None:
            self.worker.relay.close()
            self.server._watch.client_left(self.worker)


class TaskServer(Service):
    """
    A service that listens for clients and gives each connection its own
    worker process running the interface.

    @ivar listening: Fires with the listening port once the server listens.
    """

    log = Logger()

    def __init__(
        self,
        interface: str | Callable[..., Any] | ModuleType,
        listen: str | IStreamServerEndpoint = "unix:txtask.sock",
        setup: str | Callable[[], Any] | None = None,
        checkout_done: str | Callable[[], Any] | None = None,
        name: str | None = None,
        hung_worker_timeout: float | None = 300,
        max_workers: int = 64,
        shutdown_grace: float = 30,
        log_level: str = "INFO",
        max_frame_size: int = _wire.DEFAULT_MAX_FRAME_SIZE,
        worker_memory_limit: int | None = None,
        client_ca: str | None = None,
        reactor: Any = None,
    ) -> None:
        """
        @param interface: Import path (C{package.module} or
            C{package.module:attribute}) or object of the interface.
        @param listen: A Twisted server endpoint description, or an
            endpoint object, used as it is. A unix socket is made readable
            and writable by its owner only unless the description sets
            C{mode=}; C{tcp}, C{tcp6} and C{ssl} bind to the loopback
            interface unless the description sets C{interface=}.
        @param setup: Import path or function run once in each worker before
            its first call.
        @param checkout_done: Import path or function run in the worker each
            time a checkout of it is released.
        @param name: Name shown in process titles.
        @param hung_worker_timeout: Seconds a worker may spend on one call
            before it is killed; C{None}: never.
        @param max_workers: Most worker processes alive at once.
        @param shutdown_grace: Seconds a graceful stop waits for busy workers
            before killing them.
        @param log_level: Lowest level of worker log records captured.
        @param max_frame_size: Largest frame a worker accepts, in bytes.
        @param worker_memory_limit: Most address space a worker may use, in
            bytes (C{RLIMIT_AS}); C{None}: no limit. A call that runs out
            fails with a L{RemoteError} of type C{MemoryError} and its worker
            exits once the checkout ends.
        @param client_ca: Path of a PEM file of certificate authorities: only
            clients presenting a certificate one of them signed may connect
            (mutual TLS). Needs an C{ssl:} description as C{listen}.
        @param reactor: The reactor; the global one by default.
        """
        if not isinstance(listen, str) and not IStreamServerEndpoint.providedBy(listen):
            raise TypeError(
                f"listen must be an endpoint description such as "
                f"'unix:txtask.sock' or a server endpoint, not {listen!r}"
            )
        if client_ca is not None:
            if not isinstance(listen, str):
                raise TypeError(
                    "client_ca needs an ssl: description as listen; give an "
                    "endpoint object its authorities in its own TLS options"
                )
            check_client_certificate_description(listen)
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(
                f"max_workers must be an integer >= 1, not {max_workers!r}"
            )
        if hung_worker_timeout is not None and hung_worker_timeout <= 0:
            raise ValueError(
                f"hung_worker_timeout must be positive or None, "
                f"not {hung_worker_timeout!r}"
            )
        for setting, value in [
            ("max_frame_size", max_frame_size),
            ("worker_memory_limit", worker_memory_limit),
        ]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(
                    f"{setting} must be a positive number of bytes, not {value!r}"
                )
        if shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must be >= 0, not {shutdown_grace!r}")
        self.interface = import_path(interface, "interface")
        self.setup = None if setup is None else import_path(setup, "setup")
        self.checkout_done = (
            None
            if checkout_done is None
            else import_path(checkout_done, "checkout_done")
        )
        self.listen = listen
        self.name = name
        self.hung_worker_timeout = hung_worker_timeout
        self.max_workers = max_workers
        self.shutdown_grace = shutdown_grace
        self.log_level = log_level
        self.max_frame_size = max_frame_size
        self.worker_memory_limit = worker_memory_limit
        self.client_ca = client_ca
        self._reactor = reactor
        self.listening: Deferred[IListeningPort] = Deferred()
        self._port: IListeningPort | None = None
        self._workers: set[_WorkerProcess] = set()
        self._backlog: deque[_Connection] = deque()
        self._numbers = itertools.count(1)
        self._stopping = False
        self._grace: IDelayedCall | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    @property
    def live_workers(self) -> int:
        """
        Worker processes alive now.
        """
        return len(self._workers)

    def startService(self) -> None:
        """
        Start listening.

        @raise twisted.internet.error.CannotListenError: The endpoint cannot
            listen (address in use, no permission).
        """
        super().startService()
        self._stopping = False
        if self.name is not None:
            setproctitle.setproctitle(f"txtask-server: {self.name}")
        self._watch = WorkerWatch(self.reactor, self.hung_worker_timeout)
        if self.client_ca is not None:
            endpoint = endpoint_requiring_client_certificates(
                self.reactor, self.listen, self.client_ca
            )
            unix = False
        elif isinstance(self.listen, str):
            description = safe_description(self.listen)
            endpoint = serverFromString(self.reactor, description)
            unix = is_unix(description)
        else:
            endpoint, unix = self.listen, False

        # Bind under a strict umask so the socket is never, even briefly,
        # open to other users; the reactor is not running other code here.
        old_umask = os.umask(0o177) if unix else None
        try:
            listened = endpoint.listen(Factory.forProtocol(lambda: _Connection(self)))
        finally:
            if old_umask is not None:
                os.umask(old_umask)

        self._listen_failure: Failure | None = None
        listened.addCallbacks(self._listening, self._cannot_listen)
        if self._listen_failure is not None:
            super().stopService()
            self._listen_failure.raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self._port = port
        self.log.info(
            "txtask server listening on {endpoint} for {interface}",
            endpoint=self.listen,
            interface=self.interface,
        )
        self.listening.callback(port)

    def _cannot_listen(self, failure: Failure) -> None:
        self.log.error(
            "cannot listen on {endpoint}: {error}",
            endpoint=self.listen,
            error=failure.getErrorMessage(),
        )
        self._listen_failure = failure
        self.listening.errback(failure)

    def stopService(self) -> Deferred[None]:
        """
        Stop gracefully: stop listening now, let each worker finish its
        checkout, kill what is left after C{shutdown_grace} seconds.

        @return: A Deferred firing with C{None} once every worker exited.
        """
        super().stopService()
        self._stopping = True
        port, self._port = self._port, None
        stopped_listening = (
            succeed(None) if port is None else maybeDeferred(port.stopListening)
        )
        while self._backlog:
            self._backlog.popleft().transport.abortConnection()

        exits = [worker.exited for worker in self._workers]
        for worker in self._workers:
            worker.stop()
        if self._workers:
            self._grace = self.reactor.callLater(self.shutdown_grace, self._kill_all)

        stopped_listening.addCallback(self._stopped_listening, len(exits))
        for exited in exits:
            stopped_listening.addCallback(lambda _, exited=exited: exited)
        stopped_listening.addCallback(self._stopped)
        return stopped_listening

    def _stopped_listening(self, _: object, workers: int) -> None:
        self.log.info(
            "graceful stop: no longer listening on {endpoint}; {count} workers "
            "finishing their checkouts",
            endpoint=self.listen,
            count=workers,
        )

    def _stopped(self, _: object) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        self._watch.close()
        self.log.info("graceful stop done")

    def _kill_all(self) -> None:
        self._grace = None
        self.log.warn(
            "shutdown grace of {grace} seconds over; killing {count} workers",
            grace=self.shutdown_grace,
            count=len(self._workers),
        )
        for worker in self._workers:
            worker.kill()

    def _accepted(self, connection: _Connection) -> None:
        if self._stopping:
            connection.transport.abortConnection()
        elif len(self._workers) < self.max_workers:
            self._spawn(connection)
        else:
            self._backlog.append(connection)

    def _abandoned(self, connection: _Connection) -> None:
        if connection in self._backlog:
            self._backlog.remove(connection)

    def _worker_exited(self, worker: _WorkerProcess) -> None:
        self._workers.discard(worker)
        self._watch.remove(worker)
        while self._backlog and len(self._workers) < self.max_workers:
            self._spawn(self._backlog.popleft())

    def _spawn(self, connection: _Connection) -> None:
        number = next(self._numbers)
        worker = _WorkerProcess(self, connection, number)
        connection.worker = worker

        # The worker owns a plain connection from now on; this process
        # never reads it again.
        if worker.relay is None:
            connection.transport.stopReading()
        config = {
            "interface": self.interface,
            "setup": self.setup,
            "checkout_done": self.checkout_done,
            "name": self.name,
            "number": number,
            "log_level": self.log_level,
            "max_frame_size": self.max_frame_size,
            "memory_limit": self.worker_memory_limit,
        }
        try:
            self.reactor.spawnProcess(
                worker,
                sys.executable,
                [sys.executable, "-c", WORKER_ENTRY, encode_settings(config)],
                env=dict(os.environ),
                childFDs={
                    0: "w",
                    1: "r",
                    2: "r",
                    CONNECTION_FD: worker.connection_fd,
                    STATUS_FD: worker.page.fd,
                },
            )
        except OSError as error:
            self.log.error("cannot start a worker process: {error}", error=str(error))
            worker.page.close()
            if worker.relay is not None:
                worker.relay.abandon()
            connection.transport.abortConnection()
            return
        worker.page.close_fd()
        if worker.relay is not None:
            worker.relay.start(self.reactor)
        self._workers.add(worker)
        self._watch.add(worker)
