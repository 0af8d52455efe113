"""
Small in-memory fakes shared by the unit tests.

Each one provides the real Twisted interface (the tests check it with
C{verifyObject}) and does no I/O: the test decides when a connection is
made, when it is lost, and when a process exits.
"""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
import types
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    ProcessDone,
    ProcessTerminated,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IProcessProtocol,
    IProcessTransport,
    IProtocolFactory,
    IReactorProcess,
    IStreamClientEndpoint,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from txtask import _wire
from txtask._protocol import WorkerConnection

# Process ids no real process can have (Linux caps them far lower), so a
# signal sent by mistake reaches nothing.
_FAKE_PIDS = itertools.count(2_000_000_001)


def decode_frames(data: bytes) -> list[Any]:
    """
    Decode a byte string that holds whole frames only.
    """
    decoder = _wire.FrameDecoder()
    messages = decoder.feed(data)
    assert decoder.pending == 0, f"{decoder.pending} bytes of a partial frame"
    return messages


def outcomes(d: Deferred[Any]) -> list[Any]:
    """
    Collect what C{d} fires with: a value or a L{Failure}, which is handled.

    The list stays empty until C{d} fires and can never hold two items, so
    C{== [x]} asserts "fired exactly once, with x".
    """
    fired: list[Any] = []
    d.addBoth(fired.append)
    return fired


def failure_of(d: Deferred[Any]) -> BaseException:
    """
    The exception C{d} has already failed with.
    """
    fired = outcomes(d)
    assert len(fired) == 1, f"{d!r} has not fired"
    assert isinstance(fired[0], Failure), f"{d!r} succeeded with {fired[0]!r}"
    return fired[0].value


def result_of(d: Deferred[Any]) -> Any:
    """
    The value C{d} has already succeeded with.
    """
    fired = outcomes(d)
    assert len(fired) == 1, f"{d!r} has not fired"
    assert not isinstance(fired[0], Failure), f"{d!r} failed: {fired[0]!r}"
    return fired[0]


def make_module(
    monkeypatch: pytest.MonkeyPatch, name: str, source: str
) -> types.ModuleType:
    """
    Register a throwaway module made from C{source} under C{name}.
    """
    module = types.ModuleType(name)
    exec(textwrap.dedent(source), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class FakeTransport(StringTransport):
    """
    A L{StringTransport} that, like a reactor, delivers C{connectionLost} on
    the next turn of C{clock} after C{loseConnection}.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.protocol: Any = None
        self.lost = False

    def loseConnection(self) -> None:
        if self.disconnecting or self.lost:
            return
        self.disconnecting = True
        self.clock.callLater(0, self.connection_lost, ConnectionDone("closed"))

    def connection_lost(self, reason: BaseException) -> None:
        """
        The connection is gone: tell the protocol, once.
        """
        if self.lost:
            return
        self.lost = True
        self.protocol.connectionLost(Failure(reason))


class FakeWorker:
    """
    The far end of one L{WorkerConnection}: sends what a worker would and
    reads what the client wrote.
    """

    def __init__(self, protocol: WorkerConnection, transport: FakeTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        transport.protocol = protocol
        self.pid: int | None = None
        self._read = 0

    @classmethod
    def connected(
        cls,
        clock: Clock,
        pid: int | None = 100,
        max_frame_size: int = _wire.DEFAULT_MAX_FRAME_SIZE,
    ) -> FakeWorker:
        """
        A connection with a transport, whose worker said hello unless C{pid}
        is C{None}.
        """
        protocol = WorkerConnection(max_frame_size, "fake-endpoint")
        worker = cls(protocol, FakeTransport(clock))
        protocol.makeConnection(worker.transport)
        if pid is not None:
            worker.hello(pid)
        return worker

    def hello(self, pid: int) -> None:
        self.pid = pid
        self.send(["hello", _wire.PROTOCOL_VERSION, pid])

    def send(self, message: list[Any]) -> None:
        self.protocol.dataReceived(_wire.encode(message))

    def ok(self, value: Any) -> None:
        self.send(["ok", value])

    def error(
        self,
        type_name: str = "ValueError",
        message: str = "bad value",
        kind: str = "remote",
        traceback: str = "Traceback (most recent call last):\nValueError",
    ) -> None:
        self.send(["error", kind, type_name, message, traceback])

    def bye(self) -> None:
        self.send(["bye"])

    def die(self, reason: BaseException | None = None) -> None:
        """
        The worker process went away: the connection is lost now.
        """
        if reason is None:
            reason = ConnectionLost("worker exited")
        self.transport.connection_lost(reason)

    def received(self) -> list[Any]:
        """
        Messages the client sent since the last look.
        """
        data = self.transport.value()
        new, self._read = data[self._read :], len(data)
        return decode_frames(new)

    @property
    def closed(self) -> bool:
        """
        Whether the client closed or aborted this connection.
        """
        return bool(self.transport.disconnecting)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    A client endpoint whose connection attempts wait for the test to
    accept or refuse them, oldest first.

    @ivar attempts: Attempts not yet answered, as (factory, Deferred).
    @ivar cancelled: How many attempts the caller cancelled.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: deque[tuple[IProtocolFactory, Deferred[Any]]] = deque()
        self.cancelled = 0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1
            self.attempts.remove((protocolFactory, d))

        attempt: Deferred[Any] = Deferred(cancel)
        self.attempts.append((protocolFactory, attempt))
        return attempt

    def connect_only(self) -> FakeWorker:
        """
        Complete the oldest attempt; its worker has not said hello yet.
        """
        factory, attempt = self.attempts.popleft()
        protocol = factory.buildProtocol(None)
        worker = FakeWorker(protocol, FakeTransport(self.clock))
        protocol.makeConnection(worker.transport)
        attempt.callback(protocol)
        return worker

    def accept(self, pid: int = 100) -> FakeWorker:
        """
        Complete the oldest attempt; its worker says hello with C{pid}.
        """
        worker = self.connect_only()
        worker.hello(pid)
        return worker

    def refuse(self) -> None:
        """
        Fail the oldest attempt: nothing listens there.
        """
        _, attempt = self.attempts.popleft()
        attempt.errback(ConnectionRefusedError("nothing listens here"))


@implementer(IListeningPort)
class FakeListeningPort:
    """
    A listening port whose C{stopListening} returns a Deferred, as the
    reactor's own ports do.
    """

    def __init__(self, address: object) -> None:
        self.address = address
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def getHost(self) -> Any:
        return self.address


@implementer(IProcessTransport)
class FakeProcess:
    """
    A spawned process that runs nothing; the test ends it with L{end}.

    @ivar inherited: A copy of each descriptor passed to the child, by its
        number in the child, open until the process ends.
    """

    def __init__(
        self,
        protocol: IProcessProtocol,
        executable: str,
        args: list[str],
        env: Mapping[str, str] | None,
        child_fds: Mapping[int, int | str] | None,
    ) -> None:
        self.protocol = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.child_fds = child_fds
        self.inherited = {
            child: os.dup(parent)
            for child, parent in (child_fds or {}).items()
            if isinstance(parent, int)
        }
        self.pid: int | None = next(_FAKE_PIDS)
        self.stdin_closed = False
        self.signals: list[str | int] = []
        self.ended = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        if descriptor == 0:
            self.stdin_closed = True

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Iterable[bytes]) -> None:
        pass

    def loseConnection(self) -> None:
        self.closeStdin()

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None

    def signalProcess(self, signalID: str | int) -> None:
        self.signals.append(signalID)

    def close_inherited(self) -> None:
        """
        Close the child's copies of its descriptors, as its exit would.
        """
        for fd in self.inherited.values():
            os.close(fd)
        self.inherited.clear()

    def end(self, exit_code: int = 0, signal: int | None = None) -> None:
        """
        The process exits with C{exit_code}, or is killed by C{signal}.
        """
        self.ended = True
        self.pid = None
        self.close_inherited()
        if exit_code == 0 and signal is None:
            reason: BaseException = ProcessDone(0)
        else:
            reason = ProcessTerminated(exitCode=exit_code, signal=signal)
        self.protocol.processEnded(Failure(reason))


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor that records C{spawnProcess} calls as L{FakeProcess}es
    and listens on L{FakeListeningPort}s.

    @ivar processes: Every process spawned, in order.
    """

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.ports: list[FakeListeningPort] = []

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: str,
        args: list[str] = (),  # type: ignore[assignment]
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> FakeProcess:
        process = FakeProcess(processProtocol, executable, list(args), env, childFDs)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process

    def listenUNIX(self, address: str, factory: Any, *args: Any, **kw: Any) -> Any:
        super().listenUNIX(address, factory, *args, **kw)
        port = FakeListeningPort(address)
        self.ports.append(port)
        return port

    def listenTCP(self, port: int, factory: Any, *args: Any, **kw: Any) -> Any:
        super().listenTCP(port, factory, *args, **kw)
        listening = FakeListeningPort(port)
        self.ports.append(listening)
        return listening


class FakeSocketTransport(StringTransport):
    """
    An accepted connection as the server sees it: it has a file descriptor
    and can stop reading.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.reading = True

    def fileno(self) -> int:
        return self.fd

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True
